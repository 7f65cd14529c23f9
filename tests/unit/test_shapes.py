"""The built-in shapes dataset: deterministic generation, raw shards, and the caption checker."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_core.data import shapes as S
from diffusion_core.data.tario import iter_tar


def _resized(img: Image.Image, size: int) -> Image.Image:
    return img if img.size[0] == size else img.resize((size, size), Image.Resampling.LANCZOS)


def test_generation_is_deterministic_and_sliceable():
    a = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(5, seed=3)]
    b = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(5, seed=3)]
    c = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(2, seed=3, start=3)]
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert a[3][0] == c[0][0] and np.array_equal(a[3][1], c[0][1])
    other = [c for _, c, _, _, _ in S.generate(5, seed=4)]
    assert other != [x[0] for x in a]


def test_captions_cover_the_grammar_and_parse_back():
    caps = [c for _, c, _, _, _ in S.generate(200, seed=0, size=32)]
    assert any(" above " in c or " below " in c for c in caps)
    assert any(" to the left of " in c or " to the right of " in c for c in caps)
    assert any(c.startswith(("two ", "three ")) for c in caps)
    assert any(c.startswith("a ") and " of " not in c and len(c.split()) == 4 for c in caps)
    for c in caps:
        scene = S.parse_caption(c)
        assert scene is not None and scene.caption() == c
    assert S.parse_caption("a photo of a dog") is None


@pytest.mark.parametrize(("size", "at_least"), [(64, 0.98), (128, 0.99)])
def test_checker_accepts_rendered_images(size, at_least):
    n = 150 if size == 64 else 40
    images, captions = [], []
    for _, cap, img, _, _ in S.generate(n, seed=11, size=128):
        images.append(_resized(img, size))
        captions.append(cap)
    assert S.faithfulness(images, captions) >= at_least


def test_checker_rejects_mismatched_captions_near_chance():
    images, captions = [], []
    for _, cap, img, _, _ in S.generate(150, seed=12, size=64):
        images.append(img)
        captions.append(cap)
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    assert S.faithfulness(images, shuffled) <= 0.05


def _one(caption_filter, seed=0):
    for _, cap, img, scene, _ in S.generate(300, seed=seed, size=64):
        if caption_filter(scene):
            return cap, img, scene
    raise AssertionError("no such scene")


def test_checker_notices_each_kind_of_mistake():
    cap, img, scene = _one(lambda s: s.relation is not None)
    assert S.check_caption(img, cap).match
    a, b = scene.objects
    opposite = {
        "above": "below",
        "below": "above",
        "to the left of": "to the right of",
        "to the right of": "to the left of",
    }
    swapped_relation = cap.replace(scene.relation, opposite[scene.relation])
    assert not S.check_caption(img, swapped_relation).match
    other_colour = next(c for c in S.COLOURS if c not in (a.colour, b.colour))
    assert not S.check_caption(img, cap.replace(a.colour, other_colour, 1)).match
    other_shape = next(s for s in S.SHAPES if s != a.shape)
    wrong_shape = S.Scene((S.Obj(a.colour, other_shape, a.size), b), scene.relation)
    assert not S.check_caption(img, wrong_shape.caption()).match
    other_size = "large" if a.size == "small" else "small"
    wrong_size = S.Scene((S.Obj(a.colour, a.shape, other_size), b), scene.relation)
    assert not S.check_caption(img, wrong_size.caption()).match
    # one object only: the second one is extra
    assert not S.check_caption(img, f"a {a.size} {a.colour} {a.shape}").match

    cap, img, scene = _one(lambda s: s.counted and len(s.objects) == 2)
    assert S.check_caption(img, cap).match
    assert not S.check_caption(img, cap.replace("two ", "three ", 1)).match
    assert "not in the shapes grammar" in S.check_caption(img, "a cat").reason


def test_write_shapes_writes_img2dataset_style_raw_shards(tmp_path):
    paths = S.write_shapes(tmp_path / "raw", 7, seed=5, size=48, shard_size=4)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar"]
    with open(paths[1], "rb") as f:
        members = list(iter_tar(f))
    names = [m.name for m in members]
    assert names == [f"00001000{i}.{e}" for i in range(3) for e in ("png", "txt", "json")]
    assert all(m.reason is None for m in members)
    img = Image.open(io.BytesIO(members[0].data))
    assert img.size == (48, 48) and img.mode == "RGB"
    meta = json.loads(members[2].data)
    assert meta["key"] == "000010000" and meta["license"] == S.LICENSE and meta["index"] == 4
    assert meta["caption"] == members[1].data.decode()
    table = pq.read_table(str(tmp_path / "raw" / "00001.parquet"))
    assert table.column("status").to_pylist() == ["success"] * 3
    # byte-identical on a re-run
    again = S.write_shapes(tmp_path / "again", 7, seed=5, size=48, shard_size=4)
    for p, q in zip(paths, again, strict=True):
        assert open(p, "rb").read() == open(q, "rb").read()
    with pytest.raises(ValueError, match="count"):
        S.write_shapes(tmp_path / "x", 0)
