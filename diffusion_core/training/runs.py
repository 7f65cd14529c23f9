"""Runs of a stage's training job: names, the run files, and what resuming may change.

A run lives in ``<storage>/<run name>/`` (a local folder or an object-store prefix) beside Ray
Train's own checkpoints::

    run.json        written at the start: stage, data, dataset version, MLflow run, the config
    summary.json    written at the end (every exit path): the :class:`TrainResult`
    progress.json   rank 0's latest metrics (the driver's progress bar)
    attempts.jsonl  one line per worker-group start (restarts after failures)
    nonfinite.json  the step and message of a non-finite loss (a failure no retry can fix)

Every fresh run gets a unique name (``base-20261127-035828-a44102``): Ray Train V2 silently
resumes any run whose ``RunConfig(name, storage_path)`` already exists, so resuming is only ever
explicit. URIs recorded here are redacted (:func:`diffusion_core.storage.redact`).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from diffusion_core.storage import absolute, exists, join, read_json
from diffusion_core.training.config import ConfigError, TrainConfig

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
PROGRESS_JSON = "progress.json"
ATTEMPTS_JSONL = "attempts.jsonl"
NONFINITE_JSON = "nonfinite.json"

RESUMABLE_CHANGES = frozenset({"steps", "max_failures", "log_every", "sample_every", "prefetch"})
"""The config fields a resumed run may change (``docs/training.md``, "Resume")."""


class TrainingError(RuntimeError):
    """The training job failed (after Ray's retries); the message says where and why."""


class TrainResult(BaseModel):
    """What a stage run leaves behind in ``summary.json``, on every exit path.

    ``status``: ``completed`` (every step trained and, with an export folder, exported),
    ``stopped`` (``stop_at`` or an interrupt; resume it), ``failed`` (``error`` says why; fix and
    resume) or ``export_failed`` (trained, but the export raised: resuming exports again without
    training).
    """

    model_config = ConfigDict(extra="forbid")

    run_name: str
    stage: str
    run_dir: str
    status: Literal["completed", "stopped", "failed", "export_failed"] = "completed"
    completed: bool
    step: int
    steps: int
    metrics: dict[str, float]
    checkpoint: str | None
    export_dir: str | None
    error: str | None = None
    dataset_version: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    seconds: float
    attempts: list[dict[str, Any]] = []


def new_run_name(stage: str) -> str:
    """A unique run name: ``<stage>-<UTC yyyymmdd-HHMMSS>-<6 hex>``."""
    return f"{stage}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_uri(storage: str, name: str) -> str:
    return join(absolute(storage), name)


def read_run(storage: str, name: str) -> dict[str, Any] | None:
    """The ``run.json`` of run ``name`` in ``storage`` (its config, data, MLflow run), or None."""
    uri = join(run_uri(storage, name), RUN_JSON)
    return read_json(uri) if exists(uri) else None


def read_summary(storage: str, name: str) -> TrainResult | None:
    uri = join(run_uri(storage, name), SUMMARY_JSON)
    return TrainResult.model_validate(read_json(uri)) if exists(uri) else None


def resume_config(stored: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    """The config of a resumed run: the stored one, with only :data:`RESUMABLE_CHANGES` taken
    from ``given``; ``steps`` may only grow."""
    if given is None:
        return stored
    # run.json holds the config without credentials: compare like with like
    a, b = stored.redacted().model_dump(mode="json"), given.redacted().model_dump(mode="json")
    changed = sorted(k for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            f"--resume continues a run with its stored config; the given config differs in "
            f"{changed}. Only {sorted(RESUMABLE_CHANGES)} may change on resume; start a new run "
            "for anything else"
        )
    if given.steps < stored.steps:
        raise ConfigError(f"steps may only grow on resume ({stored.steps} -> {given.steps})")
    return given
