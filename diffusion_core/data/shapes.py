"""The built-in dataset: captioned images of simple shapes, and a checker of image vs caption.

Captions come from a small grammar, one of

- ``a small red circle``                                  (one object)
- ``a large blue square above a small yellow triangle``   (two objects, distinct colours, a relation:
  ``above``, ``below``, ``to the left of``, ``to the right of``)
- ``three small green circles``                           (a count of identical objects)

:func:`write_shapes` writes them as raw img2dataset-style shards (``00000.tar`` with
``<key>.png|txt|json`` plus a sibling ``00000.parquet``), so the demo goes through the same ingest
path as user data. :func:`check_caption` reads an image and decides whether it matches a caption
(colours, shapes, sizes, count, relative position): :func:`faithfulness` is the fraction of
matches, the faithfulness metric of later stages.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from diffusion_core.data.tario import write_tar

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 120, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.16, 0.22), "large": (0.32, 0.40)}  # side / canvas side
RELATIONS = ("above", "below", "to the left of", "to the right of")
COUNT_WORDS = {2: "two", 3: "three"}
_SIZE_SPLIT = 0.27  # the checker's small/large boundary (side / canvas side)
_SUPERSAMPLE = 4
LICENSE = "CC0-1.0"


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What a caption says: objects, and for two objects the relation of the first to the second."""

    objects: tuple[Obj, ...]
    relation: str | None = None
    counted: bool = False  # "three small green circles"

    def caption(self) -> str:
        o = self.objects[0]
        if self.counted:
            return f"{COUNT_WORDS[len(self.objects)]} {o.size} {o.colour} {o.shape}s"
        first = f"a {o.size} {o.colour} {o.shape}"
        if len(self.objects) == 1:
            return first
        b = self.objects[1]
        return f"{first} {self.relation} a {b.size} {b.colour} {b.shape}"


@dataclass(frozen=True)
class Placed:
    obj: Obj
    cx: float  # centre, in canvas fractions
    cy: float
    side: float  # bounding-box side, in canvas fractions


# ------------------------------------------------------------------------------ generation


def sample_scene(rng: np.random.Generator) -> tuple[Scene, list[Placed]]:
    """A random scene and a layout of it (non-overlapping, relation made unambiguous)."""
    colours = list(COLOURS)

    def obj(colour: str | None = None) -> Obj:
        return Obj(
            colour or str(rng.choice(colours)),
            str(rng.choice(SHAPES)),
            str(rng.choice(list(SIZES))),
        )

    u = rng.random()
    if u < 0.3:
        scene = Scene((obj(),))
    elif u < 0.8:
        c1, c2 = rng.choice(colours, size=2, replace=False)
        scene = Scene((obj(str(c1)), obj(str(c2))), relation=str(rng.choice(RELATIONS)))
    else:
        n = int(rng.choice([2, 3]))
        o = obj()
        if n == 3 and o.size == "large":
            o = Obj(o.colour, o.shape, "small")  # three large ones do not fit reliably
        scene = Scene((o,) * n, counted=True)
    for _ in range(1000):
        placed = _layout(scene, rng)
        if placed is not None:
            return scene, placed
    raise RuntimeError("could not lay out a scene")  # pragma: no cover


def _layout(scene: Scene, rng: np.random.Generator) -> list[Placed] | None:
    margin = 0.04
    sides = [float(rng.uniform(*SIZES[o.size])) for o in scene.objects]
    placed: list[Placed] = []
    for o, s in zip(scene.objects, sides, strict=True):
        lo, hi = margin + s / 2, 1 - margin - s / 2
        placed.append(Placed(o, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), s))
    # no overlaps (with a gap)
    for i in range(len(placed)):
        for j in range(i + 1, len(placed)):
            a, b = placed[i], placed[j]
            gap = (a.side + b.side) / 2 + 0.04
            if abs(a.cx - b.cx) < gap and abs(a.cy - b.cy) < gap:
                return None
    if scene.relation is not None:
        a, b = placed
        dx, dy = b.cx - a.cx, b.cy - a.cy  # image y grows downwards
        want = {
            "above": dy > 0 and abs(dy) > 2 * abs(dx),
            "below": dy < 0 and abs(dy) > 2 * abs(dx),
            "to the left of": dx > 0 and abs(dx) > 2 * abs(dy),
            "to the right of": dx < 0 and abs(dx) > 2 * abs(dy),
        }[scene.relation]
        if not want:
            return None
    return placed


