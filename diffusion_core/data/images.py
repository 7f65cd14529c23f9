"""Image validation, decode and resize, with a pixel-limit guard against decompression bombs."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from diffusion_core.data.reasons import Reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class Rejected(Exception):
    """An input that is rejected with a reason (and a human-readable detail)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """``min_size``: shorter side in pixels; ``max_pixels``: width×height refused before decode."""

    min_size: int = 32
    max_pixels: int = 64_000_000


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Identify the image and check its declared size, without decoding the pixels."""
    if len(data) == 0:
        raise Rejected(Reason.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (and errors past 2x its limit); ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(Reason.TOO_MANY_PIXELS, f"refused before decoding: {e}") from None
    except UnidentifiedImageError:
        raise Rejected(
            Reason.NOT_AN_IMAGE, f"no image format recognises these {len(data)} bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected(Reason.CORRUPT_IMAGE, f"header: {e}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise Rejected(
            Reason.TOO_MANY_PIXELS,
            f"{w}x{h} = {w * h} pixels > max_pixels={limits.max_pixels}; refused before decoding",
        )
    if min(w, h) < limits.min_size:
        raise Rejected(Reason.TOO_SMALL, f"{w}x{h}: shorter side < min_size={limits.min_size}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency is composited on white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to ``resolution``² (Lanczos, one resampling step)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize(
        (resolution, resolution),
        Image.Resampling.LANCZOS,
        box=(left, top, left + side, top + side),
    )


def decode_resize(
    data: bytes, resolution: int, limits: ImageLimits
) -> tuple[Image.Image, tuple[int, int]]:
    """Validate and decode ``data``; return the RGB ``resolution``² image and the original size.

    Raises :class:`Rejected` with the reason for every bad input.
    """
    img = open_checked(data, limits)
    original = img.size
    try:
        if img.format == "JPEG":
            # Decode at the smallest DCT scale that still covers the target: much faster.
            side = min(original)
            scale = max(1, side // resolution)
            img.draft("RGB", (original[0] // scale, original[1] // scale))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        return center_crop_resize(img, resolution), original
    except Image.DecompressionBombError as e:
        raise Rejected(Reason.TOO_MANY_PIXELS, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Rejected(Reason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None


def encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes; deterministic for a given Pillow/zlib."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
