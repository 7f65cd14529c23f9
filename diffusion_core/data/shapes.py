"""The built-in dataset: captioned images of simple shapes (generation only).

Captions come from a small grammar, one of

- ``a small red circle``                                  (one object)
- ``a large blue square above a small yellow triangle``   (two objects, distinct colours, a relation:
  ``above``, ``below``, ``to the left of``, ``to the right of``)
- ``three small green circles``                           (a count of identical objects)

:func:`write_shapes` writes them as raw img2dataset-style shards (``00000.tar`` with
``<key>.png|txt|json`` plus a sibling ``00000.parquet``), so the demo goes through the same ingest
path as user data. The checker that reads an image and decides whether it matches a caption (the
faithfulness metric) lives with the evaluation: :mod:`diffusion_core.evaluation.faithfulness`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

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
