"""Training jobs end to end: real local Ray Train (2 CPU workers, gloo DDP), real shards written by
the real ingest (built-in shapes, hash text encoder), real MLflow on sqlite. The ``tiny`` preset:
8 steps of an 8px base and an 8→16px super-resolution stage, checkpoints every 4 steps.

The module shares one dataset, one storage folder (one MLflow store) and two reference runs
(``base`` and ``sr1`` trained straight through), against which resume and fault recovery are
compared weight for weight.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffusion_core.training import (
    ConfigError,
    DataError,
    NonFiniteLossError,
    load_preset,
    train,
)

pytestmark = pytest.mark.integration

PRESET = load_preset("tiny")


def _tracking(storage: Path) -> str:
    return f"sqlite:///{storage}/mlflow.db"


@pytest.fixture(autouse=True)
def _no_external_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="module")
def shapes_raw(tmp_path_factory) -> Path:
    from diffusion_core.data.shapes import write_shapes

    raw = tmp_path_factory.mktemp("raw")
    write_shapes(raw, 64, seed=1, size=32, shard_size=32)
    return raw


def _ingest(raw: Path, out: Path, resolution: int) -> Path:
    from diffusion_core.data.ingest import IngestConfig, ingest

    cfg = IngestConfig(
        sources=[str(raw)],
        out=str(out),
        resolution=resolution,
        min_size=16,
        shard_size=24,
        text_encoder="hash-test",
        max_tokens=8,
        eval_fraction=0.0,  # these tests are about training: every sample in the training split
    )
    ingest(cfg, engine="local")
    return out


@pytest.fixture(scope="module")
def data(shapes_raw, tmp_path_factory) -> Path:
    """64 shapes at 16px in three shards (24, 24, 16 samples)."""
    return _ingest(shapes_raw, tmp_path_factory.mktemp("data"), 16)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cascade")


def _cfg(stage: str, storage: Path, **kw):
    return PRESET.for_stage(stage, storage_path=str(storage), **kw)


@pytest.fixture(scope="module")
def base_run(ray_local, data, storage, export_dir):
    return train(_cfg("base", storage), str(data), export_dir=str(export_dir))


@pytest.fixture(scope="module")
def sr1_run(ray_local, data, storage, export_dir):
    return train(_cfg("sr1", storage), str(data), export_dir=str(export_dir))


@pytest.fixture(scope="module")
def cascade_dir(base_run, sr1_run, export_dir) -> Path:
    """The export folder once both stages are trained (whichever test asks first trains them)."""
    return export_dir


def _weights(checkpoint: str | None) -> dict[str, dict[str, torch.Tensor]]:
    assert checkpoint is not None
    d = Path(checkpoint)
    return {"model": load_file(d / "model.safetensors"), "ema": load_file(d / "ema.safetensors")}


def _max_diff(a: dict, b: dict) -> float:
    out = 0.0
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            out = max(out, (a[part][k] - b[part][k]).abs().max().item())
    return out


def _loss_history(storage: Path, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(_tracking(storage))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


# ============================================================================ bad configs
def test_bad_configs_fail_clearly_before_any_worker_starts(shapes_raw, data, storage, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"unknown stage 'sr9'.*\['base', 'sr1'\]"):
        PRESET.for_stage("sr9")
    with pytest.raises(DataError, match="does not exist.*cascade ingest"):
        train(_cfg("base", storage), str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json"):
        train(_cfg("base", storage), str(tmp_path / "empty"))
    small = _ingest(shapes_raw, tmp_path / "data8", 8)
    with pytest.raises(DataError, match=r"resolution mismatch.*16px.*8px.*--resolution 16"):
        train(_cfg("base", storage), str(small))
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(_cfg("base", storage, batch_size=128), str(data))
    with pytest.raises(ConfigError, match="batch_size=7 .* divisible by scaling.num_workers=2"):
        _cfg("base", storage, batch_size=7)
    with pytest.raises(ConfigError, match="no run 'nope' to resume"):
        train(_cfg("base", storage), str(data), resume="nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "training.json").write_text('{"cascade": {"stages": [{"name": "x"}]}}')
    with pytest.raises(ConfigError, match=r"already holds stages \['x'\] of a different cascade"):
        train(_cfg("base", storage), str(data), export_dir=str(tmp_path / "other"))
    assert time.perf_counter() - t0 < 20
    assert not any(p.name.startswith("base-") for p in storage.iterdir())

    runner = CliRunner()
    from diffusion_core.cli import app

    res = runner.invoke(app, ["train", "--stage", "sr9", "--data", str(data), "--config", "tiny"])
    assert res.exit_code == 2 and "unknown stage 'sr9'" in res.output
    res = runner.invoke(app, ["train", "--stage", "base", "--data", str(small), "--config", "tiny"])
    assert res.exit_code == 2 and "resolution mismatch" in res.output


# ============================================================================ a 2-worker run
def test_two_worker_run_exports_a_cascade_that_samples(base_run, storage, export_dir):
    from mlflow.tracking import MlflowClient

    from diffusion_core.cascade import Cascade

    r = base_run
    assert r.completed and r.step == 8 and r.steps == 8
    assert len(r.attempts) == 1 and len(r.attempts[0]["workers"]) == 2
    ckpts = sorted(p.name for p in Path(r.run_dir).glob("checkpoint_0*"))
    assert ckpts == ["checkpoint_00000004", "checkpoint_00000008"]
    state = json.loads((Path(r.checkpoint) / "state.json").read_text())
    assert state["step"] == 8 and state["dataset_version"] == r.dataset_version
    assert state["config"]["stage"] == "base" and state["epoch"] == 1.0
    assert not (Path(r.checkpoint) / "rng.safetensors").exists()  # nothing to restore

    cascade = Cascade.load(export_dir)
    assert cascade[0].name == "base"
    images = cascade.sample(["a small red circle", "two large blue squares"], steps=4)
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.uint8
    # the exported weights are the checkpoint's EMA
    exported = load_file(export_dir / "stages" / "base" / "model.safetensors")
    ema = load_file(Path(r.checkpoint) / "ema.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    lineage = json.loads((export_dir / "training.json").read_text())["stages"]["base"]
    assert lineage["run_name"] == r.run_name and lineage["dataset_version"] == r.dataset_version

    client = MlflowClient(_tracking(storage))
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_version"] == r.dataset_version
    assert run.data.params["stage"] == "base"
    assert run.data.params["stage_config.network.base_channels"] == "8"
    assert {"loss", "grad_norm", "lr", "img_per_s"} <= set(run.data.metrics)
    assert [s for s, _ in _loss_history(storage, r.mlflow_run_id)] == [2, 4, 6, 8]
    samples = [a.path for a in client.list_artifacts(r.mlflow_run_id, "samples")]
    assert samples == ["samples/base_step0000008.png"]


def test_a_run_name_is_never_reused_by_accident(base_run, data, storage):
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        train(_cfg("base", storage), str(data), run_name=base_run.run_name)


# ============================================================================ resume
@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(sr1_run, data, storage, cascade_dir):
    from diffusion_core.cascade import Cascade

    half = train(_cfg("sr1", storage), str(data), stop_at=4, export_dir=None)
    assert not half.completed and half.step == 4
    resumed = train(resume=half.run_name, config=_cfg("sr1", storage), export_dir=None)
    assert resumed.completed and resumed.step == 8 and resumed.run_name == half.run_name
    assert [a["start_step"] for a in resumed.attempts] == [0, 4]
    diff = _max_diff(_weights(sr1_run.checkpoint), _weights(resumed.checkpoint))
    assert diff <= 1e-6, f"resumed weights differ from the straight run's by {diff}"
    # one MLflow run, each step logged once, with the straight run's losses
    straight = _loss_history(storage, sr1_run.mlflow_run_id)
    again = _loss_history(storage, resumed.mlflow_run_id)
    assert [s for s, _ in again] == [s for s, _ in straight] == [2, 4, 6, 8]
    assert [v for _, v in again] == pytest.approx([v for _, v in straight], abs=1e-6)
    # a finished run is not resumed again by accident (the CLI finds it by name)
    with pytest.raises(ConfigError, match="already completed its 8 steps"):
        train(resume=half.run_name, config=_cfg("sr1", storage))
    from diffusion_core.cli import app

    res = CliRunner().invoke(app, ["train", "--resume", half.run_name, "--storage", str(storage)])
    assert res.exit_code == 2 and "already completed" in res.output
    # both stages are in the export folder: the whole cascade samples
    cascade = Cascade.load(cascade_dir)
    assert [s.name for s in cascade] == ["base", "sr1"]
    assert cascade.sample(["a small red circle"], steps=3).shape == (1, 16, 16, 3)


def test_a_failed_export_closes_the_run_and_a_resume_exports_again(data, storage, tmp_path):
    """Defect: an export that raised left the MLflow run RUNNING and no summary.json, and a retry
    then resumed a finished run. Here another cascade's stages land in the export folder while
    the run trains (two runs sharing a folder), so the export refuses to mix them."""
    from mlflow.tracking import MlflowClient

    from diffusion_core.cascade import Cascade
    from diffusion_core.training import TrainingError
    from diffusion_core.training.runs import read_summary

    export = tmp_path / "cascade"
    export.mkdir()
    intruder = {"cascade": {"stages": [{"name": "other"}]}, "stages": {}}

    def someone_else_exports(progress: dict) -> None:
        (export / "training.json").write_text(json.dumps(intruder))

    cfg = _cfg("base", storage, steps=4, checkpoint_every=4)
    with pytest.raises(TrainingError, match="trained all 4 steps but exporting it") as e:
        train(cfg, str(data), export_dir=str(export), on_progress=someone_else_exports)
    name = str(e.value).split("'")[1]
    summary = read_summary(str(storage), name)
    assert summary is not None and summary.status == "export_failed" and summary.step == 4
    assert "different cascade" in summary.error
    run = MlflowClient(_tracking(storage)).get_run(summary.mlflow_run_id)
    assert run.info.status == "FAILED" and "different cascade" in run.data.tags["error"]
    # the other party is gone: resuming exports again, without training
    (export / "training.json").unlink()
    t0 = time.perf_counter()
    again = train(resume=name, config=cfg, export_dir=str(export))
    assert again.status == "completed" and again.export_dir == str(export)
    assert len(again.attempts) == 1, "no second training attempt"
    assert time.perf_counter() - t0 < 15
    assert [s.name for s in Cascade.load(export)] == ["base"]
    run = MlflowClient(_tracking(storage)).get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert json.loads((Path(again.run_dir) / "summary.json").read_text())["status"] == "completed"


# ============================================================================ faults
@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_repeated(
    base_run, data, storage, tmp_path
):
    marker = tmp_path / "killed"
    # rank 1 dies (os._exit, no clean-up) at step 6, 3 s after the step-4 checkpoint: long
    # enough for the Ray Train controller (polling every 2 s) to have registered it
    fault = {"kind": "exit", "step": 6, "rank": 1, "marker": str(marker), "delay_s": 3}
    r = train(_cfg("base", storage), str(data), fault=fault, export_dir=None)
    assert marker.exists(), "the fault was not injected"
    assert r.completed and r.step == 8
    assert [a["start_step"] for a in r.attempts] == [0, 4], "restarted from the step-4 checkpoint"
    diff = _max_diff(_weights(base_run.checkpoint), _weights(r.checkpoint))
    assert diff <= 1e-6, f"weights after recovery differ from the straight run's by {diff}"
    history = _loss_history(storage, r.mlflow_run_id)
    straight = _loss_history(storage, base_run.mlflow_run_id)
    assert [s for s, _ in history] == [s for s, _ in straight] == [2, 4, 6, 8]
    assert [v for _, v in history] == pytest.approx([v for _, v in straight], abs=1e-6)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_with_the_last_good_checkpoint(data, storage, tmp_path):
    fault = {"kind": "nan", "step": 6, "rank": 1, "marker": str(tmp_path / "unused")}
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6") as e:
        train(_cfg("base", storage), str(data), fault=fault, export_dir=None)
    assert "checkpoint (step 4) is intact" in str(e.value)
    run_dir = next(p for p in storage.iterdir() if (p / "nonfinite.json").exists())
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_00000004"]
    state = json.loads((run_dir / "checkpoint_00000004" / "state.json").read_text())
    assert state["step"] == 4


# ============================================================================ the Prefect flow
@pytest.mark.slow
def test_prefect_flow_trains_the_stages_concurrently(ray_local, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    from diffusion_core.cascade import Cascade
    from flows.train import train_cascade_flow

    overrides = {
        "storage_path": str(tmp_path / "runs"),
        "steps": 4,
        "scaling": {"num_workers": 1},  # 1 CPU per stage: both fit on 2 CPUs at once
    }
    with prefect_test_harness():
        results = train_cascade_flow(
            data=str(data), config="tiny", overrides=overrides, export_dir=str(tmp_path / "c")
        )
    assert set(results) == {"base", "sr1"}
    assert all(r["completed"] and r["step"] == 4 for r in results.values())
    # the two runs overlapped in time
    (a_start, a_end), (b_start, b_end) = (
        (r["attempts"][0]["time"], r["attempts"][0]["time"] + r["seconds"])
        for r in results.values()
    )
    assert a_start < b_end and b_start < a_end
    cascade = Cascade.load(tmp_path / "c")
    assert [s.name for s in cascade] == ["base", "sr1"]
    assert cascade.sample(["two small red circles"], steps=3).shape == (1, 16, 16, 3)


# ============================================================================ a 2-node cluster
# the `two_node_cluster` fixture: tests/integration/conftest.py (shared with test_ray_jobs.py)


@pytest.mark.slow
def test_workers_spread_over_two_nodes(two_node_cluster, data, storage):
    import subprocess
    import sys

    from diffusion_core.training.runs import TrainResult
    from diffusion_core.training.submit import RESULT_PREFIX, build_request, encode_request

    cfg = _cfg("base", storage, scaling={"placement_strategy": "STRICT_SPREAD"})
    request = build_request(
        cfg, str(data), resume=None, run_name=None, export_dir=None, stop_at=None, fault=None
    )
    env = {**two_node_cluster["env"], "RAY_ADDRESS": two_node_cluster["address"]}
    out = subprocess.run(
        [sys.executable, "-m", "diffusion_core.training.job", encode_request(request)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    r = TrainResult.model_validate_json(lines[-1][len(RESULT_PREFIX) :])
    assert r.completed and r.step == 8
    nodes = [w["node_id"] for w in r.attempts[0]["workers"]]
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"workers not spread: {nodes}"


@pytest.mark.slow
def test_cluster_mode_submits_through_the_jobs_api(two_node_cluster, data, storage, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_ADDRESS", two_node_cluster["dashboard"])
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    lines: list[str] = []
    from diffusion_core.training.submit import submit_train

    r = submit_train(_cfg("base", storage), str(data), export_dir=None, log=lines.append)
    assert r.completed and r.step == 8 and Path(r.run_dir).is_dir()
    assert any(line.startswith("step 8/8") for line in lines), lines[-20:]
    jobs = JobSubmissionClient(two_node_cluster["dashboard"]).list_jobs()
    assert any((j.metadata or {}).get("run_name") == r.run_name for j in jobs)
    run = MlflowClient(_tracking(storage)).get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ray_run_name"] == r.run_name
