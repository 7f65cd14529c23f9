"""The ingest job end to end: real local Ray, real tars and images, the real text encoder.

Inputs are tiny (tens of samples) but cover every bad-input case of issue 4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from diffusion_core.cli import app
from diffusion_core.data.format import in_eval_split
from diffusion_core.data.ingest import IngestConfig, IngestProgress, ingest, verify
from diffusion_core.evaluation.faithfulness import faithfulness
from tests import data_fixtures as F

pytestmark = pytest.mark.integration


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[list[str], dict[str, int], list[str]]:
    """(sources, expected rejections by reason, allowed roots of the manifests' images)."""
    root = tmp_path_factory.mktemp("raw")
    expected: dict[str, int] = {}
    for part in (
        F.build_hostile_img2dataset(root / "i2d"),
        F.build_folder(root / "folder"),
        F.build_manifests(root / "manifests", root / "images"),
    ):
        for k, v in part.items():
            expected[k] = expected.get(k, 0) + v
    sources = [str(root / "i2d"), f"file://{root / 'folder'}", str(root / "manifests")]
    return sources, dict(sorted(expected.items())), [str(root / "images")]


def _cfg(raw, out: Path) -> IngestConfig:
    return IngestConfig(
        sources=raw[0],
        out=str(out),
        resolution=32,
        shard_size=3,
        max_file_bytes=F.MAX_FILE_BYTES,
        allow_roots=raw[2],
    )


@pytest.fixture(scope="module")
def first_run(raw, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    return ingest(_cfg(raw, out)), out


def test_every_bad_input_is_rejected_with_its_reason(raw, first_run):
    """In the Ray job too: links, escaping manifest paths, URLs and huge files are refused."""
    expected = raw[1]
    res, out = first_run
    assert res.rejected_by_reason == expected
    assert res.accepted == F.HOSTILE_ACCEPTED + 3 + 4
    assert res.read == res.accepted + res.rejected
    manifest = verify(str(out))
    assert manifest["counts"] == {
        "read": res.read,
        "accepted": res.accepted,
        "rejected": res.rejected,
        "rejected_by_reason": expected,
    }
    assert manifest["text_encoder"]["id"].startswith("sentence-transformers/all-MiniLM-L6-v2@")
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 3]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == res.rejected
    assert {r["source"] for r in rejected if r["reason"] == "unsafe_path"} == {
        "i2d/00000.tar::/etc/evil.png",
        "i2d/00000.tar::../../evil.txt",
    } | {f"manifests/list.jsonl#{i}" for i in range(6, 11)}
    assert {r["source"] for r in rejected if r["reason"] in ("symlink", "file_too_large")} == {
        "folder/leak.txt",
        "folder/linked",
        "folder/sub/lnk.png",
        "folder/huge.png",
        "manifests/list.jsonl#11",
        "i2d/00000.tar::000000014.png",
    }
    # nothing from outside the sources got into a shard
    captions = [
        s["txt"]
        for s in wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False)
    ]
    assert not [c for c in captions if b"secret" in c or b"behind" in c]
    # nothing written outside the output folder, no hidden leftovers inside it
    assert not [p for p in out.parent.parent.rglob("evil*")]
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", "rejected.jsonl"] + [s["name"] for s in manifest["shards"]]
    )


def test_shards_load_with_webdataset_and_ray_read_webdataset(first_run, ray_local):
    import ray.data

    res, out = first_run
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == res.accepted
    for s in samples:
        assert s["png"].shape == (32, 32, 3)
        assert s["emb.npy"].shape == (384,) and s["emb.npy"].dtype == np.float32
        assert abs(float(np.linalg.norm(s["emb.npy"])) - 1) < 1e-3
        tok = s["tok.npy"]
        assert tok.shape == (32, 384) and tok.dtype == np.float16
        n = min(s["json"]["caption_tokens"], 32)
        assert np.abs(tok[:n]).sum(1).min() > 0 and not tok[n:].any()
    alpha = next(s for s in samples if s["__key__"] == "sub_alpha")
    assert tuple(alpha["png"][16, 2]) == (0, 0, 255) and tuple(alpha["png"][16, 29]) == (255,) * 3
    ds = ray.data.read_webdataset(urls)
    rows = ds.take_all()
    assert len(rows) == res.accepted
    assert {"png", "txt", "json", "emb.npy", "tok.npy"} <= set(rows[0])


def test_same_input_gives_the_same_bytes(raw, first_run, tmp_path):
    res, out = first_run
    again = ingest(_cfg(raw, tmp_path / "run2"))
    assert again.dataset_version == res.dataset_version
    assert _files(tmp_path / "run2") == _files(out)
    # the single-process loop computes the same bytes as the Ray job
    ingest(_cfg(raw, tmp_path / "local"), engine="local")
    assert _files(tmp_path / "local") == _files(out)


