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

The generic part (runtime env, submission, log following, the result line) is
:mod:`diffusion_core.ray_jobs`, shared with ingest and batch sampling; this module is training's
request and result. A training job keeps running when the follower is interrupted (resume or
follow it later); ingest and sampling jobs are stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from diffusion_core import ray_jobs
from diffusion_core.ray_jobs import decode_request, encode_request  # noqa: F401 - the job's API
from diffusion_core.storage import absolute
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.runs import TrainingError, TrainResult, new_run_name

RESULT_PREFIX = "CASCADE_TRAIN_RESULT "
_EXCLUDES = ray_jobs.EXCLUDES


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


def build_runtime_env(
    config: TrainConfig | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runtime env of the job: this checkout as working_dir, tracking URI and offline flags."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and config is not None:
        uri = config.resolved_tracking_uri()
    return ray_jobs.build_runtime_env(uri, extra)


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
    result_line = ray_jobs.submit_job(
        f"python -m diffusion_core.training.job {encode_request(request)}",
        submission_id=f"train-{name}-{int(time.time())}",
        runtime_env=build_runtime_env(config, runtime_env),
        metadata={"run_name": str(name), "kind": "cascade-train"},
        result_prefix=RESULT_PREFIX,
        error=lambda message, **_: TrainingError(message),
        address=address,
        log=log,
        timeout_s=timeout_s,
        what=f"run {name}",
    )
    return TrainResult.model_validate_json(result_line)
