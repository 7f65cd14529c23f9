"""The retrain flow on Prefect's ephemeral API at the tiny preset: the whole pipeline once, then
again with the same data (nothing recomputed, no duplicate version), then warm-started: on the
champion's own dataset that does nothing unless ``retrain_unchanged`` asks for a refinement."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("retrain")
    mp.setenv("PREFECT_HOME", str(root / "prefect"))
    mp.setenv("CASCADE_EVAL_CACHE", str(root / "eval-cache"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    from diffusion_core.data.shapes import write_shapes

    write_shapes(root / "raw", 80, seed=1, size=32, shard_size=40)
    yield root
    mp.undo()


def params(root: Path, **kw):
    from diffusion_core.evaluation.report import EvalSettings
    return dict(
        sources=[str(root / "raw")],
        workdir=str(root / "work"),
        preset="tiny",
        evaluation=EvalSettings(num_samples=4, nll_samples=2, steps=4, metrics=("kid", "nll")),
        sample_count=3,
        eval_fraction=0.1,
        **kw,
    )


def test_the_pipeline_runs_then_a_rerun_with_the_same_data_reuses_everything(ray_local, env):
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain_flow

    with prefect_test_harness():
        first = retrain_flow(**params(env))
        t0 = time.perf_counter()
        second = retrain_flow(**params(env))
        rerun_s = time.perf_counter() - t0
    assert first.model_version == "1" and first.promoted
    client = MlflowClient(f"sqlite:///{env / 'work' / 'runs' / 'mlflow.db'}")
    aliases = client.get_registered_model("cascade-diffusion").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "1"}
    summary = json.loads((Path(first.samples) / "summary.json").read_text())
    assert summary["images"] == 3 and (Path(first.samples) / "contact_sheet.png").is_file()
    assert Path(first.report).is_file() and "Version 1" in Path(first.report).read_text()
    # the same data again: the same dataset, the same runs, the same version, nothing sampled
    assert second.dataset_version == first.dataset_version and second.model_version == "1"
    assert len(client.search_model_versions("name='cascade-diffusion'")) == 1
    runs = client.search_runs(
        [client.get_experiment_by_name("cascade-train").experiment_id]
    )
    assert len(runs) == 2, "one training run per stage, reused by the second flow run"
    assert len(list((env / "work" / "datasets").iterdir())) == 1
    print(f"second run (no new data): {rerun_s:.0f} s")


@pytest.mark.slow
def test_a_warm_start_trains_from_the_champion(ray_local, env):
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain_flow

    with prefect_test_harness():
        if not (env / "work" / "runs" / "mlflow.db").exists():
            retrain_flow(**params(env))
        client = MlflowClient(f"sqlite:///{env / 'work' / 'runs' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("cascade-train").experiment_id
        runs_before = len(client.search_runs([exp]))
        # the champion was trained on this very dataset: a warm start has nothing new to learn
        idle = retrain_flow(**params(env, warm_start=True, overrides={"*": {"steps": 4}}))
        assert idle.model_version == "1" and not idle.promoted and "no new data" in idle.reason
        assert len(client.search_runs([exp])) == runs_before, "nothing trained"
        warm = retrain_flow(
            **params(env, warm_start=True, retrain_unchanged=True, overrides={"*": {"steps": 4}})
        )
    assert warm.model_version == "2"
    warm_runs = [r for r in client.search_runs([exp]) if r.data.params.get("steps") == "4"]
    assert len(warm_runs) == 2
    assert all("models" in r.data.params["init_weights"] for r in warm_runs)
