"""The deployments end to end against real services started here (infra/local/services.py): an
MLflow server, a Prefect server and a process worker on `cascade-process`. `prefect deploy --all`
from this checkout, then `prefect deployment run 'retrain/nightly' --watch` at the tiny preset
(Completed; the registry holds version 1 as champion and challenger), then the same run again:
the same dataset, no second version. (With the deployment's default warm_start=true a second
run trains a refined version from the champion instead, which the gate then judges.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local.services import Ports, Services, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    mp = pytest.MonkeyPatch()
    mp.setenv("CASCADE_EVAL_CACHE", str(root / "eval-cache"))  # the worker inherits it
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL"):
        mp.delenv(k, raising=False)
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    svc = Services(root / "state", auth=False, ray=False, ports=ports, echo=lambda line: None)
    try:
        svc.up(timeout=240)
        yield svc, root
    finally:
        svc.down()
        mp.undo()


def _prefect(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    prefect = str(Path(sys.executable).with_name("prefect"))
    return subprocess.run(
        [prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_deploy_all_then_run_the_nightly_retrain_twice(services):
    from mlflow.tracking import MlflowClient

    from diffusion_core.data.shapes import write_shapes

    svc, root = services
    write_shapes(root / "data" / "raw", 80, seed=1, size=32, shard_size=40)
    env = {
        **os.environ,
        **svc.client_env(),
        "PREFECT_HOME": str(root / "cli-prefect"),
        "CASCADE_REPO": str(ROOT),
        "CASCADE_DATA_ROOT": str(root / "data"),
    }
    deployed = _prefect(["--no-prompt", "deploy", "--all"], env, 240)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    for name in ("retrain/nightly", "ingest/ingest", "train-cascade/train-cascade"):
        shown = _prefect(["deployment", "inspect", name], env, 60)
        assert shown.returncode == 0, f"{name}: {shown.stderr[-1000:]}"
    nightly = _prefect(["deployment", "inspect", "retrain/nightly"], env, 60).stdout
    assert "'active': False" in nightly and "0 3 * * *" in nightly  # shipped inactive
    params = [
        "-p", 'preset="tiny"',
        "-p", "warm_start=false",  # a warm start would (rightly) train a refined version
        "-p", "sample_count=2",
        "-p", "eval_fraction=0.1",
        "-p", "evaluation=" + json.dumps({"num_samples": 4, "nll_samples": 2, "steps": 4,
                                          "metrics": ["kid"]}),
    ]  # fmt: skip
    client = MlflowClient(svc.mlflow_url)
    for attempt in (1, 2):
        run = _prefect(["deployment", "run", "retrain/nightly", *params, "--watch"], env, 900)
        assert run.returncode == 0, f"run {attempt}: " + run.stdout[-4000:] + run.stderr[-2000:]
        assert "Completed" in run.stdout
        versions = client.search_model_versions("name='cascade-diffusion'")
        assert [v.version for v in versions] in (["1"], [1]), "no duplicate version"
    aliases = {k: str(v) for k, v in client.get_registered_model("cascade-diffusion").aliases.items()}
    assert aliases == {"champion": "1", "challenger": "1"}
    datasets = list((root / "data" / "work" / "datasets").iterdir())
    assert len(datasets) == 1, "the second run reused the dataset"
    shutil.rmtree(root / "data" / "work" / "models", ignore_errors=True)
