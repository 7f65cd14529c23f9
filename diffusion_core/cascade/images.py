"""Images between storage (uint8 [N, H, W, C]) and the networks (float [N, C, H, W] in [-1, 1])."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def images_to_model(images: Tensor) -> Tensor:
    """uint8 images [N, H, W, C] (or float [N, C, H, W] in [-1, 1]) → float [N, C, H, W] in [-1, 1]."""
    if images.dtype == torch.uint8:
        if images.ndim != 4:
            raise ValueError(f"uint8 images must be [N, H, W, C], got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1], got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    return images


def model_to_images(x: Tensor) -> Tensor:
    """float [N, C, H, W] in [-1, 1] → uint8 [N, H, W, 3] (grey images repeated to RGB)."""
    out = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous()


def resize(x: Tensor, size: int) -> Tensor:
    """Down-sample [N, C, H, W] to ``size`` pixels by area averaging (exact box filter)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} pixels are smaller than the stage's {size}; "
            "provide images at the cascade's top resolution"
        )
    return F.interpolate(x, size=(size, size), mode="area")


def png_bytes(image: Tensor | Any) -> bytes:
    """One uint8 image [H, W, 3] (tensor or array) as PNG bytes: no metadata, zlib level 6, so
    the same pixels give the same bytes (the registry model and the batch job both use this)."""
    import io

    from PIL import Image

    array = image.cpu().numpy() if hasattr(image, "cpu") else image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
