"""Which variables go into the Ray workers' runtime env (``ray_env.worker_env_vars``), and what a
job submitted through the Jobs API carries (``ray_jobs``): never a credential the workers have,
never one in a job's request, runtime env or metadata."""

from __future__ import annotations

import json

import pytest

from diffusion_core import ray_env, ray_jobs
from diffusion_core.ray_env import choose_worker_env, is_credential, worker_env_vars

SECRET = "s3cr3t-value"


def test_credentials_are_known_by_name():
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN",
                 "SOME_API_KEY"):  # fmt: skip
        assert is_credential(name), name
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI",
                 "OMP_NUM_THREADS", "PYTHONPATH", "MLFLOW_S3_ENDPOINT_URL"):  # fmt: skip
        assert not is_credential(name), name


def test_an_inherited_secret_is_left_out_and_a_new_or_changed_one_passed():
    inherited = {"AWS_SECRET_ACCESS_KEY": SECRET, "MLFLOW_TRACKING_PASSWORD": "old"}
    candidates = {
        "AWS_SECRET_ACCESS_KEY": SECRET,  # same value as when Ray started: inherited
        "MLFLOW_TRACKING_PASSWORD": "new",  # changed since: passed
        "AWS_SESSION_TOKEN": "late",  # set after Ray started: passed
        "AWS_ENDPOINT_URL_S3": "http://s3:9000",  # a setting: always passed
        "OMP_NUM_THREADS": "1",
    }
    assert choose_worker_env(candidates, inherited) == {
        "MLFLOW_TRACKING_PASSWORD": "new",
        "AWS_SESSION_TOKEN": "late",
        "AWS_ENDPOINT_URL_S3": "http://s3:9000",
        "OMP_NUM_THREADS": "1",
    }
    # nothing known of the workers' environment: everything is passed
    assert choose_worker_env(candidates, None) == candidates


def test_worker_env_vars_uses_how_this_process_is_attached(monkeypatch, caplog):
    candidates = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "eu-west-1"}
    monkeypatch.setattr(
        ray_env, "attachment", lambda: ("started", {"AWS_SECRET_ACCESS_KEY": SECRET})
    )
    assert worker_env_vars(candidates) == {"AWS_DEFAULT_REGION": "eu-west-1"}
    monkeypatch.setattr(ray_env, "attachment", lambda: ("job", {}))
    assert worker_env_vars(candidates) == candidates  # the cluster does not have it: passed
    monkeypatch.setattr(ray_env, "attachment", lambda: (None, None))  # Ray started elsewhere
    assert worker_env_vars(candidates) == candidates
    monkeypatch.setattr(ray_env, "_WARNED", set())
    monkeypatch.setattr(ray_env, "attachment", lambda: ("connected", None))
    with caplog.at_level("WARNING", logger="diffusion_core.ray_env"):
        assert worker_env_vars(candidates) == candidates
        worker_env_vars(candidates)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "AWS_SECRET_ACCESS_KEY" in warnings[0]  # once, by name
    assert SECRET not in warnings[0]


def test_without_ray_nothing_is_known(monkeypatch):
    monkeypatch.setattr(ray_env, "_ATTACHED", ("started", {"AWS_SECRET_ACCESS_KEY": SECRET}, "01"))
    import ray

    if not ray.is_initialized():
        assert ray_env.attachment() == (None, None)


