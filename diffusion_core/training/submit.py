"""Cluster mode: submit a stage's training job through the Ray Jobs API and follow it.

With ``RAY_ADDRESS=http://<head>:8265`` (a Ray dashboard), :func:`diffusion_core.training.train`
does not run the trainer in this process: it submits ``python -m diffusion_core.training.job``
with a runtime environment (this source tree as ``working_dir`` when run from a checkout, the
MLflow tracking URI, offline model loading), streams the job's logs, waits for a terminal status
and returns the job's :class:`~diffusion_core.training.runs.TrainResult` (printed by the job as its
last log line). The job itself runs ``train`` on the cluster (``RAY_ADDRESS`` there is the
cluster's own address), so everything else — naming, MLflow, checkpoints, export — is the same.

Paths in the request (data, storage, export) are made absolute here: the cluster must see them
at the same place (a shared filesystem), or they must be URIs.

Credentials. The request, the runtime environment and the job metadata are stored by Ray and shown
by its dashboard and Jobs API, so none of them carries a secret: a tracking URI loses its
``user:password@``, and the cluster's own environment provides MLflow's credentials
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, e.g. from a Kubernetes Secret) and
the object store's (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL_S3``,
:data:`diffusion_core.storage.S3_ENV`) for ``s3://`` data, storage and export paths.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from diffusion_core.ray_env import source_root
from diffusion_core.storage import absolute, strip_credentials
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.runs import TrainingError, TrainResult, new_run_name

RESULT_PREFIX = "CASCADE_TRAIN_RESULT "
_EXCLUDES = [".git", ".venv", "out", "mlruns", "*.db", ".ci-state", "**/__pycache__", ".*_cache"]


def absolute_or_none(path: str | None) -> str | None:
    return None if path is None else absolute(path)


def build_request(
    config: TrainConfig | None,
    data: str | None,
    *,
    resume: str | None,
    run_name: str | None,
    export_dir: str | None,
    stop_at: int | None,
    fault: dict[str, Any] | None,
) -> dict[str, Any]:
    """The job's arguments, with local paths made absolute (see the module docstring)."""
    if config is not None:  # the request is job metadata: no credentials (see the module doc)
        config = config.model_copy(update={"storage_path": config.storage_uri()}).redacted()
    return {
        "config": config.model_dump(mode="json") if config is not None else None,
        "data": absolute_or_none(data),
        "resume": resume,
        "run_name": run_name,
        "export_dir": absolute_or_none(export_dir),
        "stop_at": stop_at,
        "fault": fault,
    }


def encode_request(request: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(request).encode()).decode()


def decode_request(text: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def build_runtime_env(
    config: TrainConfig | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runtime env of the job: this checkout as working_dir, tracking URI and offline flags."""
    env_vars = {
        "CASCADE_IN_RAY_JOB": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and config is not None:
        uri = config.resolved_tracking_uri()
    if uri:  # never the credentials: the cluster has its own (MLFLOW_TRACKING_USERNAME/PASSWORD)
        env_vars["MLFLOW_TRACKING_URI"] = strip_credentials(uri)[0]
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    root = source_root()
    if root is not None:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = list(_EXCLUDES)
    for k, v in (extra or {}).items():
        if k == "env_vars":
            env_vars.update(v)
        else:
            runtime_env[k] = v
    return runtime_env


def submit_train(
    config: TrainConfig | None,
    data: str | None,
    *,
    resume: str | None = None,
    run_name: str | None = None,
    export_dir: str | None = None,
    stop_at: int | None = None,
    fault: dict[str, Any] | None = None,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Submit the training job to the Ray Jobs API at ``address`` ($RAY_ADDRESS), follow its
    logs (each line to ``log``, default stderr) and return its TrainResult."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = address or os.environ["RAY_ADDRESS"]
    if resume is None and run_name is None:
        if config is None:
            raise ValueError("a new run needs a config")
        run_name = new_run_name(config.stage)  # known here, so the caller can --resume it
    request = build_request(
        config,
        data,
        resume=resume,
        run_name=run_name,
        export_dir=export_dir,
        stop_at=stop_at,
        fault=fault,
    )
    name = resume or run_name
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=f"python -m diffusion_core.training.job {encode_request(request)}",
        submission_id=f"train-{name}-{int(time.time())}",
        runtime_env=build_runtime_env(config, runtime_env),
        metadata={"run_name": str(name), "kind": "cascade-train"},
    )
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    log(f"submitted Ray job {job_id} to {address} (run {name})")
    result_line = asyncio.run(_follow(client, job_id, log, timeout_s))
    status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED or result_line is None:
        info = client.get_job_info(job_id)
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-20:])
        raise TrainingError(
            f"Ray job {job_id} ended {status}: {info.message or ''}\n--- last log lines ---\n{tail}"
        )
    return TrainResult.model_validate_json(result_line)


async def _follow(
    client: Any, job_id: str, log: Callable[[str], None], timeout_s: float | None
) -> str | None:
    """Stream the job's logs until it ends; return its result line (or None)."""
    result: str | None = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = line[len(RESULT_PREFIX) :]
            else:
                log(line)
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            break
    if result is None:  # the stream can end before the last chunk was delivered
        for line in client.get_job_logs(job_id).splitlines():
            if line.startswith(RESULT_PREFIX):
                result = line[len(RESULT_PREFIX) :]
    return result
