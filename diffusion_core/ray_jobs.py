"""Cluster mode for every job: submit it through the Ray Jobs API and follow it.

With ``RAY_ADDRESS=http://<head>:8265`` (a Ray dashboard), training
(:mod:`diffusion_core.training.submit`), ingest (:func:`diffusion_core.data.ingest.ingest`) and
batch sampling (:func:`diffusion_core.batch.run_batch`) do not run in this process: they submit
``python -m <module> <request>`` with a runtime environment (this source tree as
``working_dir`` when run from a checkout, the MLflow tracking URI, offline model loading), stream
the job's logs, wait for a terminal status and return the result object the local path returns
(the job prints it as a ``<prefix><json>`` line). In the job, ``RAY_ADDRESS`` is the cluster's own
address (Ray sets it), so the job runs the local path there.

Paths in a request are made absolute by the caller: the cluster must see them at the same place
(a shared filesystem), or they must be URIs.

Credentials. The request (the entrypoint's argument), the runtime environment and the job
metadata are stored by Ray and shown by its dashboard and Jobs API, so none of them carries a
secret: a tracking URI loses its ``user:password@``, and the cluster's own environment provides
MLflow's credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, e.g. from a
Kubernetes Secret) and the object store's (:data:`diffusion_core.storage.S3_ENV`).

``python -m diffusion_core.ray_jobs <kind> <request>`` is the entry point of ingest and sampling
jobs (:data:`JOB_KINDS`); training has its own (:mod:`diffusion_core.training.job`).
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from diffusion_core.errors import JobError
from diffusion_core.ray_env import source_root
from diffusion_core.storage import strip_credentials

#: The result line of an ingest or sampling job (training's is ``CASCADE_TRAIN_RESULT ``).
RESULT_PREFIX = "CASCADE_JOB_RESULT "
#: A progress line of an ingest or sampling job (JSON), handed to the caller's callback.
PROGRESS_PREFIX = "CASCADE_JOB_PROGRESS "
#: The error line of an ingest or sampling job that raised a JobError (JSON: message, transient).
ERROR_PREFIX = "CASCADE_JOB_ERROR "
#: What a checkout sends as ``working_dir`` without (environments, outputs, caches, state).
EXCLUDES = [".git", ".venv", "out", "mlruns", "*.db", ".ci-state", "**/__pycache__", ".*_cache"]
#: Job kinds run by this module's entry point: ``kind -> "module:function"``; the function
#: takes the request and a progress callback (one JSON-able dict) and returns the result (JSON).
JOB_KINDS = {
    "ingest": "diffusion_core.data.ingest:run_job",
    "sample": "diffusion_core.batch.job:run_job",
}

Log = Callable[[str], None]


def submission_address() -> str | None:
    """The Ray Jobs address when ``RAY_ADDRESS`` is a dashboard URL (and we are not the job)."""
    addr = os.environ.get("RAY_ADDRESS", "")
    if addr.startswith(("http://", "https://")) and not os.environ.get("CASCADE_IN_RAY_JOB"):
        return addr
    return None


def encode_request(request: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(request).encode()).decode()


def decode_request(text: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def build_runtime_env(
    tracking_uri: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runtime env of a job: this checkout as working_dir, the tracking URI without credentials
    (the cluster has its own ``MLFLOW_TRACKING_USERNAME/PASSWORD``) and offline flags."""
    env_vars = {
        "CASCADE_IN_RAY_JOB": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = strip_credentials(tracking_uri)[0]
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    root = source_root()
    if root is not None:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = list(EXCLUDES)
    for k, v in (extra or {}).items():
        if k == "env_vars":
            env_vars.update(v)
        else:
            runtime_env[k] = v
    return runtime_env


def submit_job(
    entrypoint: str,
    *,
    submission_id: str,
    runtime_env: dict[str, Any],
    metadata: dict[str, str],
    result_prefix: str,
    error: Callable[..., Exception],
    address: str | None = None,
    log: Log | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    stop_on_interrupt: bool = False,
    what: str = "",
) -> str:
    """Submit ``entrypoint`` to the Jobs API at ``address`` ($RAY_ADDRESS), follow its logs (each
    line to ``log``, default stderr; progress lines to ``on_progress``) and return the text after
    ``result_prefix`` on its result line. A job that does not succeed, or ends without a result
    line, raises ``error(message)`` with its status and last log lines, or ``error(message,
    transient=...)`` of the job's own error when it printed one (:data:`ERROR_PREFIX`). With
    ``stop_on_interrupt``, a KeyboardInterrupt while following stops the job, then propagates
    (else the job keeps running on the cluster)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = address or os.environ["RAY_ADDRESS"]
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env=runtime_env,
        metadata=metadata,
    )
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    log(f"submitted Ray job {job_id} to {address}{f' ({what})' if what else ''}")
    failure: dict[str, Any] = {}
    try:
        result_line = asyncio.run(
            follow(client, job_id, log, timeout_s, result_prefix, on_progress, failure)
        )
    except KeyboardInterrupt:
        if stop_on_interrupt:
            log(f"interrupted: stopping Ray job {job_id}")
            try:
                client.stop_job(job_id)
            except Exception as e:  # noqa: BLE001 - the interrupt is what matters
                log(f"could not stop Ray job {job_id}: {type(e).__name__}: {e}")
        raise
    status = client.get_job_status(job_id)
    if failure and status != JobStatus.SUCCEEDED:
        raise error(f"{failure['message']} (Ray job {job_id})", transient=failure["transient"])
    if status != JobStatus.SUCCEEDED or result_line is None:
        info = client.get_job_info(job_id)
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-20:])
        raise error(
            f"Ray job {job_id} ended {status}: {info.message or ''}\n--- last log lines ---\n{tail}"
        )
    return result_line


async def follow(
    client: Any,
    job_id: str,
    log: Log,
    timeout_s: float | None,
    result_prefix: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    failure: dict[str, Any] | None = None,
) -> str | None:
    """Stream the job's logs until it ends; return its result line (or None). Progress lines go
    to ``on_progress``, the job's error line (if any) into ``failure``."""
    result: str | None = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            if line.startswith(result_prefix):
                result = line[len(result_prefix) :]
            elif line.startswith(PROGRESS_PREFIX):
                if on_progress is not None:
                    on_progress(json.loads(line[len(PROGRESS_PREFIX) :]))
            elif line.startswith(ERROR_PREFIX):
                if failure is not None:
                    failure.update(json.loads(line[len(ERROR_PREFIX) :]))
            else:
                log(line)
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            break
    if result is None:  # the stream can end before the last chunk was delivered
        for line in client.get_job_logs(job_id).splitlines():
            if line.startswith(result_prefix):
                result = line[len(result_prefix) :]
            elif line.startswith(ERROR_PREFIX) and failure is not None:
                failure.update(json.loads(line[len(ERROR_PREFIX) :]))
    return result


def submit_kind(
    kind: str,
    request: dict[str, Any],
    *,
    name: str,
    tracking_uri: str | None,
    error: Callable[..., Exception],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Submit a :data:`JOB_KINDS` job (stopped on Ctrl-C) and return its result as a dict.
    ``error(message, transient=...)`` makes the exception of a failed job: the job's own error
    (a bad source, model or output) as it raised it, any other failure as transient."""
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; one of {sorted(JOB_KINDS)}")
    line = submit_job(
        f"python -m diffusion_core.ray_jobs {kind} {encode_request(request)}",
        submission_id=f"{kind}-{name}-{int(time.time())}",
        runtime_env=build_runtime_env(tracking_uri),
        metadata={"kind": f"cascade-{kind}", "name": name},
        result_prefix=RESULT_PREFIX,
        error=lambda message, transient=True: error(message, transient=transient),
        log=log,
        on_progress=on_progress,
        stop_on_interrupt=True,
        what=f"{kind} {name}",
    )
    return json.loads(line)


def _progress_line(event: dict[str, Any]) -> None:
    print(PROGRESS_PREFIX + json.dumps(event), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in JOB_KINDS:
        print(f"usage: python -m diffusion_core.ray_jobs {{{','.join(JOB_KINDS)}}} <request>",
              file=sys.stderr)  # fmt: skip
        return 2
    module, func = JOB_KINDS[argv[0]].split(":")
    run = getattr(importlib.import_module(module), func)
    try:
        result = run(decode_request(argv[1]), _progress_line)
    except JobError as e:  # the caller raises it again, as the local path would
        print(ERROR_PREFIX + json.dumps({"message": str(e), "transient": e.transient}), flush=True)
        return 1
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
