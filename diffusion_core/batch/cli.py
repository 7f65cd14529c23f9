"""``cascade sample``: the batch-sampling job from the command line (registered in cli.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from diffusion_core.cascade.config import DEFAULT_SAMPLER, DEFAULT_STEPS


def sample_command(
    model: str = typer.Option(
        ...,
        "--model",
        help="A cascade folder (local or s3://bucket/prefix), or models:/NAME@ALIAS or "
        "models:/NAME/VERSION.",
    ),
    prompts: list[str] = typer.Option(
        ..., "--prompts", help="Prompts file (.txt, .jsonl, .csv, .parquet); repeatable."
    ),
    out: str = typer.Option(
        ..., "--out", help="Output folder or fsspec URI (s3://bucket/prefix; credentials from the "
        "environment): images or shards, manifest, summary."
    ),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Job seed (rows without a seed derive theirs)."),
    steps: int = typer.Option(
        DEFAULT_STEPS, "--num-inference-steps", help="Network calls per stage."
    ),
    sampler: str = typer.Option(
        DEFAULT_SAMPLER, "--sampler", help="unipc, ddim, dpmsolver++ or ddpm."
    ),
    guidance_scale: float = typer.Option(3.0, "--guidance-scale", help="Classifier-free guidance."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per actor call."),
    actors: int = typer.Option(1, "--actors", help="Sampler actors (each loads the model once)."),
    actor_cpus: float = typer.Option(0.5, "--actor-cpus", help="CPUs per actor."),
    actor_gpus: float = typer.Option(0.0, "--actor-gpus", help="GPUs per actor."),
    torch_threads: int = typer.Option(
        0, "--torch-threads", help="Torch threads per actor (0: its --actor-cpus, at least 1)."
    ),
    fmt: str = typer.Option(
        "png", "--format", help="png (images/<id>.png) or webdataset (shards/shard-NNNNNN.tar)."
    ),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per webdataset shard."),
) -> None:
    """Sample one image per prompt (or K) with a Ray Data job: deterministic and resumable.

    Exits 0 when the job completes (rejected rows are listed in rejected.jsonl), 1 when it cannot
    run or fails, 2 on bad options. The last line printed is the summary as JSON.
    """
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from diffusion_core.batch import BatchConfig, BatchError, SamplerSettings, run_batch

    err = Console(stderr=True)
    try:
        cfg = BatchConfig(
            model=model,
            prompts=prompts,
            out=out,
            images_per_prompt=images_per_prompt,
            seed=seed,
            settings=SamplerSettings(
                sampler=sampler, num_inference_steps=steps, guidance_scale=guidance_scale
            ),
            batch_size=batch_size,
            num_actors=actors,
            actor_cpus=actor_cpus,
            actor_gpus=actor_gpus,
            torch_threads=torch_threads or None,
            format=fmt,
            shard_size=shard_size,
        )
    except ValidationError as e:
        err.print(f"[red]error:[/red] invalid option: {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err,
    ) as bar:  # fmt: skip
        task = bar.add_task("sample: pinning the model", total=None)

        def on_progress(stage: str, done: int, total: int | None) -> None:
            bar.update(task, description=f"sample: {stage}", completed=done, total=total)

        try:
            result = run_batch(cfg, progress=on_progress)
        except BatchError as e:
            bar.stop()
            err.print(f"[red]error:[/red] {e}", soft_wrap=True)
            raise typer.Exit(1) from None
    if result.nothing_to_do:
        err.print(f"nothing to do: {result.images} images of this job are already in {cfg.out}")
    else:
        err.print(
            f"{result.written} images written ({result.resumed} already there), "
            f"{result.rejected} rows rejected, {result.images_per_s:.2f} images/s -> {cfg.out}"
        )
    typer.echo(json.dumps(asdict(result), sort_keys=True))
