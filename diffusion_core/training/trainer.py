"""The driver of a stage's training job: validate, name, track, run on Ray, export, summarise.

``train(config, data)`` runs one stage:

1. Checks the config against the data (stage known, manifest present, resolution and text
   encoder compatible, every shard's sha256 as the manifest says) before anything starts: a bad
   config fails in seconds, not after Ray.
2. Names the run (:mod:`diffusion_core.training.runs`): a fresh run gets a unique name; an
   explicit name must be new; ``resume=RUN`` continues an existing run (its stored config, with
   only the resumable fields changed).
3. Opens (or, on resume, re-opens) the MLflow run (:mod:`diffusion_core.training.tracking`).
4. Runs a ``TorchTrainer`` (``ScalingConfig`` from the config, ``CheckpointConfig(num_to_keep)``,
   ``FailureConfig(max_failures)``) on the local Ray, or on ``RAY_ADDRESS``. With ``RAY_ADDRESS``
   set to a dashboard URL (``http://host:8265``), the job is submitted through the Ray Jobs API
   instead (:mod:`diffusion_core.training.submit`) and followed.
5. Exports the final EMA weights into the cascade directory ``export_dir``.

Every exit path writes ``summary.json`` (atomically) and closes the MLflow run with the matching
status; a run whose export failed is exported again, without training, by resuming it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion_core.data.format import (
    DataError,
    DatasetInfo,
    check_dataset_for_stage,
    read_manifest,
    verify_shards,
)
from diffusion_core.ray_env import ensure_ray, source_root, worker_env_vars
from diffusion_core.ray_jobs import submission_address
from diffusion_core.storage import (
    absolute,
    exists,
    join,
    pyarrow_filesystem,
    read_bytes,
    read_json,
    redact,
    remove,
    write_json_atomic,
)
from diffusion_core.training.checkpoint import checkpoint_dir_name
from diffusion_core.training.config import ConfigError, TrainConfig
from diffusion_core.training.faults import FAULT_ENV
from diffusion_core.training.loop import NonFiniteLossError
from diffusion_core.training.runs import (
    ATTEMPTS_JSONL,
    NONFINITE_JSON,
    PROGRESS_JSON,
    RUN_JSON,
    SUMMARY_JSON,
    TrainingError,
    TrainResult,
    new_run_name,
    read_summary,
    resume_config,
    run_uri,
)
from diffusion_core.training.tracking import close_run, open_run, worker_env

_SETUP_LOCK = threading.Lock()
_MLFLOW_STATUS = {
    "completed": "FINISHED",
    "stopped": "KILLED",
    "failed": "FAILED",
    "export_failed": "FAILED",
}


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
    verify_shards(info)  # once per run: the shards are the ones the manifest describes
    if config.init_weights:  # fail now, not in every worker
        from diffusion_core.training.loop import warm_start_weights

        try:
            warm_start_weights(config)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return info


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
    interrupt runs on purpose). ``fault``: a test hook (:mod:`diffusion_core.training.faults`).
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
    config, data, name, stored = _resolve_run(config, data, resume, run_name)
    storage = config.storage_uri()
    run_dir = run_uri(storage, name)
    info = check_config(config, data)
    if resume is None and exists(run_dir):
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
        from diffusion_core.training.export import check_export_dir

        try:
            check_export_dir(export_dir, config.cascade)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tracking_uri = config.resolved_tracking_uri()
    previous = read_summary(storage, name) if resume is not None else None
    if previous is not None and previous.step >= config.steps:
        if previous.status != "export_failed" or not export_dir:
            raise ConfigError(
                f"run {name!r} already completed its {previous.step} steps; pass a larger "
                "--steps to train it longer"
            )
    with _SETUP_LOCK:
        run_id = open_run(config, tracking_uri, name, info.version, data, stored.get("mlflow_run_id"))
    ctx = _RunContext(config, name, run_dir, info, run_id, tracking_uri, export_dir, t0)
    if previous is not None and previous.step >= config.steps:  # trained; export again only
        last = join(run_dir, checkpoint_dir_name(previous.step))
        return ctx.finish(step=previous.step, checkpoint=last, metrics=previous.metrics)
    write_json_atomic(
        join(run_dir, RUN_JSON),
        {
            "run_name": name,
            "stage": config.stage,
            "data": data,
            "dataset_version": info.version,
            "mlflow_run_id": run_id,
            "tracking_uri": redact(tracking_uri),
            "config": config.redacted().model_dump(mode="json"),
            "created": stored.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        },
    )
    if resume is not None:
        remove(join(run_dir, NONFINITE_JSON))
    stop = min(config.steps, stop_at or config.steps)
    try:
        result = _fit(config, name, storage, data, run_id, tracking_uri, run_dir, stop, on_progress, fault)
    except BaseException as e:
        raise ctx.fail(e) from (e if isinstance(e, Exception) else None)
    step = int(result.metrics.get("step", 0)) if result.metrics else 0
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if _is_number(v)}
    checkpoint = None
    if result.checkpoint is not None:  # as a URI of the storage (Ray's path drops the scheme)
        checkpoint = join(run_dir, Path(result.checkpoint.path).name)
    return ctx.finish(step=step, checkpoint=checkpoint, metrics=metrics)


def _resolve_run(
    config: TrainConfig | None, data: str | None, resume: str | None, run_name: str | None
) -> tuple[TrainConfig, str, str, dict[str, Any]]:
    """(config, data, run name, stored run.json) of a new or a resumed run."""
    if resume is None:
        if config is None or data is None:
            raise ConfigError("a new run needs a config and a data folder")
        return config, absolute(data), run_name or new_run_name(config.stage), {}
    if run_name is not None and run_name != resume:
        raise ConfigError("give either run_name (a new run) or resume (an existing one)")
    storage = config.storage_uri() if config is not None else absolute("out/runs")
    path = join(run_uri(storage, resume), RUN_JSON)
    if not exists(path):
        raise ConfigError(
            f"no run {resume!r} to resume in {storage} (no {RUN_JSON}); list runs there or "
            "drop --resume to start a new run"
        )
    stored = read_json(path)
    config = resume_config(TrainConfig.model_validate(stored["config"]), config)
    return config, absolute(data or stored["data"]), resume, stored


class _RunContext:
    """What every exit path of :func:`train` needs: write the summary, close the MLflow run."""

    def __init__(
        self,
        config: TrainConfig,
        name: str,
        run_dir: str,
        info: DatasetInfo,
        run_id: str,
        tracking_uri: str,
        export_dir: str | None,
        t0: float,
    ):
        self.config, self.name, self.run_dir, self.info = config, name, run_dir, info
        self.run_id, self.tracking_uri, self.export_dir, self.t0 = run_id, tracking_uri, export_dir, t0

    def _summary(self, status: str, step: int, checkpoint: str | None, **kw: Any) -> TrainResult:
        attempts = _read_attempts(self.run_dir)
        return TrainResult(
            run_name=self.name,
            stage=self.config.stage,
            run_dir=redact(self.run_dir) or self.run_dir,
            status=status,  # type: ignore[arg-type]
            completed=step >= self.config.steps,
            step=step,
            steps=self.config.steps,
            checkpoint=checkpoint,
            dataset_version=self.info.version,
            mlflow_run_id=self.run_id,
            tracking_uri=redact(self.tracking_uri),
            seconds=time.perf_counter() - self.t0,
            attempts=attempts,
            **{"metrics": {}, "export_dir": None, **kw},
        )

    def _close(self, summary: TrainResult, **tags: str) -> None:
        """summary.json first (the run's own record), then the MLflow status."""
        try:
            write_json_atomic(join(self.run_dir, SUMMARY_JSON), summary.model_dump(mode="json"))
        finally:
            close_run(
                self.tracking_uri,
                self.run_id,
                _MLFLOW_STATUS[summary.status],
                worker_restarts=str(max(0, len(summary.attempts) - 1)),
                **({"error": summary.error[:5000]} if summary.error else {}),
                **tags,
            )

    def fail(self, e: BaseException) -> BaseException:
        """Record a failed (or interrupted) fit; the exception for :func:`train` to raise."""
        interrupted = isinstance(e, KeyboardInterrupt)
        step = _last_progress_step(self.run_dir)
        error = "interrupted" if interrupted else f"{type(e).__name__}: {e}"
        self._close(self._summary("stopped" if interrupted else "failed", step, None, error=error))
        if exists(join(self.run_dir, NONFINITE_JSON)):
            return NonFiniteLossError(read_json(join(self.run_dir, NONFINITE_JSON))["message"])
        if isinstance(e, Exception) and not isinstance(e, ConfigError | DataError):
            return TrainingError(
                f"training run {self.name!r} (stage {self.config.stage!r}) failed: {e}. Its "
                f"checkpoints are in {redact(self.run_dir)}; fix the cause and "
                f"`cascade train --resume {self.name}`"
            )
        return e

    def finish(self, *, step: int, checkpoint: str | None, metrics: dict[str, float]) -> TrainResult:
        """Export (when every step is trained), write the summary, close the MLflow run."""
        completed = step >= self.config.steps
        exported: str | None = None
        error: str | None = None
        if completed and self.export_dir and checkpoint is not None:
            try:
                exported = self._export(step, checkpoint)
            except Exception as e:  # noqa: BLE001 - recorded, then raised as a TrainingError
                error = f"{type(e).__name__}: {e}"
        status = "export_failed" if error else ("completed" if completed else "stopped")
        summary = self._summary(
            status, step, checkpoint, metrics=metrics, export_dir=exported, error=error
        )
        tags = {"export_dir": exported} if exported else {}
        if not completed:
            tags["stopped_at_step"] = str(step)
        self._close(summary, **tags)
        if error:
            raise TrainingError(
                f"run {self.name!r} trained all {step} steps but exporting it into "
                f"{self.export_dir} failed: {error}. Fix that and `cascade train --resume "
                f"{self.name}` exports it again (without training)"
            )
        return summary

    def _export(self, step: int, checkpoint: str) -> str:
        from ray.train import Checkpoint

        from diffusion_core.training.export import export_stage

        assert self.export_dir is not None
        fs, path = pyarrow_filesystem(checkpoint)
        with Checkpoint(path, filesystem=fs).as_directory() as d:
            return str(
                export_stage(
                    d,
                    self.export_dir,
                    cascade=self.config.cascade,
                    stage=self.config.stage,
                    lineage={
                        "run_name": self.name,
                        "step": step,
                        "dataset_version": self.info.version,
                        "mlflow_run_id": self.run_id,
                        "tracking_uri": redact(self.tracking_uri),
                        "checkpoint": checkpoint,
                    },
                )
            )


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_attempts(run_dir: str) -> list[dict[str, Any]]:
    path = join(run_dir, ATTEMPTS_JSONL)
    if not exists(path):
        return []
    return [json.loads(x) for x in read_bytes(path).decode().splitlines() if x]


def _last_progress_step(run_dir: str) -> int:
    try:
        return int(read_json(join(run_dir, PROGRESS_JSON))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


class _ProgressWatcher:
    """Polls the run's ``progress.json`` (written by rank 0) and calls ``on_progress``."""

    def __init__(self, run_dir: str, on_progress: Callable[[dict[str, Any]], None]):
        self.path = join(run_dir, PROGRESS_JSON)
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
            data = read_json(self.path)
        except (OSError, ValueError):  # not written yet, or a transient read error
            return
        if data.get("time") != self._last:
            self._last = data.get("time")
            self.on_progress(data)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()


def _fit(
    config: TrainConfig,
    name: str,
    storage: str,
    data: str,
    run_id: str,
    tracking_uri: str,
    run_dir: str,
    stop: int,
    on_progress: Callable[[dict[str, Any]], None] | None,
    fault: dict[str, Any] | None,
) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray()
    sc = config.scaling
    env = {"OMP_NUM_THREADS": str(sc.torch_threads), **worker_env(tracking_uri)}
    root = source_root()
    if root is not None:  # workers import this checkout even where it is not pip-installed
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
        )
    if fault is not None:
        env[FAULT_ENV] = json.dumps(fault)
    storage_fs, storage_path = pyarrow_filesystem(storage) if "://" in storage else (None, storage)
    trainer = TorchTrainer(
        train_loop_per_worker=_entry,
        train_loop_config={
            "config": config.redacted().model_dump(mode="json"),
            "run": {
                "run_name": name,
                "run_dir": run_dir,
                "data": data,
                "mlflow_run_id": run_id,
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
            # one filesystem (endpoint, credentials) for Ray's checkpoints and our run files
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
            # credentials only where the workers do not inherit them (ray_env.worker_env_vars)
            worker_runtime_env={"env_vars": worker_env_vars(env)},
        ),
    )
    if on_progress is None:
        return trainer.fit()
    with _ProgressWatcher(run_dir, on_progress):
        return trainer.fit()


def _entry(payload: dict[str, Any]) -> None:
    from diffusion_core.training.loop import train_loop_per_worker

    train_loop_per_worker(payload)
