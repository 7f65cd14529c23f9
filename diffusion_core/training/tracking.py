"""MLflow tracking of a stage's run: the driver opens and closes the run, rank 0 logs to it.

Driver side (:func:`open_run`, :func:`close_run`): the whole config as params, the dataset version
and git commit as tags, the config as an artifact; the run is closed with FINISHED, KILLED
(stopped early or interrupted) or FAILED on every exit path. Worker side (:class:`Tracker`):
metrics (deduplicated across restarts, so a resumed step is not logged twice) and sample grids.

Credentials never reach a param, a tag or a run file: URIs are logged through
:func:`diffusion_core.storage.redact`, and :func:`worker_env` hands workers the tracking URI
without ``user:password@`` and the credentials in MLflow's own variables
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.storage import redact, storage_env, strip_credentials
from diffusion_core.training.config import TrainConfig


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from, if it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def artifact_location(tracking_uri: str) -> str | None:
    """Beside a local sqlite store, artifacts go to ``mlartifacts/`` next to the database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def worker_env(tracking_uri: str) -> dict[str, str]:
    """Environment variables that let a worker log to ``tracking_uri`` (credentials apart) and
    reach the object store of the run (:func:`diffusion_core.storage.storage_env`: endpoint and
    credentials exactly as this process has them). The candidates for the workers' runtime env:
    :func:`diffusion_core.ray_env.worker_env_vars` drops the credentials they inherit."""
    clean, user, password = strip_credentials(tracking_uri)
    env = {**storage_env(), "MLFLOW_TRACKING_URI": clean}
    user = user or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def open_run(
    config: TrainConfig,
    tracking_uri: str,
    run_name: str,
    dataset_version: str,
    data: str,
    run_id: str | None,
) -> str:
    """Create the MLflow run of a new training run (or mark a resumed one RUNNING); its id."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed_at", datetime.now(UTC).isoformat())
        return run_id
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                config.experiment, artifact_location=artifact_location(tracking_uri)
            )
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(config.experiment).experiment_id  # type: ignore[union-attr]
    else:
        exp_id = exp.experiment_id
    tags = {
        "mlflow.runName": run_name,
        "stage": config.stage,
        "preset": config.preset,
        "dataset_version": dataset_version,
        "dataset_path": redact(data),
        "ray_run_name": run_name,
        "storage_path": redact(config.storage_uri()),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    rid = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in config.mlflow_params().items()]
    for i in range(0, len(params), 90):
        client.log_batch(rid, params=params[i : i + 90])
    client.log_dict(rid, config.redacted().model_dump(mode="json"), "train_config.json")
    return rid


def close_run(tracking_uri: str, run_id: str, status: str, **tags: str) -> None:
    """Set ``tags`` and end the run with ``status`` (FINISHED, KILLED or FAILED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


class Tracker:
    """MLflow from rank 0: metrics (deduplicated across restarts) and sample-grid artifacts.

    Reads its tracking URI and credentials from the worker's environment (:func:`worker_env`).
    """

    def __init__(self, run_id: str | None):
        self.client = None
        self.run_id = run_id
        self.logged_until = 0
        self.pending: list[Any] = []
        if run_id and os.environ.get("MLFLOW_TRACKING_URI"):
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
            history = self.client.get_metric_history(run_id, "loss")
            self.logged_until = max((m.step for m in history), default=0)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.client is None or step <= self.logged_until:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in values.items()]

    def flush(self) -> None:
        if self.client is None or not self.pending:
            return
        for i in range(0, len(self.pending), 900):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 900])
        self.pending = []

    def image(self, image: np.ndarray, name: str) -> None:
        if self.client is None:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            Image.fromarray(image).save(path)
            self.client.log_artifact(self.run_id, str(path), "samples")
