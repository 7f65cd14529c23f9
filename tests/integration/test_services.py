"""The local services (infra/local/services.py) for real: MLflow with basic auth, a Prefect server
with an auth string and a worker of the `cascade-process` pool, a Ray head with token auth, all
on loopback; then `down`, which must leave no process behind.

One set of services for the module (~15-30 s to start here). Client calls run in subprocesses
whose only configuration is the environment a user would export (`Services.client_env`), so
what is tested is what `eval "$(services.py env)"` gives a shell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local.services import POOL, WORKER_NAME, Ports, Services, _family, _pid_alive, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "local" / "services.py"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    state = tmp_path_factory.mktemp("services") / "state"
    ports = Ports(**{name: free_port() for name in Ports.__dataclass_fields__})
    svc = Services(state, auth=True, ray=True, ports=ports, echo=lambda line: None)
    try:
        svc.up(timeout=240)
        yield svc
    finally:
        svc.down()
        ray_tmp = svc._ray_temp_dir()  # outside the state folder when its path is long
        if svc.state not in ray_tmp.parents:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any MLflow / Prefect / Ray client settings, plus
    ``extra``: a subprocess configured only by what a user would export."""
    drop = ("MLFLOW_", "PREFECT_API", "RAY_ADDRESS", "RAY_AUTH", "RAY_API_SERVER")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    home = Path(extra["HOME"])  # an empty home: no ~/.ray/auth_token, no ~/.prefect profile
    home.mkdir(exist_ok=True)
    env["PREFECT_HOME"] = str(home / ".prefect")
    return {**env, **extra}


def _run(
    code: str, services: Services, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess:
    env = {**env, "HOME": str(services.state.parent / "home")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env=_clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _status_code(url: str, *, body: dict | None = None, headers: dict | None = None) -> int:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_up_is_healthy_idempotent_and_reported_by_the_cli(services):
    status = services.status()
    assert set(status) == {"mlflow", "prefect-server", "prefect-worker", "ray"}
    assert all(s["healthy"] for s in status.values()), status
    again = Services(services.state, echo=lambda line: None)  # flags from services.json
    assert again.config == services.config
    assert set(again.up(timeout=60).values()) == {"already running"}
    cli = subprocess.run(
        [sys.executable, str(SCRIPT), "status", "--json", "--state", str(services.state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert all(s["healthy"] for s in json.loads(cli.stdout).values())


def test_without_credentials_the_apis_answer_401(services):
    env = services.client_env()
    mlflow, prefect = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]
    assert _status_code(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    wrong = {"Authorization": "Basic YWRtaW46d3Jvbmc="}  # admin:wrong
    assert (
        _status_code(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", headers=wrong)
        == 401
    )
    assert _status_code(f"{prefect}/flows/filter", body={}) == 401
    assert _status_code(f"{prefect}/flows/filter", body={}, headers=wrong) == 401
    assert _status_code(f"{env['RAY_API_SERVER_ADDRESS']}/api/jobs/") == 401
    # health stays open (what the health checks and probes use)
    assert _status_code(f"{mlflow}/health") == 200
    assert _status_code(f"{prefect}/health") == 200


CLIENT_CALLS = r"""
import asyncio, json, mlflow
from mlflow import MlflowClient
from prefect.client.orchestration import get_client

mlflow.set_experiment("services-check")
with mlflow.start_run() as run:
    mlflow.log_param("p", 1)
    mlflow.log_metric("loss", 0.5)
    mlflow.log_text("proxied through the server", "notes/a.txt")
client = MlflowClient()
got = client.get_run(run.info.run_id)

async def prefect_calls():
    async with get_client() as pc:
        pool = await pc.read_work_pool("POOL")
        workers = await pc.read_workers_for_work_pool("POOL")
        flow_id = await pc.create_flow_from_name("services-check")
        return pool.type, [w.name for w in workers], str(flow_id)

pool_type, workers, flow_id = asyncio.run(prefect_calls())
print(json.dumps({
    "metrics": got.data.metrics,
    "artifacts": [f.path for f in client.list_artifacts(run.info.run_id, "notes")],
    "artifact_uri": got.info.artifact_uri,
    "pool_type": pool_type, "workers": workers, "flow_id": flow_id,
}))
""".replace("POOL", POOL)


def test_with_credentials_the_mlflow_and_prefect_clients_work(services):
    out = _run(CLIENT_CALLS, services, services.client_env())
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["metrics"] == {"loss": 0.5}
    assert got["artifacts"] == ["notes/a.txt"]
    assert got["artifact_uri"].startswith("mlflow-artifacts:")  # proxied, not a local path
    stored = list((services.state / "mlflow" / "artifacts").rglob("a.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "proxied through the server"
    assert got["pool_type"] == "process"
    assert WORKER_NAME in got["workers"]
    assert got["flow_id"]


RAY_JOB = r"""
import json, os, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"])
job = client.submit_job(
    entrypoint="python -c \"import ray; ray.init(); print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))\""
)
deadline = time.time() + 120
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.time() < deadline, "job did not finish"
    time.sleep(0.5)
print(json.dumps({"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}))
"""


def test_a_ray_job_submission_with_token_auth(services):
    env = services.client_env()
    assert env["RAY_AUTH_MODE"] == "token"
    out = _run(RAY_JOB, services, env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["status"].endswith("SUCCEEDED"), got
    assert "answer 42" in got["logs"]
    # the same submission without the token is refused
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = _run(RAY_JOB, services, {**no_token, "RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert refused.returncode != 0


def test_no_credential_in_the_state_folder_outside_secrets(services):
    """Logs (ours and Ray's), stores and configs: no generated credential appears anywhere."""
    values = services.secrets.values()
    assert len(values) == 4  # mlflow admin password, flask key, prefect auth string, ray token
    folders = [services.state, services._ray_temp_dir()]
    leaks = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file() or services.secrets.folder in path.parents:
                continue
            data = path.read_bytes()
            leaks += [str(path) for v in values if v.encode() in data]
    assert leaks == []
    env_out = services.env_script()
    assert not any(v in env_out for v in values)
    assert all(k in env_out for k in services.client_env())
    for name in ("mlflow_admin_password", "prefect_auth_string", "ray_auth_token"):
        assert (services.secrets.path(name).stat().st_mode & 0o777) == 0o600
    assert (services.secrets.folder.stat().st_mode & 0o777) == 0o700


def test_down_leaves_no_process_behind(services):
    records = [services.record(n) for n in services.names()]
    assert all(records)
    family = {pid: ticks for rec in records for pid, ticks in _family(rec).items()}
    assert len(family) >= 8  # leaders, their workers, Ray's processes
    result = services.down()
    assert set(result.values()) == {"stopped"}
    alive = [pid for pid, ticks in family.items() if _pid_alive(pid, ticks)]
    assert alive == []
    assert not list((services.state / "pids").iterdir())
    assert not any(s["running"] for s in services.status().values())
    assert set(services.down().values()) == {"not running"}  # twice is fine
