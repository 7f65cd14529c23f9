"""Faithfulness on the built-in shapes data: does an image show what its caption says?

The checker of the shapes grammar (``diffusion_core/data/shapes.py`` generates the data; this
module only reads images). :func:`check_caption` parses a caption, segments the image by palette
colour (4-connected components), classifies each object (triangle: light top half; square vs
circle: filled bounding-box corners; size: bounding box vs the small/large boundary) and checks
colours, shapes, sizes, count, relation and that nothing else is present. :func:`faithfulness`
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
    """A connected region of one palette colour, measured in canvas fractions."""

    colour: str
    area: int
    cx: float
    cy: float
    side: float  # the longer side of the bounding box
    fill: float  # area / bounding-box area
    top_fraction: float  # share of the area in the upper half of the bounding box
    corner_fill: float  # how full the bounding box's four corner windows are (square: ~1)

    @property
    def shape(self) -> str:
        """Triangles (apex up) have a light top half; squares fill their bounding box's corners,
        which circles leave empty."""
        if self.top_fraction < 0.35:
            return "triangle"
        return "square" if self.corner_fill > 0.45 else "circle"

    @property
    def size(self) -> str:
        return "small" if self.side < SIZE_SPLIT else "large"


@dataclass(frozen=True)
class CheckResult:
    match: bool
    reason: str = ""
    blobs: list[Blob] = field(default_factory=list)


def classify_pixels(img: np.ndarray, tol: float = 60.0) -> np.ndarray:
    """Index into ``COLOURS`` per pixel, or -1 (background, anti-aliased edge, anything else)."""
    rgb = img[..., :3].astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    d = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)
    idx = d.argmin(-1)
    idx[d.min(-1) > tol] = -1
    return idx


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


def find_blobs(image: Image.Image | np.ndarray, min_area_fraction: float = 0.002) -> list[Blob]:
    """Every palette-coloured object in the image, largest first."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    labels = classify_pixels(arr)
    names = list(COLOURS)
    blobs = []
    min_area = max(3, int(min_area_fraction * h * w))
    for ci in np.unique(labels):
        if ci < 0:
            continue
        for pix in _components(labels == ci):
            if len(pix) < min_area:
                continue
            ys, xs = pix[:, 0], pix[:, 1]
            bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            mid = (ys.min() + ys.max()) / 2
            local = np.zeros((bh, bw), bool)
            local[ys - ys.min(), xs - xs.min()] = True
            k = max(1, round(0.15 * min(bh, bw)))
            corners = (local[:k, :k], local[:k, -k:], local[-k:, :k], local[-k:, -k:])
            blobs.append(
                Blob(
                    colour=names[ci],
                    area=len(pix),
                    cx=float(xs.mean() + 0.5) / w,
                    cy=float(ys.mean() + 0.5) / h,
                    side=float(max(bh, bw)) / max(h, w),
                    fill=len(pix) / float(bh * bw),
                    top_fraction=float((ys < mid).sum() + 0.5 * (ys == mid).sum()) / len(pix),
                    corner_fill=float(np.mean([c.mean() for c in corners])),
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
