"""``cascade evaluate``: evaluate a cascade on a dataset's held-out split (registered in
diffusion_core.cli). Prints progress on stderr and the report as one JSON object, the last line
on stdout (``docs/evaluation.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from diffusion_core.cascade.config import DEFAULT_SAMPLER, DEFAULT_STEPS


def evaluate_command(
    cascade: str = typer.Option(
        ...,
        "--cascade",
        help="Cascade folder (cascade.json + stages/), as training exports it; local or "
        "s3://bucket/prefix (fetched into $CASCADE_MODEL_CACHE).",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Dataset folder written by `cascade ingest`; its evaluation split is used.",
    ),
    num_samples: int = typer.Option(
        64, "--num-samples", help="Held-out captions sampled (and held-out images compared)."
    ),
    sampler: str = typer.Option(
        DEFAULT_SAMPLER, "--sampler", help="unipc, ddim, dpmsolver++ or ddpm."
    ),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Network calls per stage."),
    guidance_scale: float = typer.Option(
        3.0, "--guidance-scale", help="Classifier-free guidance weight."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image (image i: seed + i)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images sampled per batch."),
    nll_samples: int = typer.Option(
        16, "--nll-samples", help="Held-out images the NLL bound is computed on (T steps each)."
    ),
    metrics: str = typer.Option(
        "kid,fid,nll,faithfulness",
        "--metrics",
        help="Comma-separated subset of kid, fid, nll, faithfulness.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Write the report here as JSON (and the sample grid beside it)."
    ),
    grid: Path = typer.Option(
        None, "--grid", help="Sample grid PNG (default: --out with the suffix .grid.png)."
    ),
    cache_dir: Path = typer.Option(
        None,
        "--cache-dir",
        help="Reference-feature cache (default $CASCADE_EVAL_CACHE or ~/.cache/cascade-diffusion/eval).",
    ),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Evaluate a cascade: KID/FID against held-out images, NLL bound per stage, faithfulness.

    Samples one image per held-out caption of the dataset's evaluation split (never its training
    split) and prints the report as one JSON object on the last line of stdout.
    """
    from pydantic import ValidationError
    from rich.console import Console

    from diffusion_core.data.format import DataError
    from diffusion_core.evaluation.evaluator import evaluate
    from diffusion_core.evaluation.report import EvalSettings

    err = Console(stderr=True)
    try:
        settings = EvalSettings(
            num_samples=num_samples,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
            nll_samples=nll_samples,
            metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        )
    except ValidationError as e:
        err.print(f"[red]error:[/red] invalid option: {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    if grid is None and out is not None:
        grid = out.with_suffix(".grid.png")
    try:
        with _progress_bar(err) as on_progress:
            report = evaluate(
                cascade,
                data,
                settings,
                progress=on_progress,
                cache_dir=cache_dir,
                grid=grid,
                device=device,
            )
    except (DataError, ValueError, FileNotFoundError) as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    text = report.model_dump_json()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json.loads(text), indent=2) + "\n")
    err.print(_summary_table(report))
    typer.echo(text)


class _progress_bar:
    """One rich progress bar per part of the evaluation (sample, features, nll <stage>, ...)."""

    def __init__(self, console: Any):
        from diffusion_core.progress import progress_bar

        self.progress = progress_bar(console, "evaluate")
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.progress.__enter__()

        def on_progress(part: str, done: int, total: int) -> None:
            if part not in self.tasks:
                self.tasks[part] = self.progress.add_task(part, total=total)
            self.progress.update(self.tasks[part], completed=done, total=total)

        return on_progress

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def _summary_table(report: Any):
    from rich.table import Table

    t = Table(
        title=f"evaluate on {report.dataset_version[:16]} ({report.split})", show_header=False
    )
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    for k, v in report.metrics.items():
        t.add_row(k, f"{v:.4g}")
    if "inception_seconds_per_image" in report.details:
        t.add_row("inception s/image", f"{report.details['inception_seconds_per_image']:.3f}")
        t.add_row("reference cache", report.details["reference_cache"]["status"])
    t.add_row("seconds", f"{report.seconds.get('total', 0.0):.1f}")
    return t
