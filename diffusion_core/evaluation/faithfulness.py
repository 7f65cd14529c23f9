"""Faithfulness on the built-in shapes data: does an image show what its caption says?

The checker of the shapes grammar (``diffusion_core/data/shapes.py`` generates the data; this
module only reads images). :func:`check_caption` parses a caption, segments the image by palette
colour (pixels on a colour's mixing line with the white background, at least half covered;
4-connected components; regions under a third of the smallest object's area are speckle, not
objects), classifies each object by the template (circle, square, apex-up triangle, any side)
whose anti-aliased coverage fits the region's best (size: that side vs the small/large boundary)
and checks colours, shapes, sizes, count, relation and that nothing else is present. Version
``shapes-2`` (:data:`CHECKER_VERSION`, reported with the metric); ``shapes-1`` classified by
bounding-box corners and top-half share, which mistook circles for squares below ~8 px. :func:`faithfulness`
is the share of matches: the evaluation's ``faithfulness`` metric on held-out captions
(``docs/evaluation.md``); :func:`is_shapes_caption` decides whether a caption set is the shapes
data's, i.e. whether the metric applies.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diffusion_core.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, Obj, Scene

CHECKER_VERSION = "shapes-2"  # reported with faithfulness; bump when the checker changes
SIZE_SPLIT = 0.27  # small/large boundary (bounding-box side / canvas side), between SIZES' ranges

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_SIZE = "|".join(SIZES)
_OBJ = rf"({_SIZE}) ({_COLOUR}) ({_SHAPE})"
_SINGLE = re.compile(rf"^an? {_OBJ}$")
_PAIR = re.compile(rf"^an? {_OBJ} ({'|'.join(RELATIONS)}) an? {_OBJ}$")
_COUNT = re.compile(rf"^(two|three) ({_SIZE}) ({_COLOUR}) ({_SHAPE})s$")


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption of the shapes grammar describes, or None if it is not in the grammar."""
    c = " ".join(caption.lower().strip().rstrip(".").split())
    if m := _SINGLE.match(c):
        return Scene((Obj(m[2], m[3], m[1]),))
    if m := _PAIR.match(c):
        return Scene((Obj(m[2], m[3], m[1]), Obj(m[6], m[7], m[5])), relation=m[4])
    if m := _COUNT.match(c):
        n = {"two": 2, "three": 3}[m[1]]
        return Scene((Obj(m[3], m[4], m[2]),) * n, counted=True)
    return None


def is_shapes_caption(captions: Sequence[str]) -> bool:
    """True when there are captions and every one is in the shapes grammar: the data is the
    built-in shapes data (or speaks its language), so the checker can score samples for them."""
    return bool(captions) and all(parse_caption(c) is not None for c in captions)


@dataclass(frozen=True)
class Blob:
    """A connected region of one palette colour, measured in canvas fractions, and the shape
    template (circle, square or apex-up triangle of side ``side``) that fits it best."""

    colour: str
    area: float  # soft area in pixels: the sum of the colour's coverage
    cx: float
    cy: float
    side: float  # side of the best-fitting template's bounding box
    shape: str
    fit_error: float  # squared error of that fit / the blob's soft area (0: a perfect render)

    @property
    def size(self) -> str:
        return "small" if self.side < SIZE_SPLIT else "large"


@dataclass(frozen=True)
class CheckResult:
    match: bool
    reason: str = ""
    blobs: list[Blob] = field(default_factory=list)


_WHITE = np.float32(255.0)
_PALETTE = np.array(list(COLOURS.values()), np.float32)
# the smallest object the grammar draws (a small triangle) covers 0.5 * 0.16^2 of the canvas;
# a region under a third of that is no object (speckle, a stray edge pixel)
MIN_AREA_FRACTION = 0.5 * min(lo for lo, _ in SIZES.values()) ** 2 / 3


