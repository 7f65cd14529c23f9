"""The driver of a stage's training job: validate, name, track, run on Ray, export, summarise.

``train(config, data)`` runs one stage:

1. Checks the config against the data (stage known, manifest present, resolution and text
   encoder compatible) before anything starts: a bad config fails in a second, not after Ray.
2. Names the run. A fresh run gets a unique name ``<stage>-<UTC time>-<random>``; an explicit
   name must be new. ``resume=RUN`` continues an existing run (its stored config and data). Ray
   Train V2 resumes *any* run whose ``RunConfig(name, storage_path)`` already exists, so this is
   how resuming is made explicit and never accidental.
3. Opens (or, on resume, re-opens) the MLflow run: the whole config as params, the dataset
   version as a tag.
4. Runs a ``TorchTrainer`` (``ScalingConfig`` from the config, ``CheckpointConfig(num_to_keep)``,
   ``FailureConfig(max_failures)``) on the local Ray, or on ``RAY_ADDRESS``. With ``RAY_ADDRESS``
   set to a dashboard URL (``http://host:8265``), the job is submitted through the Ray Jobs API
   instead (:mod:`diffusion_core.training.submit`) and followed.
5. Exports the final EMA weights into the cascade directory ``export_dir``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict

from diffusion_core.ray_env import ensure_ray
from diffusion_core.training.config import ConfigError, TrainConfig
from diffusion_core.training.data import (
    DataError,
    DatasetInfo,
    check_dataset_for_stage,
    read_manifest,
)
from diffusion_core.training.loop import (
    ATTEMPTS_JSONL,
    FAULT_ENV,
    NONFINITE_JSON,
    PROGRESS_JSON,
    NonFiniteLossError,
)

RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
_SETUP_LOCK = threading.Lock()


class TrainingError(RuntimeError):
    """The training job failed (after Ray's retries); the message says where and why."""


class TrainResult(BaseModel):
    """What a finished (or stopped) stage run leaves behind."""

    model_config = ConfigDict(extra="forbid")

    run_name: str
    stage: str
    run_dir: str
    completed: bool
    step: int
    steps: int
    metrics: dict[str, float]
    checkpoint: str | None
    export_dir: str | None
    dataset_version: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    seconds: float
    attempts: list[dict[str, Any]] = []


# ============================================================================ preparation
def new_run_name(stage: str) -> str:
    """A unique run name: ``<stage>-<UTC yyyymmdd-HHMMSS>-<6 hex>``."""
    return f"{stage}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _read_json(uri: str) -> dict[str, Any]:
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def _write_json(uri: str, data: Any) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_run(storage: str, name: str) -> dict[str, Any] | None:
    """The ``run.json`` of run ``name`` in ``storage`` (its config, data, MLflow run), or None."""
    uri = f"{storage_uri(storage)}/{name}/{RUN_JSON}"
    return _read_json(uri) if _exists(uri) else None


def check_config(config: TrainConfig, data: str) -> DatasetInfo:
    """Everything that can be checked before Ray starts; returns the dataset's manifest info."""
    stage = config.stage_config
    info = read_manifest(data)
    check_dataset_for_stage(
        info,
        stage=stage.name,
        resolution=config.top_resolution,
        text_encoder=config.cascade.text_encoder,
        text=bool(stage.network.text_dim),
    )
    if info.num_samples < config.batch_size:
        raise DataError(
            f"dataset {data!r} has {info.num_samples} samples, fewer than one global batch "
            f"(batch_size={config.batch_size}); lower batch_size or ingest more data"
        )
    return info


_RESUMABLE_CHANGES = {"steps", "max_failures", "log_every", "sample_every", "prefetch"}


def _resume_config(stored: TrainConfig, given: TrainConfig | None) -> TrainConfig:
    if given is None:
        return stored
    a, b = stored.model_dump(mode="json"), given.model_dump(mode="json")
    changed = sorted(k for k in a if a[k] != b[k] and k not in _RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(
            f"--resume continues a run with its stored config; the given config differs in "
            f"{changed}. Only {sorted(_RESUMABLE_CHANGES)} may change on resume; start a new run "
            "for anything else"
        )
    if given.steps < stored.steps:
        raise ConfigError(f"steps may only grow on resume ({stored.steps} -> {given.steps})")
    return given


# ============================================================================ MLflow
def _git_commit() -> str | None:
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


def _artifact_location(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _open_mlflow_run(
    config: TrainConfig,
    tracking_uri: str,
    run_name: str,
    info: DatasetInfo,
    data: str,
    run_id: str | None,
) -> str:
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
                config.experiment, artifact_location=_artifact_location(tracking_uri)
            )
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(config.experiment).experiment_id  # type: ignore[union-attr]
    else:
        exp_id = exp.experiment_id
    tags = {
        "mlflow.runName": run_name,
        "stage": config.stage,
        "preset": config.preset,
        "dataset_version": info.version,
        "dataset_path": data,
        "ray_run_name": run_name,
        "storage_path": config.storage_uri(),
    }
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in config.mlflow_params().items()]
    for i in range(0, len(params), 90):
        client.log_batch(rid, params=params[i : i + 90])
    client.log_dict(rid, config.model_dump(mode="json"), "train_config.json")
    return rid


def _close_mlflow_run(tracking_uri: str, run_id: str, status: str, **tags: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


# ============================================================================ progress
class _ProgressWatcher:
    """Polls the run's ``progress.json`` (written by rank 0) and calls ``on_progress``."""

    def __init__(self, run_dir: Path, on_progress: Callable[[dict[str, Any]], None]):
        self.path = run_dir / PROGRESS_JSON
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="train-progress")
        self._last: float | None = None

    def __enter__(self) -> _ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._poll()

    def _poll(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if data.get("time") != self._last:
            self._last = data.get("time")
            self.on_progress(data)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()


# ============================================================================ Ray
def submission_address() -> str | None:
    """The Ray Jobs address when ``RAY_ADDRESS`` is a dashboard URL (and we are not the job)."""
    addr = os.environ.get("RAY_ADDRESS", "")
    if addr.startswith(("http://", "https://")) and not os.environ.get("CASCADE_IN_RAY_JOB"):
        return addr
    return None


def train(
    config: TrainConfig | None = None,
    data: str | None = None,
    *,
    resume: str | None = None,
    run_name: str | None = None,
    export_dir: str | None = "out/cascade",
    stop_at: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one stage (see the module docstring). ``config`` may be omitted with ``resume``.

    ``stop_at``: stop after that step with a checkpoint (the run can be resumed later; used to
    interrupt runs on purpose). ``fault``: a test hook (see ``loop._maybe_inject_fault``).
    """
    if submission_address():
        from diffusion_core.training.submit import submit_train

        return submit_train(
            config,
            data,
            resume=resume,
            run_name=run_name,
            export_dir=export_dir,
            stop_at=stop_at,
            fault=fault,
        )
    t0 = time.perf_counter()
    if resume is not None:
        if run_name is not None and run_name != resume:
            raise ConfigError("give either run_name (a new run) or resume (an existing one)")
        storage = config.storage_uri() if config is not None else storage_uri("out/runs")
        run_uri = f"{storage}/{resume}"
        if not _exists(f"{run_uri}/{RUN_JSON}"):
            raise ConfigError(
                f"no run {resume!r} to resume in {storage} (no {RUN_JSON}); list runs there or "
                "drop --resume to start a new run"
            )
        stored = _read_json(f"{run_uri}/{RUN_JSON}")
        config = _resume_config(TrainConfig.model_validate(stored["config"]), config)
        if _exists(f"{run_uri}/{SUMMARY_JSON}"):
            done = _read_json(f"{run_uri}/{SUMMARY_JSON}")
            if done.get("step", 0) >= config.steps:
                raise ConfigError(
                    f"run {resume!r} already completed its {done['step']} steps; pass a larger "
                    "--steps to train it longer"
                )
        data = data or stored["data"]
        name = resume
    else:
        if config is None or data is None:
            raise ConfigError("a new run needs a config and a data folder")
        name = run_name or new_run_name(config.stage)
        stored = {}
    assert config is not None and data is not None
    data = data if "://" in data else str(Path(data).expanduser().resolve())
    storage = config.storage_uri()
    run_uri = f"{storage}/{name}"
    info = check_config(config, data)
    if resume is None and _exists(run_uri):
        raise ConfigError(
            f"run {name!r} already exists in {storage}: pass --resume {name} to continue it, or "
            "choose another name (Ray would otherwise silently resume it)"
        )
    if resume is not None and stored.get("dataset_version") not in (None, info.version):
        raise DataError(
            f"run {name!r} was trained on dataset version {stored['dataset_version'][:12]} but "
            f"{data!r} is {info.version[:12]}: resume with the data it started on"
        )
    if export_dir:
        from diffusion_core.training.state import check_export_dir

        try:
            check_export_dir(export_dir, config.cascade)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tracking_uri = config.resolved_tracking_uri()
    with _SETUP_LOCK:
        run_id = _open_mlflow_run(
            config, tracking_uri, name, info, data, stored.get("mlflow_run_id")
        )
    local_dir = None if "://" in storage else Path(run_uri)
    _write_json(
        f"{run_uri}/{RUN_JSON}",
        {
            "run_name": name,
            "stage": config.stage,
            "data": data,
            "dataset_version": info.version,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
            "config": config.model_dump(mode="json"),
            "created": stored.get("created", datetime.now(UTC).isoformat()),
        },
    )
    if local_dir is not None and resume is not None:
        (local_dir / NONFINITE_JSON).unlink(missing_ok=True)
    stop = min(config.steps, stop_at or config.steps)
    try:
        result = _fit(
            config, name, storage, data, run_id, tracking_uri, local_dir, stop, on_progress, fault
        )
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        _close_mlflow_run(tracking_uri, run_id, status, error=f"{type(e).__name__}: {e}"[:5000])
        if local_dir is not None and (local_dir / NONFINITE_JSON).exists():
            raise NonFiniteLossError(
                json.loads((local_dir / NONFINITE_JSON).read_text())["message"]
            ) from None
        if isinstance(e, Exception) and not isinstance(e, ConfigError | DataError):
            raise TrainingError(
                f"training run {name!r} (stage {config.stage!r}) failed: {e}. Its checkpoints "
                f"are in {run_uri}; fix the cause and `cascade train --resume {name}`"
            ) from e
        raise
    checkpoint = result.checkpoint
    step = int(result.metrics.get("step", 0)) if result.metrics else 0
    completed = step >= config.steps
    exported = None
    if completed and export_dir and checkpoint is not None:
        from diffusion_core.training.state import export_stage

        with checkpoint.as_directory() as d:
            exported = str(
                export_stage(
                    d,
                    export_dir,
                    cascade=config.cascade,
                    stage=config.stage,
                    lineage={
                        "run_name": name,
                        "step": step,
                        "dataset_version": info.version,
                        "mlflow_run_id": run_id,
                        "tracking_uri": tracking_uri,
                        "checkpoint": checkpoint.path,
                    },
                )
            )
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if _is_number(v)}
    attempts = _read_attempts(local_dir)
    _close_mlflow_run(
        tracking_uri,
        run_id,
        "FINISHED" if completed else "KILLED",
        **({"export_dir": exported} if exported else {}),
        **({"stopped_at_step": str(step)} if not completed else {}),
        worker_restarts=str(max(0, len(attempts) - 1)),
    )
    summary = TrainResult(
        run_name=name,
        stage=config.stage,
        run_dir=run_uri,
        completed=completed,
        step=step,
        steps=config.steps,
        metrics=metrics,
        checkpoint=checkpoint.path if checkpoint is not None else None,
        export_dir=exported,
        dataset_version=info.version,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        seconds=time.perf_counter() - t0,
        attempts=attempts,
    )
    _write_json(f"{run_uri}/{SUMMARY_JSON}", summary.model_dump(mode="json"))
    return summary


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def storage_uri(path: str) -> str:
    """A storage path as Ray needs it: a URI, or an absolute local path."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _read_attempts(local_dir: Path | None) -> list[dict[str, Any]]:
    if local_dir is None or not (local_dir / ATTEMPTS_JSONL).exists():
        return []
    return [json.loads(x) for x in (local_dir / ATTEMPTS_JSONL).read_text().splitlines() if x]


def _fit(
    config: TrainConfig,
    name: str,
    storage: str,
    data: str,
    run_id: str,
    tracking_uri: str,
    local_dir: Path | None,
    stop: int,
    on_progress: Callable[[dict[str, Any]], None] | None,
    fault: dict[str, Any] | None,
) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    sc = config.scaling
    env = {"OMP_NUM_THREADS": str(sc.torch_threads), "MLFLOW_TRACKING_URI": tracking_uri}
    from diffusion_core.training.submit import source_root

    root = source_root()
    if root is not None:  # workers import this checkout even where it is not pip-installed
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
        )
    if fault is not None:
        env[FAULT_ENV] = json.dumps(fault)
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "run": {
                "run_name": name,
                "run_dir": str(local_dir) if local_dir is not None else None,
                "data": data,
                "mlflow_run_id": run_id,
                "tracking_uri": tracking_uri,
                "stop_at": stop,
            },
        },
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.resources_per_worker,
            placement_strategy=sc.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    if on_progress is None or local_dir is None:
        return trainer.fit()
    with _ProgressWatcher(local_dir, on_progress):
        return trainer.fit()


def _entry(payload: dict[str, Any]) -> None:
    from diffusion_core.training.loop import train_loop_per_worker

    train_loop_per_worker(payload)
