"""The deployments end to end against real services started here (infra/local/services.py): an
MLflow server, a Prefect server and a process worker on `cascade-process`. `prefect deploy --all`
from this checkout, then `prefect deployment run 'retrain/nightly' --watch` at the tiny preset
(Completed; the registry holds version 1 as champion and challenger), then the same run again:
the same dataset, no second version. (With the deployment's default warm_start=true a second
run trains a refined version from the champion instead, which the gate then judges.)

Then the failure paths: the worker killed mid-run (every process of it, SIGKILL: a lost machine)
leaves the flow run Running until the zombie automation of infra/prefect/automations.yaml marks
it Crashed (no heartbeat); a new run with the same parameters completes and its training resumes
from the checkpoints. And the `cascade.dataset.created` event of an ingest run creates a nightly
run through the deployment trigger (the pool is paused, so the triggered run is only inspected
and cancelled)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from infra.local.services import Ports, Services, _family, _request, free_port

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


@pytest.fixture(scope="module")
def deployed(services):
    """`prefect deploy --all` from this checkout; `services up` created the shipped zombie
    automation, and a copy with its window shortened from 90 s to 45 s keeps the test short (still
    over one 30 s heartbeat)."""
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
    status, body = _request(f"{svc.prefect_api_url}/automations/filter", body={})
    assert status == 200 and "crash-zombie-flow-runs" in {a["name"] for a in json.loads(body)}
    spec = yaml.safe_load((ROOT / "infra/prefect/automations.yaml").read_text())
    for automation in spec["automations"]:
        automation["name"] += "-45s"
        automation["trigger"]["within"] = 45
    (root / "automations.yaml").write_text(yaml.safe_dump(spec))
    made = _prefect(["automation", "create", "--from-file", str(root / "automations.yaml")], env, 60)
    assert made.returncode == 0 and "Failed" not in made.stdout, made.stdout + made.stderr
    return env


TINY = [
    "-p", 'preset="tiny"',
    "-p", "warm_start=false",  # a warm start would (rightly) train a refined version
    "-p", "sample_count=2",
    "-p", "eval_fraction=0.1",
    "-p", "evaluation=" + json.dumps({"num_samples": 4, "nll_samples": 2, "steps": 4,
                                      "metrics": ["kid"]}),
]  # fmt: skip


def test_deploy_all_then_run_the_nightly_retrain_twice(services, deployed):
    from mlflow.tracking import MlflowClient

    svc, root = services
    env = deployed
    for name in ("retrain/nightly", "ingest/ingest", "train-cascade/train-cascade"):
        shown = _prefect(["deployment", "inspect", name], env, 60)
        assert shown.returncode == 0, f"{name}: {shown.stderr[-1000:]}"
    nightly = _prefect(["deployment", "inspect", "retrain/nightly"], env, 60).stdout
    assert "'active': False" in nightly and "0 3 * * *" in nightly  # shipped inactive
    params = TINY
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


def _registered_checkpoint(run_dir: Path) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_0" in snapshot.read_text()
    except OSError:
        return False


def _client(svc: Services):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings({PREFECT_API_URL: svc.prefect_api_url})
    settings.__enter__()
    return get_client(sync_client=True), settings


def _wait_state(client, run_id, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(run_id).state
        if state is not None and state.type.value in states:
            return state.type.value
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not in {states} after {timeout:.0f} s: {state}")


def _run_ids(client, deployment_id) -> set:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    return {r.id for r in runs}


def test_a_killed_worker_crashes_the_run_and_a_new_run_resumes_from_checkpoints(
    services, deployed
):
    from prefect.deployments import run_deployment

    svc, root = services
    params = {
        "preset": "tiny", "warm_start": False, "sample_count": 2, "eval_fraction": 0.1,
        "evaluation": {"num_samples": 4, "nll_samples": 2, "steps": 4, "metrics": ["kid"]},
        # long enough to be killed between checkpoints
        "overrides": {"*": {"steps": 600, "checkpoint_every": 40, "log_every": 40}},
    }  # fmt: skip
    runs = root / "data" / "work" / "runs"
    before = {p.name for p in runs.iterdir()}
    client, settings = _client(svc)
    try:
        first = run_deployment("retrain/nightly", parameters=params, timeout=0)
        deadline = time.monotonic() + 420
        checkpointed = None
        while checkpointed is None and time.monotonic() < deadline:
            new = [p for p in runs.iterdir() if p.name not in before and p.is_dir()]
            # a checkpoint Ray Train has registered (its snapshot), not only a folder being written
            checkpointed = next((p for p in new if _registered_checkpoint(p)), None)
            time.sleep(1)
        assert checkpointed is not None, "no checkpoint written in time"
        assert not (checkpointed / "summary.json").exists(), "finished before the kill"
        worker = svc.running("prefect-worker")
        family = _family(worker)
        for pid in family:  # the machine is gone: the worker, the flow run, its Ray
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert _wait_state(client, first.id, {"CRASHED"}, 240) == "CRASHED"
        svc.up(timeout=180)  # a new worker
        second = run_deployment("retrain/nightly", parameters=params, timeout=900)
        assert second.state.type.value == "COMPLETED", second.state
    finally:
        settings.__exit__(None, None, None)
    summary = json.loads((checkpointed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 600
    starts = [a["start_step"] for a in summary["attempts"]]
    assert len(starts) >= 2 and starts[0] == 0 and starts[-1] > 0, starts  # resumed, not redone


def test_a_new_dataset_event_creates_a_nightly_run(services, deployed):
    svc, root = services
    env = deployed
    client, settings = _client(svc)
    try:
        nightly = client.read_deployment_by_name("retrain/nightly")
        before = _run_ids(client, nightly.id)
        paused = _prefect(["work-pool", "pause", "cascade-process"], env, 60)
        assert paused.returncode == 0, paused.stderr
        code = (
            "import sys; from flows.ingest import ingest_flow; "
            "from diffusion_core.data.ingest import IngestConfig; "
            "ingest_flow(IngestConfig(sources=[sys.argv[1]], out=sys.argv[2], resolution=32))"
        )
        ingested = subprocess.run(
            [sys.executable, "-c", code, str(root / "data" / "raw"), str(root / "ingested")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ingested.returncode == 0, ingested.stdout[-2000:] + ingested.stderr[-3000:]
        deadline = time.monotonic() + 90
        created = set()
        while not created and time.monotonic() < deadline:
            created = _run_ids(client, nightly.id) - before
            time.sleep(2)
        assert len(created) == 1, "the trigger created one nightly run"
        (run_id,) = created
        from prefect.states import Cancelled

        client.set_flow_run_state(run_id, Cancelled(), force=True)
        assert _wait_state(client, run_id, {"CANCELLED"}, 60) == "CANCELLED"
    finally:
        _prefect(["work-pool", "resume", "cascade-process"], env, 60)
        settings.__exit__(None, None, None)