def coverage(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour, the coverage a with pixel ~ a * colour + (1 - a) * white
    (the mixing line of an anti-aliased edge) and the distance of the pixel from that line:
    arrays [H, W, K]."""
    rgb = img[..., :3].astype(np.float32)[:, :, None, :] - _WHITE
    direction = _PALETTE - _WHITE  # [K, 3]
    a = (rgb * direction).sum(-1) / (direction**2).sum(-1)
    a = a.clip(0.0, 1.0)
    residual = np.linalg.norm(rgb - a[..., None] * direction, axis=-1)
    return a, residual


def classify_pixels(img: np.ndarray, tol: float = 60.0) -> np.ndarray:
    """Index into ``COLOURS`` per pixel, or -1: the nearest palette colour's mixing line with white
    (within ``tol``), where that colour covers at least half the pixel."""
    a, residual = coverage(img)
    idx = residual.argmin(-1)
    a_best = np.take_along_axis(a, idx[..., None], -1)[..., 0]
    ok = (residual.min(-1) <= tol) & (a_best >= 0.5)
    return np.where(ok, idx, -1)


def _components(mask: np.ndarray) -> Iterable[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q = deque([(y0, x0)])
        pix = []
        while q:
            y, x = q.popleft()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        yield np.array(pix)


_AREA_PER_SIDE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
_SIDE_STEPS = np.linspace(0.8, 1.2, 17)  # sides tried around each shape's area-implied side


def _coverage_of(
    shape: str, sides: np.ndarray, cx: float, cy: float, ys: np.ndarray, xs: np.ndarray, sub: int
) -> np.ndarray:
    """Pixel coverage [len(sides), len(ys) * len(xs)] of a ``shape`` of each side (pixels) with
    its centroid at (cx, cy), drawn ``sub``² supersampled as the generator draws (apex-up
    triangles, whose centroid lies a sixth of the side below the box centre)."""
    off = (np.arange(sub) + 0.5) / sub
    py = (ys[:, None] + off[None]).reshape(-1)[:, None, None]  # sub-pixel centres
    px = (xs[:, None] + off[None]).reshape(-1)[None, :, None]
    half = sides[None, None, :] / 2
    dy = py - (cy - (half / 3 if shape == "triangle" else 0.0))  # from the box centre
    dx = px - cx
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # apex at the top centre, base the bottom side
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    cov = inside.reshape(len(ys), sub, len(xs), sub, len(sides)).mean(axis=(1, 3))
    return cov.reshape(-1, len(sides)).T


def _fit(
    alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray, scale: float
) -> tuple[str, float, float]:
    """The (shape, side, error) template that best fits a blob's coverage ``alpha`` on the
    pixel window ``ys`` x ``xs`` (least squares); the side in canvas fractions (``scale``
    pixels per canvas), the error relative to the blob's soft area."""
    total = float(alpha.sum())
    gy, gx = np.meshgrid(ys + 0.5, xs + 0.5, indexing="ij")
    cy, cx = float((alpha * gy).sum() / total), float((alpha * gx).sum() / total)
    sub = max(1, round(128 / scale))  # ~128 samples per canvas side, as fine as the generator's
    best = ("", 0.0, np.inf)
    for shape in SHAPES:
        sides = np.sqrt(total / _AREA_PER_SIDE2[shape]) * _SIDE_STEPS
        err = ((_coverage_of(shape, sides, cx, cy, ys, xs, sub) - alpha.reshape(1, -1)) ** 2)
        err = err.sum(-1)
        i = int(err.argmin())
        if err[i] < best[2]:
            best = (shape, float(sides[i]) / scale, float(err[i]))
    return best[0], best[1], best[2] / total


def find_blobs(
    image: Image.Image | np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION
) -> list[Blob]:
    """Every palette-coloured object in the image, largest first."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    labels = classify_pixels(arr)
    a, _ = coverage(arr)
    names = list(COLOURS)
    blobs = []
    scale = float(max(h, w))
    for ci in np.unique(labels):
        if ci < 0:
            continue
        for pix in _components(labels == ci):
            ys, xs = pix[:, 0], pix[:, 1]
            # the component and its 1-pixel rim (anti-aliased edges below half coverage)
            own = np.zeros((h, w), bool)
            own[ys, xs] = True
            rim = own.copy()
            rim[1:] |= own[:-1]
            rim[:-1] |= own[1:]
            rim[:, 1:] |= own[:, :-1]
            rim[:, :-1] |= own[:, 1:]
            rim &= (labels == ci) | (labels < 0)
            y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
            x0, x1 = max(0, xs.min() - 2), min(w, xs.max() + 3)
            alpha = np.where(rim, a[..., ci], 0.0)[y0:y1, x0:x1]
            area = float(alpha.sum())
            if area < min_area_fraction * h * w:
                continue
            shape, side, err = _fit(alpha, np.arange(y0, y1, dtype=float),
                                    np.arange(x0, x1, dtype=float), scale)
            gy, gx = np.meshgrid(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, indexing="ij")
            blobs.append(
                Blob(
                    colour=names[ci],
                    area=area,
                    cx=float((alpha * gx).sum() / area) / w,
                    cy=float((alpha * gy).sum() / area) / h,
                    side=side,
                    shape=shape,
                    fit_error=err,
                )
            )
    return sorted(blobs, key=lambda b: -b.area)


def _matches(blob: Blob, o: Obj) -> bool:
    return blob.colour == o.colour and blob.shape == o.shape and blob.size == o.size


def check_caption(image: Image.Image | np.ndarray, caption: str) -> CheckResult:
    """Does the image show what the caption says? Colours, shapes, sizes, count and relation must
    all agree, and no other object may be present."""
    scene = parse_caption(caption)
    if scene is None:
        return CheckResult(False, "caption is not in the shapes grammar")
    blobs = find_blobs(image)
    if len(blobs) != len(scene.objects):
        return CheckResult(False, f"{len(blobs)} objects, caption has {len(scene.objects)}", blobs)
    if scene.counted:
        bad = [b for b in blobs if not _matches(b, scene.objects[0])]
        if bad:
            return CheckResult(False, f"{len(bad)} objects differ from the caption", blobs)
        return CheckResult(True, "", blobs)
    found = []
    for o in scene.objects:
        cands = [b for b in blobs if _matches(b, o)]
        if len(cands) != 1:
            return CheckResult(False, f"no single {o.size} {o.colour} {o.shape}", blobs)
        found.append(cands[0])
    if scene.relation is not None:
        a, b = found
        dx, dy = b.cx - a.cx, b.cy - a.cy
        ok = {
            "above": dy > 0 and abs(dy) > abs(dx),
            "below": dy < 0 and abs(dy) > abs(dx),
            "to the left of": dx > 0 and abs(dx) > abs(dy),
            "to the right of": dx < 0 and abs(dx) > abs(dy),
        }[scene.relation]
        if not ok:
            return CheckResult(False, f"the first object is not {scene.relation} the second", blobs)
    return CheckResult(True, "", blobs)


def faithfulness(images: Iterable[Image.Image | np.ndarray], captions: Iterable[str]) -> float:
    """Fraction of images that match their caption (:func:`check_caption`)."""
    results = [check_caption(i, c).match for i, c in zip(images, captions, strict=True)]
    if not results:
        raise ValueError("faithfulness of zero images is undefined")
    return sum(results) / len(results)
