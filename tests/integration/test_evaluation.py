"""``evaluate`` and ``cascade evaluate`` end to end on tiny data: a tiny (untrained) cascade, the
built-in shapes ingested with an evaluation split, the real offline Inception. Checks what is
read (only the evaluation split), what is reported, that it is deterministic, that reference
features are cached, and the command line's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from diffusion_core.cascade import Cascade
from diffusion_core.data.format import DataError, read_manifest
from diffusion_core.data.ingest import IngestConfig, ingest
from diffusion_core.data.shapes import write_shapes
from diffusion_core.evaluation import EvalReport, EvalSettings, evaluate
from diffusion_core.evaluation.heldout import HeldOutTextEncoder, read_heldout
from diffusion_core.training.reader import ShardReader
from tests import data_fixtures as F

pytestmark = pytest.mark.integration

SETTINGS = EvalSettings(num_samples=4, steps=2, batch_size=3, nll_samples=2)


def _ingest(sources: list[str], out: Path, **kw) -> Path:
    cfg = dict(
        sources=sources,
        out=str(out),
        resolution=16,
        min_size=16,
        shard_size=8,
        text_encoder="hash-test",
        max_tokens=8,
        eval_fraction=0.3,
    )
    ingest(IngestConfig(**{**cfg, **kw}), engine="local")
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    write_shapes(root / "raw", 30, seed=4, size=32, shard_size=30)
    return _ingest([str(root / "raw")], root / "data")


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory) -> Path:
    from diffusion_core.training import load_preset

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval-cascade")
    Cascade.from_config(load_preset("tiny").cascade).save(out)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def first(cascade_dir, data, cache, tmp_path_factory):
    parts: list[tuple[str, int, int]] = []
    grid = tmp_path_factory.mktemp("eval-grid") / "grid.png"
    report = evaluate(
        cascade_dir,
        data,
        SETTINGS,
        cache_dir=cache,
        grid=grid,
        progress=lambda *p: parts.append(p),
    )
    return report, parts, grid


def test_the_report_has_every_metric_of_the_contract(first, data):
    report, parts, grid = first
    info = read_manifest(str(data))
    assert report.dataset_version == info.version and report.split == "eval"
    m = report.metrics
    for key in ("kid", "kid_std", "fid", "nll_bpd_base", "nll_bpd_sr1", "faithfulness"):
        assert key in m and np.isfinite(m[key]), key
    assert m["num_samples"] == 4 and m["seconds_per_image"] > 0
    assert m["fid"] > 0 and m["kid"] > m["kid_std"]  # noise images vs shapes
    assert 0 <= m["faithfulness"] <= 1 and 0 <= report.details["faithfulness_real"] <= 1
    assert m["nll_bpd_base"] > 0 and m["nll_bpd_sr1"] > 0
    assert report.details["text_embeddings"] == "precomputed"
    assert report.details["reference_cache"]["status"] == "computed"
    assert report.details["inception_seconds_per_image"] > 0
    assert {"load", "sample", "features", "kid", "fid", "nll_base", "total"} <= set(report.seconds)
    assert {p[0] for p in parts} >= {"read", "sample", "features", "nll base", "nll sr1"}
    assert ("sample", 4, 4) in parts
    assert grid.is_file() and report.details["grid"] == str(grid)
    assert EvalReport.model_validate_json(report.model_dump_json()) == report


def test_only_the_evaluation_split_is_read(first, data):
    report, _, _ = first
    info = read_manifest(str(data))
    eval_keys = [s.key for s in ShardReader(info.eval_split()).samples]
    train_keys = {s.key for s in ShardReader(info).samples}
    assert report.details["keys"] == eval_keys[:4]
    assert not set(report.details["keys"]) & train_keys
    assert report.details["eval_samples_available"] == len(eval_keys)


def test_the_same_inputs_give_the_same_report_and_reuse_the_reference(
    first, cascade_dir, data, cache
):
    report, _, _ = first
    again = evaluate(
        cascade_dir, data, SETTINGS.model_copy(update={"batch_size": 4}), cache_dir=cache
    )
    timing = {"seconds_per_image"}
    assert {k: v for k, v in again.metrics.items() if k not in timing} == pytest.approx(
        {k: v for k, v in report.metrics.items() if k not in timing}, rel=1e-6, abs=1e-9
    )
    assert again.identity == report.identity  # batch_size is not part of it
    assert again.details["reference_cache"] == {
        **report.details["reference_cache"],
        "status": "hit",
        "computed": 0,
    }
    # another seed: other samples, another report
    other = evaluate(
        cascade_dir,
        data,
        SETTINGS.model_copy(update={"seed": 1, "metrics": ("kid",)}),
        cache_dir=cache,
    )
    assert other.metrics["kid"] != report.metrics["kid"] and other.identity != report.identity
    assert set(other.metrics) == {"kid", "kid_std", "num_samples", "seconds_per_image"}


def test_precomputed_embeddings_equal_the_cascades_encoder(data, cascade_dir):
    from diffusion_core.text import load_text_encoder

    held = read_heldout(read_manifest(str(data)), 4)
    pre = HeldOutTextEncoder(held, encoder_id="hash-test-384", max_tokens=8).encode(held.captions)
    enc = load_text_encoder("hash-test", max_tokens=8).encode(held.captions)
    assert torch.equal(pre.mask, enc.mask)
    assert torch.allclose(pre.pooled, enc.pooled)
    assert torch.allclose(pre.tokens, enc.tokens, atol=2e-3)  # stored as float16
    # a cascade that keeps more token states than the dataset: its own encoder is used
    cfg = Cascade.load(cascade_dir).config.model_copy(update={"text_max_tokens": 16})
    from diffusion_core.evaluation.evaluator import _text_source

    assert _text_source(Cascade.from_config(cfg), held.info) == "encoder"


def test_a_dataset_that_is_not_the_shapes_data_gets_no_faithfulness(cascade_dir, tmp_path, cache):
    src = tmp_path / "folder"
    src.mkdir()
    for i in range(12):
        (src / f"img{i:02d}.png").write_bytes(F.png((32, 32), (20 * i, 100, 200)))
        (src / f"img{i:02d}.txt").write_text(f"a photo of colour number {i}")
    d = _ingest([str(src)], tmp_path / "data", eval_fraction=0.5)
    assert read_manifest(str(d)).num_eval_samples >= 2
    s = EvalSettings(num_samples=2, steps=1, metrics=("kid", "faithfulness"))
    report = evaluate(cascade_dir, d, s, cache_dir=cache)
    assert "faithfulness" not in report.metrics and "kid" in report.metrics
    assert "not computed" in report.details["faithfulness"]


def test_unusable_datasets_are_refused_clearly(cascade_dir, data, tmp_path):
    write_shapes(tmp_path / "raw", 12, seed=1, size=32, shard_size=12)
    none = _ingest([str(tmp_path / "raw")], tmp_path / "none", eval_fraction=0.0)
    with pytest.raises(DataError, match="no evaluation split"):
        evaluate(cascade_dir, none, SETTINGS)
    small = _ingest([str(tmp_path / "raw")], tmp_path / "small", resolution=8, min_size=8)
    with pytest.raises(DataError, match="resolution mismatch"):
        evaluate(cascade_dir, small, SETTINGS)


def _app() -> typer.Typer:
    from diffusion_core.evaluation.cli import evaluate_command

    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("noop")(lambda: None)  # two commands: `evaluate` stays a subcommand
    return app


def test_the_command_prints_the_report_as_its_last_line(cascade_dir, data, cache, tmp_path):
    out = tmp_path / "eval" / "report.json"
    args = ["evaluate", "--cascade", str(cascade_dir), "--data", str(data)]
    args += ["--num-samples", "3", "--steps", "1", "--metrics", "kid,faithfulness"]
    args += ["--cache-dir", str(cache), "--out", str(out)]
    r = CliRunner().invoke(_app(), args)
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    report = EvalReport.model_validate_json(last)
    assert report.metrics["num_samples"] == 3 and "kid" in report.metrics
    assert json.loads(out.read_text()) == json.loads(last)
    assert (tmp_path / "eval" / "report.grid.png").is_file()
    bad = CliRunner().invoke(_app(), [*args[:5], "--metrics", "kid,clip"])
    assert bad.exit_code == 2 and "unknown metrics" in bad.output
