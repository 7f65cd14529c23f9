"""The training flows: one Ray Train job per cascade stage (``docs/training.md``).

Thin Prefect 3 flows over :func:`diffusion_core.training.train`:

- ``train-stage``: one stage, typed parameters (:class:`TrainStageParams`).
- ``train-cascade``: every stage of a preset. The stages only need the data (a super-resolution
  stage builds its low-resolution input from the same shards), so they are submitted together
  and run concurrently as far as the Ray cluster's resources allow.

A task retry never starts a second run: the run name is chosen before the first try, and a retry
resumes that run from its latest checkpoint (or, when it completed, returns its summary). Bad configs, bad data and a diverged loss are not
retried.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.training import ConfigError, load_preset, train
from diffusion_core.training.runs import new_run_name, read_run, read_summary
from flows.retry import retry_if_transient


class TrainStageParams(BaseModel):
    """Parameters of one stage's training run."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="Stage of the preset's cascade (base, sr1, ...).")
    data: str = Field(description="Dataset folder written by the ingest flow.")
    config: str = Field("demo", description="Preset name (tiny, demo, gpu) or a YAML file.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="TrainConfig fields to override (steps, scaling, ...)."
    )
    export_dir: str = Field("out/cascade", description="Cascade folder for the EMA weights.")
    run_name: str | None = Field(None, description="Name of the run (default: unique).")
    resume: str | None = Field(None, description="Resume this run instead of starting one.")


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def train_stage_task(params: TrainStageParams) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_preset(params.config).for_stage(params.stage, **params.overrides)
    name = params.resume or params.run_name
    assert name is not None
    started = read_run(cfg.storage_path, name) is not None
    if params.resume and not started:
        raise ConfigError(f"no run {params.resume!r} to resume in {cfg.storage_path}")
    done = read_summary(cfg.storage_path, name) if started else None
    if done is not None and done.status == "completed" and done.step >= cfg.steps:
        # a rerun of a finished task (a retried or restarted flow): the run is the result
        logger.info("%s: run %s already completed (%d steps)", params.stage, name, done.step)
        return done.model_dump(mode="json")
    last = [0]

    def progress(p: dict[str, Any]) -> None:
        if p["step"] - last[0] >= max(1, p["steps"] // 10) or p["step"] == p.get("stop"):
            last[0] = p["step"]
            logger.info("%s step %d/%d loss %.4f", params.stage, p["step"], p["steps"], p["loss"])

    result = train(
        cfg,
        params.data,
        resume=name if started else None,
        run_name=None if started else name,
        export_dir=params.export_dir,
        on_progress=progress,
    )
    logger.info(
        "%s: run %s, %d steps, loss %.4f, %.0f s",
        params.stage,
        result.run_name,
        result.step,
        result.metrics.get("loss", float("nan")),
        result.seconds,
    )
    return result.model_dump(mode="json")


def summary_markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Training",
        "",
        "| stage | run | steps | loss | img/s | seconds | restarts |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stage, r in results.items():
        m = r["metrics"]
        lines.append(
            f"| {stage} | `{r['run_name']}` | {r['step']}/{r['steps']} | "
            f"{m.get('loss', float('nan')):.4f} | {m.get('img_per_s', 0):.0f} | "
            f"{r['seconds']:.0f} | {max(0, len(r['attempts']) - 1)} |"
        )
    exports = {r["export_dir"] for r in results.values() if r.get("export_dir")}
    if exports:
        lines += ["", f"Cascade exported to `{', '.join(sorted(exports))}`."]
    return "\n".join(lines) + "\n"


@flow(name="train-stage", log_prints=True)
def train_stage_flow(params: TrainStageParams) -> dict[str, Any]:
    """Train one stage; returns the run's summary (TrainResult as a dict)."""
    if params.run_name is None and params.resume is None:
        params = params.model_copy(update={"run_name": new_run_name(params.stage)})
    result = train_stage_task(params)
    create_markdown_artifact(
        markdown=summary_markdown({params.stage: result}),
        key=f"train-{params.stage}",
        description=f"training of stage {params.stage}",
    )
    return result


@flow(name="train-cascade", log_prints=True)
def train_cascade_flow(
    data: str,
    config: str = "demo",
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    export_dir: str = "out/cascade",
) -> dict[str, dict[str, Any]]:
    """Train every stage (or ``stages``) of a preset concurrently on the same data."""
    preset = load_preset(config)
    names = stages or preset.stage_names
    for s in names:
        preset.for_stage(s, **(overrides or {}))  # fail on a bad stage before submitting any
    futures = {
        s: train_stage_task.submit(
            TrainStageParams(
                stage=s,
                data=data,
                config=config,
                overrides=overrides or {},
                export_dir=export_dir,
                run_name=new_run_name(s),
            )
        )
        for s in names
    }
    results = {s: f.result() for s, f in futures.items()}
    create_markdown_artifact(
        markdown=summary_markdown(results), key="train-summary", description="training summary"
    )
    return results


if __name__ == "__main__":  # pragma: no cover
    import sys

    train_cascade_flow(data=sys.argv[1], config=sys.argv[2] if len(sys.argv) > 2 else "demo")