def test_submission_address_only_for_a_dashboard_url_outside_a_job(monkeypatch):
    monkeypatch.delenv("CASCADE_IN_RAY_JOB", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert ray_jobs.submission_address() == "http://head:8265"
    monkeypatch.setenv("CASCADE_IN_RAY_JOB", "1")
    assert ray_jobs.submission_address() is None
    monkeypatch.delenv("CASCADE_IN_RAY_JOB")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_jobs.submission_address() is None


def test_ensure_ray_refuses_a_jobs_api_address_clearly():
    # in a fresh interpreter: the test session may already have a Ray up in this process
    import os
    import subprocess
    import sys

    code = (
        "from diffusion_core import ray_env\n"
        "try:\n    ray_env.ensure_ray()\n"
        "except RuntimeError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused:") and "Jobs API" in out.stdout, out.stdout


def _capture(monkeypatch) -> dict:
    seen: dict = {}

    def fake(kind, request, **kw):
        seen.update(kind=kind, request=request, **kw)
        seen["runtime_env"] = ray_jobs.build_runtime_env(kw["tracking_uri"])
        raise RuntimeError("captured")

    monkeypatch.setattr(ray_jobs, "submit_kind", fake)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("CASCADE_IN_RAY_JOB", raising=False)
    return seen


def test_a_submitted_sampling_job_carries_no_credential(monkeypatch, tmp_path):
    from diffusion_core.batch import BatchConfig, run_batch

    seen = _capture(monkeypatch)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@mlflow:5000")
    cfg = BatchConfig(model="models:/m@champion", prompts=[str(tmp_path / "p.txt")],
                      out=str(tmp_path / "out"), tracking_uri=f"http://bob:{SECRET}@mlflow:5000")  # fmt: skip
    with pytest.raises(RuntimeError, match="captured"):
        run_batch(cfg)
    assert seen["kind"] == "sample"
    text = json.dumps([seen["request"], seen["runtime_env"]])
    assert SECRET not in text and SECRET not in ray_jobs.encode_request(seen["request"])
    assert seen["request"]["config"]["tracking_uri"] == "http://mlflow:5000"
    assert seen["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert seen["request"]["config"]["out"] == str(tmp_path / "out")


def test_a_submitted_ingest_has_absolute_paths_and_refuses_credentials_in_a_url(
    monkeypatch, tmp_path
):
    from diffusion_core.data.ingest import IngestConfig, IngestError, ingest

    seen = _capture(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="captured"):
        ingest(IngestConfig(sources=["raw", "s3://b/raw"], out="data"))
    assert seen["request"]["config"]["sources"] == [str(tmp_path / "raw"), "s3://b/raw"]
    assert seen["request"]["config"]["out"] == str(tmp_path / "data")
    with pytest.raises(IngestError, match="credentials"):
        ingest(IngestConfig(sources=[f"https://u:{SECRET}@host/x.tar"], out="data"))
    # engine="local" never submits
    assert ray_jobs.JOB_KINDS["ingest"] == "diffusion_core.data.ingest:run_job"


def test_a_job_error_comes_back_as_the_same_error(monkeypatch):
    from diffusion_core.data.ingest import IngestError

    lines = [
        "some log line\n" + ray_jobs.ERROR_PREFIX
        + json.dumps({"message": "--out holds a dataset", "transient": False})
    ]  # fmt: skip

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, **kw):
            return "job-1"

        async def tail_job_logs(self, job_id):
            for chunk in lines:
                yield chunk

        def get_job_status(self, job_id):
            from ray.job_submission import JobStatus

            return JobStatus.FAILED

        def get_job_logs(self, job_id):
            return "".join(lines)

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    logged: list[str] = []
    with pytest.raises(IngestError, match="holds a dataset") as e:
        ray_jobs.submit_kind("ingest", {}, name="d", tracking_uri=None, error=IngestError,
                             log=logged.append)  # fmt: skip
    assert e.value.transient is False
    assert "some log line" in logged


def test_ctrl_c_stops_a_submitted_ingest_or_sampling_job(monkeypatch):
    stopped: list[str] = []

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, **kw):
            return "job-2"

        async def tail_job_logs(self, job_id):
            yield "working\n"
            raise KeyboardInterrupt

        def stop_job(self, job_id):
            stopped.append(job_id)

    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(KeyboardInterrupt):
        ray_jobs.submit_kind(
            "sample", {}, name="s", tracking_uri=None, error=RuntimeError, log=lambda _: None
        )
    assert stopped == ["job-2"]
