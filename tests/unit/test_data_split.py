"""The evaluation split of the ingest (docs/data.md, "The evaluation split"): chosen by a hash of
the key, capped in input order, written to its own shards, recorded in the manifest; training
reads only the training split, evaluation only the evaluation split."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffusion_core.data import format as fmt
from diffusion_core.data.ingest import IngestConfig, ingest, verify
from diffusion_core.data.shapes import write_shapes
from diffusion_core.data.tario import split_member_name
from diffusion_core.training.reader import ShardReader


def _cfg(raw: Path, out: Path, **kw) -> IngestConfig:
    base = dict(
        sources=[str(raw)],
        out=str(out),
        resolution=16,
        min_size=16,
        shard_size=8,
        text_encoder="hash-test",
        max_tokens=4,
        eval_fraction=0.2,
    )
    return IngestConfig(**{**base, **kw})


def _keys(paths: list[Path]) -> list[str]:
    keys: list[str] = []
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf:
                k = split_member_name(m.name)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    return keys


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split") / "raw"
    write_shapes(root, 60, seed=3, size=32, shard_size=30)
    return root


@pytest.fixture(scope="module")
def dataset(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split-ds") / "data"
    ingest(_cfg(raw, out), engine="local")
    return out


ALL_KEYS = [f"0000{s}{i:04d}" for s in range(2) for i in range(30)]  # input order


def test_the_split_follows_the_key_hash_and_is_recorded(dataset):
    want_eval = [k for k in ALL_KEYS if fmt.in_eval_split(k, 0.2)]
    assert 4 <= len(want_eval) <= 25  # the fixture exercises both splits
    m = json.loads((dataset / fmt.MANIFEST).read_text())
    assert m["split"] == {
        "rule": fmt.SPLIT_RULE,
        "eval_fraction": 0.2,
        "eval_max": 1000,
        "train": 60 - len(want_eval),
        "eval": len(want_eval),
    }
    c = m["counts"]
    assert c["read"] == c["accepted"] + c["rejected"]
    assert c["accepted"] == m["split"]["train"] + m["split"]["eval"] == 60
    assert [s["name"] for s in m["eval_shards"]][0] == "eval-000000.tar"
    assert sum(s["samples"] for s in m["eval_shards"]) == len(want_eval)
    assert all(s["name"].startswith("shard-") for s in m["shards"])
    assert _keys([dataset / s["name"] for s in m["eval_shards"]]) == want_eval
    assert _keys([dataset / s["name"] for s in m["shards"]]) == [
        k for k in ALL_KEYS if k not in want_eval
    ]
    assert m["format"]["eval_shard_pattern"] == fmt.EVAL_SHARD_PATTERN
    content = {k: v for k, v in m.items() if k not in ("dataset_version", "sources")}
    assert fmt.dataset_version(content) == m["dataset_version"]  # the version covers both


def test_training_reads_only_the_training_split_and_evaluation_only_the_other(dataset):
    info = fmt.read_manifest(str(dataset))
    split = info.eval_split()
    assert info.split == "train" and split.split == "eval"
    assert info.num_samples + info.num_eval_samples == 60
    assert split.num_samples == info.num_eval_samples and split.eval_shards == ()
    train_keys = {s.key for s in ShardReader(info).samples}
    eval_keys = {s.key for s in ShardReader(split).samples}
    assert len(train_keys) == info.num_samples and len(eval_keys) == split.num_samples
    assert not train_keys & eval_keys and train_keys | eval_keys == set(ALL_KEYS)


def test_the_cap_keeps_the_first_held_out_samples_in_input_order(raw, tmp_path):
    want = [k for k in ALL_KEYS if fmt.in_eval_split(k, 0.2)]
    res = ingest(_cfg(raw, tmp_path / "capped", eval_max=3), engine="local")
    assert (res.train, res.eval) == (57, 3)
    info = fmt.read_manifest(str(tmp_path / "capped"))
    assert [s.key for s in ShardReader(info.eval_split()).samples] == want[:3]
    assert set(want[3:]) <= {s.key for s in ShardReader(info).samples}


def test_a_sample_keeps_its_split_when_data_are_added(raw, dataset, tmp_path):
    """The first 30 samples on their own are split as they are inside the 60."""
    small = tmp_path / "raw30"
    write_shapes(small, 30, seed=3, size=32, shard_size=30)
    ingest(_cfg(small, tmp_path / "d30"), engine="local")
    big = {s.key for s in ShardReader(fmt.read_manifest(str(dataset)).eval_split()).samples}
    info = fmt.read_manifest(str(tmp_path / "d30"))
    assert {s.key for s in ShardReader(info.eval_split()).samples} == {
        k for k in big if k.startswith("00000")
    }


def test_the_same_input_gives_the_same_split_bytes(raw, dataset, tmp_path):
    ingest(_cfg(raw, tmp_path / "again"), engine="local")
    for p in sorted(dataset.iterdir()):
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name


def test_verify_covers_the_evaluation_shards(dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    verify(str(d))
    shard = d / "eval-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(fmt.DataError, match="eval-000000.tar"):
        fmt.verify_shards(fmt.read_manifest(str(d)))
    with pytest.raises(fmt.DataError, match="eval-000000.tar"):
        fmt.verify_shards(fmt.read_manifest(str(d)).eval_split())


def test_no_split_and_an_old_manifest_are_refused_clearly(raw, dataset, tmp_path):
    res = ingest(_cfg(raw, tmp_path / "none", eval_fraction=0.0), engine="local")
    assert (res.train, res.eval, res.eval_shards) == (60, 0, [])
    assert not list((tmp_path / "none").glob("eval-*"))
    with pytest.raises(fmt.DataError, match="no evaluation split.*selected no sample"):
        fmt.read_manifest(str(tmp_path / "none")).eval_split()
    d = tmp_path / "old"
    shutil.copytree(dataset, d)
    m = json.loads((d / fmt.MANIFEST).read_text())
    del m["eval_shards"], m["split"]  # a manifest written before the split existed
    (d / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fmt.DataError, match="ingested before.*--eval-fraction"):
        fmt.read_manifest(str(d)).eval_split()
    m = json.loads((dataset / fmt.MANIFEST).read_text())
    m["eval_shards"], m["shards"] = m["shards"] + m["eval_shards"], []
    (d / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fmt.DataError, match="no training samples.*smaller --eval-fraction"):
        fmt.read_manifest(str(d))


def test_stale_evaluation_shards_of_an_interrupted_run_are_removed(raw, dataset, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "eval-000004.tar").write_bytes(b"stale")
    (d / ".eval-000000.tar.partial").write_bytes(b"half")
    ingest(_cfg(raw, d), engine="local")
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in dataset.iterdir())


@pytest.mark.parametrize("bad", [{"eval_fraction": 1.0}, {"eval_fraction": -0.1}, {"eval_max": -1}])
def test_split_options_are_validated(bad):
    with pytest.raises(ValidationError):
        IngestConfig(sources=["x"], out="o", **bad)
