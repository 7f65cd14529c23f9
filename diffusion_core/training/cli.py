"""``cascade train``: train one stage of the cascade on Ray (registered in diffusion_core.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def train_command(
    stage: str = typer.Option(
        None, "--stage", help="The stage to train (base, sr1, ...); not needed with --resume."
    ),
    data: Path = typer.Option(
        None, "--data", help="Dataset folder written by `cascade ingest` (has manifest.json)."
    ),
    config: str = typer.Option(
        None,
        "--config",
        help="A preset name (tiny, demo, gpu) or a YAML file. Default: demo; with --resume, the "
        "run's stored config.",
    ),
    resume: str = typer.Option(
        None, "--resume", help="Continue the run of this name (from its latest checkpoint)."
    ),
    name: str = typer.Option(None, "--name", help="Name of a new run (default: unique)."),
    steps: int = typer.Option(None, "--steps", help="Override the preset's number of steps."),
    batch_size: int = typer.Option(None, "--batch-size", help="Override the global batch size."),
    workers: int = typer.Option(None, "--workers", help="Override the number of Ray workers."),
    gpu: bool = typer.Option(None, "--gpu/--cpu", help="Override scaling.use_gpu."),
    storage: str = typer.Option(
        None, "--storage", help="Run storage (path or URI); default from the config (out/runs)."
    ),
    export: Path = typer.Option(
        Path("out/cascade"),
        "--export",
        help="Cascade folder the final EMA weights are written into (Cascade.load reads it).",
    ),
    stop_at: int = typer.Option(
        None, "--stop-at", help="Stop after this step with a checkpoint (resume it later)."
    ),
) -> None:
    """Train one cascade stage with Ray Train (DDP), checkpoints, MLflow tracking and export.

    Runs on the local Ray, or on RAY_ADDRESS: a cluster address (host:port) connects to it, a
    dashboard URL (http://host:8265) submits the job through the Ray Jobs API and follows it.
    """
    from rich.console import Console

    from diffusion_core.data.format import DataError
    from diffusion_core.training.config import ConfigError, load_preset
    from diffusion_core.training.loop import NonFiniteLossError
    from diffusion_core.training.runs import TrainingError
    from diffusion_core.training.trainer import train

    err = Console(stderr=True)
    overrides: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "storage_path": storage}
    scaling = {k: v for k, v in {"num_workers": workers, "use_gpu": gpu}.items() if v is not None}
    if scaling:
        overrides["scaling"] = scaling
    try:
        if resume is not None:
            if config is not None or stage is not None:
                raise ConfigError(
                    "--resume continues a run with its stored config and stage; drop --config "
                    "and --stage (only --steps may change, to train longer)"
                )
            cfg = _stored_config(resume, storage or "out/runs", steps)
        else:
            if stage is None or data is None:
                raise ConfigError("a new run needs --stage and --data (or --resume RUN)")
            cfg = load_preset(config or "demo").for_stage(stage, **overrides)
        with _progress_bar(err) as on_progress:
            result = train(
                cfg,
                str(data) if data is not None else None,
                resume=resume,
                run_name=name,
                export_dir=str(export),
                stop_at=stop_at,
                on_progress=on_progress,
            )
    except (ConfigError, DataError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except (TrainingError, NonFiniteLossError) as e:
        err.print(f"[red]training failed:[/red] {e}")
        raise typer.Exit(1) from None
    Console().print(_summary_table(result))


def _stored_config(run: str, storage: str, steps: int | None) -> Any:
    from diffusion_core.training.config import ConfigError, TrainConfig
    from diffusion_core.training.runs import RUN_JSON, read_run

    stored = read_run(storage, run)
    if stored is None:
        raise ConfigError(f"no run {run!r} in {storage} (no {RUN_JSON}); check --storage")
    cfg = TrainConfig.model_validate(stored["config"])
    return cfg if steps is None else cfg.model_copy(update={"steps": steps})


class _progress_bar:
    """A rich progress bar fed by the driver's progress callback (steps, loss, img/s)."""

    def __init__(self, console: Any):
        from diffusion_core.progress import progress_bar

        self.progress = progress_bar(
            console, "train", "loss {task.fields[loss]:.4f}  {task.fields[img_s]:.0f} img/s"
        )
        self.task: Any = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("starting Ray", total=None, loss=float("nan"), img_s=0)

        def on_progress(p: dict[str, Any]) -> None:
            self.progress.update(
                self.task,
                description=f"step {p['step']}",
                completed=p["step"],
                total=p.get("stop", p["steps"]),
                loss=p.get("loss", float("nan")),
                img_s=p.get("img_per_s", 0.0),
            )

        return on_progress

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def _summary_table(result: Any):
    from rich.table import Table

    t = Table(title=f"train {result.stage}: {result.run_name}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    state = "completed" if result.completed else f"stopped (resume with --resume {result.run_name})"
    t.add_row("status", state)
    t.add_row("steps", f"{result.step} / {result.steps}")
    for k in ("loss", "grad_norm", "img_per_s", "lr", "epoch"):
        if k in result.metrics:
            t.add_row(k, f"{result.metrics[k]:.4g}")
    t.add_row("worker restarts", str(max(0, len(result.attempts) - 1)))
    t.add_row("seconds", f"{result.seconds:.1f}")
    t.add_row("checkpoint", str(result.checkpoint))
    t.add_row("exported to", str(result.export_dir))
    t.add_row("dataset version", result.dataset_version[:16])
    t.add_row("MLflow run", f"{result.mlflow_run_id} ({result.tracking_uri})")
    return t
