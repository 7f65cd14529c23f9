"""The dataset format (diffusion_core/data/format.py): manifest, reader checks, shard
verification, the atomic writes, and a dataset folder's immutability."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusion_core.data import format as fmt
from diffusion_core.data.ingest import IngestConfig, IngestError, ingest, verify
from diffusion_core.data.shapes import write_shapes
from diffusion_core.data.tario import sha256_file
from diffusion_core.storage import AtomicFile, write_json_atomic


def _cfg(raw: Path, out: Path, **kw) -> IngestConfig:
    base = dict(
        sources=[str(raw)],
        out=str(out),
        resolution=16,
        min_size=16,
        shard_size=8,
        text_encoder="hash-test",
        max_tokens=4,
    )
    return IngestConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmt") / "raw"
    write_shapes(root, 20, seed=3, size=32, shard_size=10)
    return root


@pytest.fixture(scope="module")
def dataset(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmt-ds") / "data"
    ingest(_cfg(raw, out), engine="local")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------ the manifest


def test_manifest_schema_and_reader(dataset):
    m = json.loads((dataset / fmt.MANIFEST).read_text())
    assert m["schema_version"] == fmt.SCHEMA_VERSION
    assert m["format"]["members"] == list(fmt.MEMBERS)
    assert m["format"]["shard_pattern"] == fmt.SHARD_PATTERN
    assert m["validation"]["max_file_bytes"] == 64 * 2**20
    content = {k: v for k, v in m.items() if k not in ("dataset_version", "sources")}
    assert fmt.dataset_version(content) == m["dataset_version"]
    info = fmt.read_manifest(str(dataset))
    assert info.version == m["dataset_version"] and info.num_samples == 20
    assert info.shard_sha256 == tuple(s["sha256"] for s in m["shards"])
    # the training package raises the format's own error
    from diffusion_core import training

    assert training.DataError is fmt.DataError


def test_a_newer_schema_is_refused(dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    m = json.loads((d / fmt.MANIFEST).read_text())
    m["schema_version"] = fmt.SCHEMA_VERSION + 1
    (d / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fmt.DataError, match="schema_version 2.*upgrade"):
        fmt.read_manifest(str(d))


def test_the_text_encoder_must_match_exactly(dataset):
    """The defect: a substring matched, so 'MiniLM' passed for 'all-MiniLM-L6-v2' data."""
    info = fmt.read_manifest(str(dataset))  # name 'hash-test', id 'hash-test-384'
    for ok in ("hash-test", "hash-test-384"):
        fmt.check_dataset_for_stage(info, stage="b", resolution=16, text_encoder=ok, text=True)
    for bad in ("hash", "test-3", "hash-test-38"):
        with pytest.raises(fmt.DataError, match="text encoder mismatch"):
            fmt.check_dataset_for_stage(info, stage="b", resolution=16, text_encoder=bad, text=True)
    ft = fmt.DatasetInfo(
        path="x",
        version="v",
        resolution=16,
        text_encoder_name="all-MiniLM-L6-v2-finetuned",
        text_encoder_id="my-org/all-MiniLM-L6-v2-finetuned@1",
        max_tokens=32,
        shards=(("shard-000000.tar", 1),),
    )
    with pytest.raises(fmt.DataError, match="text encoder mismatch.*'all-MiniLM-L6-v2'"):
        fmt.check_dataset_for_stage(
            ft, stage="b", resolution=16, text_encoder="all-MiniLM-L6-v2", text=True
        )


# ------------------------------------------------------------------------------ verify_shards


def test_verify_shards_passes_on_an_intact_dataset(dataset):
    fmt.verify_shards(fmt.read_manifest(str(dataset)))
    assert verify(str(dataset))["counts"]["accepted"] == 20


def test_verify_shards_names_a_changed_shard_and_both_hashes(dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    info = fmt.read_manifest(str(d))
    shard = d / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(fmt.DataError) as e:
        fmt.verify_shards(info)
    msg = str(e.value)
    assert "shard-000001.tar" in msg and info.shard_sha256[1] in msg
    assert sha256_file(str(shard)) in msg
    with pytest.raises(IngestError, match="shard-000001.tar"):
        verify(str(d))


def test_verify_shards_catches_a_missing_shard_a_size_and_an_edited_count(dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    (d / "shard-000002.tar").unlink()
    with pytest.raises(fmt.DataError, match="shard-000002.tar .* is missing"):
        fmt.verify_shards(fmt.read_manifest(str(d)))
    d = _copy(dataset, tmp_path / "e")
    with open(d / "shard-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(fmt.DataError, match=r"shard-000000.tar .* bytes, the manifest says"):
        fmt.verify_shards(fmt.read_manifest(str(d)))
    d = _copy(dataset, tmp_path / "f")
    m = json.loads((d / fmt.MANIFEST).read_text())
    m["shards"][0]["samples"] -= 1  # a hand-edited manifest: the shard's hash still matches
    (d / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(fmt.DataError, match="shard-000000.tar .* holds 8 samples.* says 7"):
        fmt.verify_shards(fmt.read_manifest(str(d)))


# ------------------------------------------------------------------------------ immutability


def test_ingest_into_a_finished_dataset_is_refused_untouched(raw, dataset, tmp_path):
    """The defect: a second ingest deleted the manifest and rewrote the folder in place."""
    d = _copy(dataset, tmp_path / "d")
    version = json.loads((d / fmt.MANIFEST).read_text())["dataset_version"]
    before = _files(d)
    with pytest.raises(IngestError) as e:
        ingest(_cfg(raw, d), engine="local")
    assert version in str(e.value) and "--overwrite" in str(e.value)
    assert e.value.transient is False  # a retry cannot fix it: the flow must not retry
    assert _files(d) == before  # not one byte or mtime changed
    # even with other options (a different dataset would come out)
    with pytest.raises(IngestError, match="immutable"):
        ingest(_cfg(raw, d, shard_size=5), engine="local")
    # a manifest that is not ours is refused too, never deleted
    (d / fmt.MANIFEST).write_text("{not json")
    with pytest.raises(IngestError, match="cannot be read"):
        ingest(_cfg(raw, d), engine="local")
    assert (d / fmt.MANIFEST).read_text() == "{not json"


def test_overwrite_replaces_the_dataset(raw, dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    old = json.loads((d / fmt.MANIFEST).read_text())
    res = ingest(_cfg(raw, d, shard_size=5, overwrite=True), engine="local")
    assert res.dataset_version != old["dataset_version"]
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [fmt.MANIFEST, fmt.REJECTED] + [f"shard-{i:06d}.tar" for i in range(4)]
    )
    verify(str(d))
    # the same options again, with overwrite: the very same bytes
    again = ingest(_cfg(raw, d, shard_size=5, overwrite=True), engine="local")
    assert again.dataset_version == res.dataset_version


def test_an_interrupted_run_is_finished_without_overwrite(raw, dataset, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    # what a killed run leaves: finished shards, partial files, no manifest
    shutil.copy(dataset / "shard-000000.tar", d / "shard-000000.tar")
    (d / ".shard-000001.tar.partial").write_bytes(b"half")
    (d / ".rejected.jsonl.partial").write_bytes(b"half")
    (d / "shard-000007.tar").write_bytes(b"stale")
    res = ingest(_cfg(raw, d), engine="local")
    assert (
        res.dataset_version == json.loads((dataset / fmt.MANIFEST).read_text())["dataset_version"]
    )
    assert sorted(os.listdir(d)) == sorted(os.listdir(dataset))


def test_the_cli_refuses_an_existing_dataset_before_starting_ray(raw, dataset, tmp_path):
    d = _copy(dataset, tmp_path / "d")
    from diffusion_core.cli import app

    r = CliRunner().invoke(
        app,
        ["ingest", str(raw), "--out", str(d), "--allow-root", str(tmp_path), "--allow-remote"]
        + ["--max-file-bytes", "1000"],
    )
    assert r.exit_code == 1
    assert "already holds dataset" in r.output and "--overwrite" in r.output


# ------------------------------------------------------------------------------ atomic writes


def test_atomic_file_commit_and_abort(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(str(p), {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError), AtomicFile(str(p)) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}  # the old file, intact
    assert sorted(os.listdir(tmp_path)) == ["x.json"]  # no partial file left
    with AtomicFile(str(p)) as f:
        assert os.path.exists(tmp_path / ".x.json.partial")
        f.write(b"new")
    assert p.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["x.json"]
