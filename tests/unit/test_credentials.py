"""No credential reaches a log, an MLflow param, a run file or Ray job metadata.

Defect: a tracking URI with ``user:password@`` was logged as an MLflow param and forwarded into
the Ray job's runtime environment and request."""

from __future__ import annotations

import json

import pytest

from diffusion_core.storage import redact, strip_credentials
from diffusion_core.training import load_preset
from diffusion_core.training.submit import build_request, build_runtime_env, encode_request
from diffusion_core.training.tracking import worker_env

SECRET = "s3cr3t-pw"
URI = f"http://alice:{SECRET}@127.0.0.1:5000"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (URI, "http://alice:***@127.0.0.1:5000"),
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://token@host/x", "https://***@host/x"),
        ("s3://bucket/p?X-Amz-Signature=abc&part=2", "s3://bucket/p?X-Amz-Signature=***&part=2"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("/a/local/path", "/a/local/path"),
    ],
)
def test_redact_hides_passwords_and_secret_query_values(uri, expected):
    assert redact(uri) == expected


def test_strip_credentials_keeps_a_usable_uri():
    assert strip_credentials(URI) == ("http://127.0.0.1:5000", "alice", SECRET)
    assert strip_credentials("sqlite:////x.db") == ("sqlite:////x.db", None, None)


def test_params_run_files_and_job_requests_carry_no_password(monkeypatch):
    cfg = load_preset("tiny").for_stage("base", tracking_uri=URI)
    assert cfg.resolved_tracking_uri() == URI  # the driver itself uses the real one
    assert SECRET not in json.dumps(cfg.mlflow_params())
    assert SECRET not in cfg.redacted().model_dump_json()
    assert cfg.redacted().tracking_uri == "http://127.0.0.1:5000"
    request = build_request(
        cfg, "/data", resume=None, run_name="r", export_dir=None, stop_at=None, fault=None
    )
    assert SECRET not in json.dumps(request) and SECRET not in encode_request(request)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    env = build_runtime_env(cfg)
    assert SECRET not in json.dumps(env)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_local_workers_get_credentials_in_mlflows_own_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    env = worker_env(URI)
    assert env == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": SECRET,
    }
    assert worker_env("sqlite:////x.db") == {"MLFLOW_TRACKING_URI": "sqlite:////x.db"}