def render(placed: Sequence[Placed], size: int) -> Image.Image:
    """Draw crisply at ``size``² (supersampled, then box-filtered)."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for p in placed:
        half = p.side * big / 2
        cx, cy = p.cx * big, p.cy * big
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[p.obj.colour]
        if p.obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif p.obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:  # triangle, apex up
            draw.polygon(
                [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour
            )
    return img.resize((size, size), Image.Resampling.BOX)


def generate(count: int, seed: int = 0, size: int = 128, start: int = 0):
    """Yield ``(index, caption, image, scene, layout)`` for samples ``start .. start+count-1``.

    Sample ``i`` depends only on ``(seed, i)``: any slice can be generated independently.
    """
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        scene, placed = sample_scene(rng)
        yield i, scene.caption(), render(placed, size), scene, placed


def write_shapes(
    out: str | os.PathLike[str],
    count: int,
    *,
    seed: int = 0,
    size: int = 128,
    shard_size: int = 1000,
) -> list[str]:
    """Write ``count`` samples as img2dataset-style raw shards under ``out``; return tar paths.

    Keys follow img2dataset (``{shard:05d}{index in shard:04d}``). Re-running with the same
    arguments writes the same bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 1 <= shard_size <= 10_000:
        raise ValueError(f"shard_size must be in 1..10000 (4-digit keys), got {shard_size}")
    os.makedirs(out, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        members: list[tuple[str, bytes]] = []
        rows = []
        for i, caption, img, _scene, placed in generate(n, seed=seed, size=size, start=start):
            key = f"{shard:05d}{i - start:04d}"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            meta = {
                "key": key,
                "caption": caption,
                "status": "success",
                "width": size,
                "height": size,
                "license": LICENSE,
                "generator": "cascade-diffusion shapes",
                "seed": seed,
                "index": i,
                "scene": [asdict(p) for p in placed],
            }
            members += [
                (f"{key}.png", buf.getvalue()),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
            ]
            rows.append(
                {
                    "key": key,
                    "caption": caption,
                    "status": "success",
                    "error_message": None,
                    "width": size,
                    "height": size,
                }
            )
        tar = os.path.join(out, f"{shard:05d}.tar")
        write_tar(tar, members)
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, os.path.join(out, f"{shard:05d}.parquet"))
        paths.append(tar)
    return paths


# ------------------------------------------------------------------------------ the checker

_OBJ = r"(small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle)"
_SINGLE = re.compile(rf"^an? {_OBJ}$")
_PAIR = re.compile(rf"^an? {_OBJ} (above|below|to the left of|to the right of) an? {_OBJ}$")
_COUNT = re.compile(
    r"^(two|three) (small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle)s$"
)


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption of the grammar describes, or None if it is not in the grammar."""
    c = " ".join(caption.lower().strip().rstrip(".").split())
    if m := _SINGLE.match(c):
        return Scene((Obj(m[2], m[3], m[1]),))
    if m := _PAIR.match(c):
        return Scene((Obj(m[2], m[3], m[1]), Obj(m[6], m[7], m[5])), relation=m[4])
    if m := _COUNT.match(c):
        n = {"two": 2, "three": 3}[m[1]]
        return Scene((Obj(m[3], m[4], m[2]),) * n, counted=True)
    return None


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
        return "small" if self.side < _SIZE_SPLIT else "large"


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
