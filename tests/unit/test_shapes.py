"""The built-in shapes dataset: deterministic generation and raw shards (the checker has its tests
in test_evaluation_faithfulness.py)."""

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


def test_generation_is_deterministic_and_sliceable():
    a = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(5, seed=3)]
    b = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(5, seed=3)]
    c = [(c, np.asarray(i)) for _, c, i, _, _ in S.generate(2, seed=3, start=3)]
    assert all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert a[3][0] == c[0][0] and np.array_equal(a[3][1], c[0][1])
    other = [c for _, c, _, _, _ in S.generate(5, seed=4)]
    assert other != [x[0] for x in a]


def test_captions_cover_the_grammar():
    caps = [c for _, c, _, _, _ in S.generate(200, seed=0, size=32)]
    assert any(" above " in c or " below " in c for c in caps)
    assert any(" to the left of " in c or " to the right of " in c for c in caps)
    assert any(c.startswith(("two ", "three ")) for c in caps)
    assert any(c.startswith("a ") and " of " not in c and len(c.split()) == 4 for c in caps)


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
