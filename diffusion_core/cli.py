"""The ``cascade`` command line. Each command is a thin wrapper over a library function."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="cascade",
    help="cascade-diffusion: train and serve cascaded text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Built-in datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command()
def figures(
    out: Path = typer.Option(Path("out/figures"), "--out", help="Folder for the PNG figures."),
    seed: int = typer.Option(0, help="Seed of every random draw, for reproducible figures."),
) -> None:
    """Draw the chapter's 1-D toy figures (18.2-18.8, 18.10) from the library's own functions."""
    from diffusion_core.figures import draw_all

    paths = draw_all(out, seed=seed)
    for p in paths:
        typer.echo(str(p))


@app.command()
def demo(
    out: Path = typer.Option(Path("out"), "--out", help="Folder for everything the demo writes."),
    count: int = typer.Option(8000, "--count", help="Built-in shapes samples to train on."),
    preset: str = typer.Option("demo", "--preset", help="Training preset (demo, tiny, a YAML)."),
) -> None:
    """Run the whole pipeline on the built-in data: the chapter's figures, then the retrain flow
    (shapes -> ingest -> train every stage -> evaluate -> register -> batch-sample)."""
    figures(out=out / "figures", seed=0)
    from flows.demo import run_demo  # orchestration lives with the flows

    run_demo(out, count=count, preset=preset, echo=typer.echo)


@app.command()
def ingest(
    sources: list[str] = typer.Argument(
        ..., help="Raw inputs: img2dataset tars/folders, image folders, manifests; paths or URLs."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder for the shards and manifest."),
    resolution: int = typer.Option(64, help="Side of the square output images (top stage)."),
    shard_size: int = typer.Option(1000, help="Samples per output shard."),
    min_size: int = typer.Option(32, help="Reject images whose shorter side is smaller."),
    max_pixels: int = typer.Option(
        64_000_000, help="Refuse images with more pixels before decoding (decompression bombs)."
    ),
    max_tokens: int = typer.Option(32, help="Per-token caption states kept per sample."),
    max_file_bytes: int = typer.Option(
        64 * 2**20, help="Refuse any input file or tar member larger than this, unread."
    ),
    allow_root: list[str] = typer.Option(
        [],
        "--allow-root",
        help="A folder (or URL prefix) that manifest paths may point into besides the "
        "manifest's own folder; repeatable.",
    ),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Let manifests name fsspec URLs (s3://, https://, ...)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the dataset already in --out (refused otherwise)."
    ),
    eval_fraction: float = typer.Option(
        0.02,
        "--eval-fraction",
        help="Share of samples held out for evaluation (eval-*.tar), chosen by a hash of the "
        "sample key; 0 disables the split.",
    ),
    eval_max: int = typer.Option(
        1000, "--eval-max", help="Cap on the evaluation split (the first N held out, input order)."
    ),
) -> None:
    """Validate raw image/caption data and write versioned webdataset shards (a Ray Data job).

    A deterministic share of the samples (--eval-fraction, at most --eval-max) is written to
    separate evaluation shards; training reads only the others (docs/data.md).

    Exits 0 when the run completes, even with rejected inputs (listed in rejected.jsonl);
    non-zero when it cannot run (a missing or empty source, an unwritable output, an output
    folder that already holds a dataset).
    """
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from diffusion_core.data.ingest import IngestConfig, IngestError
    from diffusion_core.data.ingest import ingest as run_ingest

    err = Console(stderr=True)
    try:
        cfg = IngestConfig(
            sources=sources,
            out=str(out),
            resolution=resolution,
            shard_size=shard_size,
            min_size=min_size,
            max_pixels=max_pixels,
            max_tokens=max_tokens,
            max_file_bytes=max_file_bytes,
            allow_roots=allow_root,
            allow_remote=allow_remote,
            overwrite=overwrite,
            eval_fraction=eval_fraction,
            eval_max=eval_max,
        )
    except ValidationError as e:
        err.print(f"[red]error:[/red] invalid option: {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
    ) as bar:
        task = bar.add_task("ingest: starting Ray", total=None)

        def on_progress(p) -> None:
            bar.update(
                task,
                description=f"ingest: read {p.read}  accepted {p.accepted} "
                f"(eval {p.eval})  rejected {p.rejected}  shards {p.shards}",
            )

        try:
            result = run_ingest(cfg, progress=on_progress)
        except IngestError as e:
            bar.stop()
            err.print(f"[red]error:[/red] {e}", soft_wrap=True)
            raise typer.Exit(1) from None
    Console().print(_ingest_table(result))


def _ingest_table(result):
    from rich.table import Table

    t = Table(title=f"ingest -> {result.out}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("read", str(result.read))
    t.add_row("accepted", str(result.accepted))
    t.add_row("  training split", str(result.train))
    t.add_row("  evaluation split", str(result.eval))
    t.add_row("rejected", str(result.rejected))
    for reason, n in result.rejected_by_reason.items():
        t.add_row(f"  {reason}", str(n))
    t.add_row("shards", f"{len(result.shards)} + {len(result.eval_shards)} eval")
    t.add_row("dataset version", result.dataset_version[:16])
    t.add_row("seconds", f"{result.seconds:.1f}")
    return t


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Folder for the raw img2dataset-style shards."),
    count: int = typer.Option(..., "--count", help="Number of samples."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same bytes."),
    size: int = typer.Option(128, "--size", help="Side of the rendered images."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per raw shard."),
) -> None:
    """Write the built-in shapes dataset (captioned images of coloured shapes) as raw shards."""
    from diffusion_core.data.shapes import write_shapes

    try:
        paths = write_shapes(out, count, seed=seed, size=size, shard_size=shard_size)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {count} samples in {len(paths)} shards to {out}")


# `cascade train` lives with the training code (diffusion_core/training/cli.py).
from diffusion_core.training.cli import train_command  # noqa: E402

app.command("train")(train_command)

# `cascade evaluate` lives with the evaluation (diffusion_core/evaluation/cli.py).
from diffusion_core.evaluation.cli import evaluate_command  # noqa: E402

app.command("evaluate")(evaluate_command)

# `cascade register` and `cascade promote` live with the registry (diffusion_core/registry/cli.py).
from diffusion_core.registry.cli import promote_command, register_command  # noqa: E402

app.command("register")(register_command)
app.command("promote")(promote_command)

# `cascade sample` lives with the batch job (diffusion_core/batch/cli.py).
from diffusion_core.batch.cli import sample_command  # noqa: E402

app.command("sample")(sample_command)


if __name__ == "__main__":  # pragma: no cover
    app()
