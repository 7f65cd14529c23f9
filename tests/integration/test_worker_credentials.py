"""A local Ray this process started: its workers inherit the credentials, so none reaches Ray's
state. Ingest (an ``s3://`` source), a 2-worker training run and a batch job, all on a real S3
server (``tests/s3.py``), with the S3 secret key and an MLflow password in the driver's environment
before Ray starts; then the secrets are looked for in every actor's, task's and job's runtime env
(State API), in Ray Train's run state (the dashboard's Train API) and in every file of the Ray
session folder. A control value passed on purpose in a runtime env shows the look-ups see them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from diffusion_core import storage
from tests.integration.test_batch import make_cascade

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = r"""
import json, os, sys, urllib.request
import ray
from diffusion_core import ray_env, storage
from diffusion_core.batch import BatchConfig, SamplerSettings, run_batch
from diffusion_core.data.ingest import IngestConfig, ingest
from diffusion_core.training import load_preset, train

root, raw, cascade, prompts, tracking, control, out = sys.argv[1:]
secret = os.environ["AWS_SECRET_ACCESS_KEY"]

r = ingest(IngestConfig(sources=[raw], out=root + "/data", resolution=16, min_size=16,
                        shard_size=20, text_encoder="hash-test", max_tokens=8, eval_fraction=0.0))
assert r.accepted == 48, r
how, inherited = ray_env.attachment()
assert how == "started" and inherited["AWS_SECRET_ACCESS_KEY"] == secret
# the decision, on this real Ray: same value -> left out; set or changed after start -> passed
assert ray_env.worker_env_vars({"AWS_SECRET_ACCESS_KEY": secret}) == {}
assert ray_env.worker_env_vars({"AWS_SECRET_ACCESS_KEY": "x"}) == {"AWS_SECRET_ACCESS_KEY": "x"}
assert ray_env.worker_env_vars({"LATE_API_TOKEN": "y"}) == {"LATE_API_TOKEN": "y"}

cfg = load_preset("tiny").for_stage("base", storage_path=root + "/runs", tracking_uri=tracking)
t = train(cfg, root + "/data", export_dir=None)
assert t.status == "completed" and len(t.attempts[0]["workers"]) == 2, t

b = run_batch(BatchConfig(model=cascade, prompts=[prompts], out=root + "/samples",
                          settings=SamplerSettings(num_inference_steps=3)))
assert b.written == 4, b

# control: a value passed on purpose in a task's and an actor's runtime env
env = {"env_vars": {"CASCADE_CONTROL_VALUE": control}}
ray.get(ray.remote(lambda: 1).options(runtime_env=env).remote())
class A:
    def ping(self):
        return 1
a = ray.remote(A).options(runtime_env=env).remote()
ray.get(a.ping.remote())

from ray.util.state import list_actors, list_jobs, list_tasks
url = "http://" + ray._private.worker.get_dashboard_url()
kw = dict(address=url, detail=True, limit=10000, raise_on_missing_output=False)
state = {
    "actors": [str(x) for x in list_actors(**kw)],
    "tasks": [str(x) for x in list_tasks(**kw)],
    "jobs": [str(x) for x in list_jobs(**kw)],
}
with urllib.request.urlopen(url + "/api/train/v2/runs/v1", timeout=30) as resp:
    state["train"] = resp.read().decode()
with urllib.request.urlopen(url + "/api/jobs/", timeout=30) as resp:
    state["jobs_api"] = resp.read().decode()
with open(out, "w") as f:
    json.dump(state, f)
print("session", ray._private.worker._global_node.get_session_dir_path(), flush=True)
"""


def test_secrets_in_the_driver_env_before_ray_starts_reach_no_ray_state(s3, tmp_path, monkeypatch):
    for k, v in s3.env.items():  # for the upload from here
        monkeypatch.setenv(k, v)
    raw = tmp_path / "raw"
    from diffusion_core.data.shapes import write_shapes

    write_shapes(raw, 48, seed=3, size=32, shard_size=32)
    root = s3.prefix("creds")
    storage.upload_dir(raw, storage.join(root, "raw"))
    cascade = make_cascade(tmp_path / "cascade", 0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a red shape {i}\n" for i in range(4)))
    password = "mlflow-pw-" + secrets.token_hex(8)
    control = "control-" + secrets.token_hex(8)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(
        s3.env,
        MLFLOW_TRACKING_USERNAME="alice",
        MLFLOW_TRACKING_PASSWORD=password,
        RAY_TMPDIR=str(ray_tmp),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_ENABLE_STATE_TRACKING="1",  # the dashboard's Train runs, worker runtime env
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )
    out = tmp_path / "state.json"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, root, storage.join(root, "raw"), str(cascade),
             str(prompts), tracking, control, str(out)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        (tmp_path / "script.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-4000:]
        state = json.loads(out.read_text())
        for where in ("tasks", "actors"):
            assert control in json.dumps(state[where]), f"the control is not seen in {where}"
        assert "OMP_NUM_THREADS" in state["train"], "Ray Train's state shows no runtime env"
        found = [
            f"the {what} in Ray's {where} state"
            for value, what in ((s3.secret_key, "S3 secret key"), (password, "MLflow password"))
            for where, text in state.items()
            if value in json.dumps(text)
        ]  # (a list of places, not an `in` assertion: pytest would print part of the secret)
        assert found == []
        leaks = []
        files = 0
        for path in ray_tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                files += 1
                data = path.read_bytes()
                leaks += [f"{path} ({w})" for v, w in ((s3.secret_key, "s3"), (password, "mlflow"))
                          if v.encode() in data]  # fmt: skip
        assert files > 20, f"no session files under {ray_tmp}?"
        assert leaks == [], leaks
        assert (s3.secret_key in done.stdout + done.stderr) is False
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