def test_an_interrupted_run_is_finished_by_a_rerun(raw, first_run, tmp_path):
    res, out = first_run
    dest = tmp_path / "resume"
    dest.mkdir()
    # leftovers of earlier runs: a bigger dataset's last shard, a killed run's partial file
    # (no manifest.json: a folder with one is a finished dataset, and refused)
    (dest / "shard-000009.tar").write_bytes(b"stale")
    (dest / ".shard-000001.tar.partial").write_bytes(b"half")

    def stop_after_two_shards(p: IngestProgress) -> None:
        if p.shards >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(_cfg(raw, dest), progress=stop_after_two_shards)
    left = sorted(os.listdir(dest))
    assert "manifest.json" not in left  # not a complete dataset
    assert not [n for n in left if n.startswith(".")]  # no partial file visible or hidden
    assert {"shard-000000.tar", "shard-000001.tar"} <= set(left)
    assert (dest / "shard-000000.tar").read_bytes() == (out / "shard-000000.tar").read_bytes()

    again = ingest(_cfg(raw, dest))
    assert again.dataset_version == res.dataset_version
    assert _files(dest) == _files(out)  # finished, no duplicates, stale shard gone


def test_cli_shapes_then_ingest(tmp_path, ray_local):
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "data",
            "shapes",
            "--out",
            str(tmp_path / "raw"),
            "--count",
            "24",
            "--seed",
            "1",
            "--shard-size",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "raw")) == [
        f"0000{i}.{e}" for i in range(3) for e in ("parquet", "tar")
    ]
    r = runner.invoke(
        app,
        [
            "ingest",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "ds"),
            "--resolution",
            "64",
            "--shard-size",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "accepted" in r.output and "24" in r.output
    manifest = verify(str(tmp_path / "ds"))
    assert manifest["counts"]["accepted"] == 24 and len(manifest["shards"]) == 3
    urls = [str(tmp_path / "ds" / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert all(s["json"]["license"] == "CC0-1.0" for s in samples)
    # the ingested 64x64 images still show what their captions say
    assert faithfulness([s["png"] for s in samples], [s["txt"] for s in samples]) >= 0.95

    # the dataset is immutable: refused without --overwrite, replaced with it
    ingest_again = ["ingest", str(tmp_path / "raw"), "--out", str(tmp_path / "ds")]
    r = runner.invoke(app, [*ingest_again, "--resolution", "64"])
    assert r.exit_code == 1 and "already holds dataset" in r.output
    assert verify(str(tmp_path / "ds")) == manifest
    r = runner.invoke(
        app,
        [*ingest_again, "--resolution", "32", "--shard-size", "12", "--overwrite"]
        + ["--max-file-bytes", "100000", "--allow-root", str(tmp_path)]
        + ["--eval-fraction", "0.25", "--eval-max", "2"],
    )
    assert r.exit_code == 0, r.output
    replaced = verify(str(tmp_path / "ds"))
    assert replaced["resolution"] == 32 and len(replaced["shards"]) == 2
    assert replaced["validation"]["max_file_bytes"] == 100000
    # the evaluation split: by the key hash, capped at --eval-max, in its own shards
    keys = [s["__key__"] for s in samples]
    held = [k for k in keys if in_eval_split(k, 0.25)][:2]
    assert len(held) == 2 and "evaluation split" in r.output
    split = replaced["split"]
    assert (split["eval_fraction"], split["eval_max"], split["eval"]) == (0.25, 2, 2)
    assert split["train"] + split["eval"] == replaced["counts"]["accepted"] == 24
    assert [s["name"] for s in replaced["eval_shards"]] == ["eval-000000.tar"]
    ev = wds.WebDataset([str(tmp_path / "ds" / "eval-000000.tar")], shardshuffle=False)
    assert [s["__key__"] for s in ev] == held
    assert not (tmp_path / "ds" / "shard-000002.tar").exists()

    r = runner.invoke(app, ["ingest", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1
    assert "does not exist" in r.output


def test_prefect_flow_under_the_test_harness(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from diffusion_core.data.shapes import write_shapes
    from flows.ingest import ingest_flow

    write_shapes(tmp_path / "raw", 12, seed=2, size=64, shard_size=6)
    params = IngestConfig(sources=[str(tmp_path / "raw")], out=str(tmp_path / "ds"), shard_size=5)
    with prefect_test_harness():
        result = ingest_flow(params)
        assert result["accepted"] == 12 and result["rejected"] == 0
        assert len(result["shards"]) == 3
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts()
        summary = [a for a in arts if a.key == "ingest-summary"]
        assert summary and "| accepted | 12 |" in summary[0].data
        # a bad source fails the flow with a clear message, without retries
        state = ingest_flow(
            IngestConfig(sources=[str(tmp_path / "none")], out=str(tmp_path / "x")),
            return_state=True,
        )
        assert state.is_failed()
        with pytest.raises(Exception, match="does not exist"):
            state.result()
