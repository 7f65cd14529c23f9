"""The demo pipeline: built-in shapes → ingest → train every stage → a sample grid, checked.

:func:`run_demo` is what ``cascade demo`` runs after drawing the chapter's figures:

1. ``data shapes``: ``count`` captioned images of coloured shapes as raw img2dataset shards;
2. ``ingest`` (the Ray Data job) at the cascade's top resolution, MiniLM caption embeddings;
3. ``train`` every stage of the preset (``demo``: a 16px base and a 16→32px super-resolution
   stage) on the local Ray, one after the other, tracked in the local MLflow store;
4. samples the exported cascade for held-out captions (scenes drawn with another seed), writes
   a grid PNG, and runs the shapes checker on each image: ``report.md`` / ``report.json`` say
   which captions came out right.

Everything lands under ``out``: ``raw/``, ``data/``, ``runs/`` (Ray runs and ``mlflow.db``),
``cascade/`` (what ``Cascade.load`` reads) and ``samples/``. Orchestration only: every step is a
call into ``diffusion_core``. It becomes the ``retrain`` flow (with registration and batch
sampling) in the scheduled-retraining work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_demo(
    out: Path,
    *,
    count: int = 4000,
    preset: str = "demo",
    samples: int = 16,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pipeline (see the module docstring); returns the timings and the report."""

    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes
    from diffusion_core.evaluation.heldout import sample_and_check
    from diffusion_core.ray_env import ensure_ray
    from diffusion_core.training import load_preset, train

    out = Path(out).resolve()
    cfg = load_preset(preset)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    write_shapes(out / "raw", count, seed=0)
    timings["shapes"] = time.perf_counter() - t
    echo(f"demo: {count} shapes written to {out / 'raw'} in {timings['shapes']:.0f} s")

    t = time.perf_counter()
    ensure_ray()  # one local Ray for the ingest and the training jobs (with the dashboard)
    top = cfg.cascade.stages[-1].resolution
    data = ingest(
        IngestConfig(
            sources=[str(out / "raw")],
            out=str(out / "data"),
            resolution=top,
            text_encoder=cfg.cascade.text_encoder or "all-MiniLM-L6-v2",
            overwrite=True,  # the demo regenerates its raw data, so its dataset too
        )
    )
    timings["ingest"] = time.perf_counter() - t
    echo(f"demo: ingested {data.accepted} samples at {top}px in {timings['ingest']:.0f} s")

    results = {}
    for stage in cfg.stage_names:
        t = time.perf_counter()
        echo(f"demo: training stage {stage} ({preset} preset)")
        r = train(
            cfg.for_stage(stage, storage_path=str(out / "runs")),
            str(out / "data"),
            export_dir=str(out / "cascade"),
        )
        timings[f"train_{stage}"] = time.perf_counter() - t
        results[stage] = r
        echo(
            f"demo: {stage}: {r.step} steps, loss {r.metrics.get('loss', float('nan')):.4f}, "
            f"{timings[f'train_{stage}']:.0f} s (run {r.run_name})"
        )

    t = time.perf_counter()
    rows = sample_and_check(out / "cascade", out / "samples", train_count=count, samples=samples)
    timings["sample"] = time.perf_counter() - t
    report = {
        "faithfulness": sum(r["match"] for r in rows) / len(rows),
        "samples": rows,
        "timings_s": timings,
        "stages": {
            s: {
                "run": r.run_name,
                "steps": r.step,
                "loss": r.metrics.get("loss"),
                "img_per_s": r.metrics.get("img_per_s"),
                "mlflow_run_id": r.mlflow_run_id,
            }
            for s, r in results.items()
        },
        "tracking_uri": next(iter(results.values())).tracking_uri if results else None,
    }
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "samples" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "samples" / "report.md").write_text(report_markdown(report))
    echo(
        f"demo: {sum(r['match'] for r in rows)}/{len(rows)} held-out captions came out right "
        f"(shapes checker); grid in {out / 'samples' / 'grid.png'}"
    )
    return report


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Demo: samples for held-out captions",
        "",
        f"Faithfulness (shapes checker): **{report['faithfulness']:.0%}**",
        "",
        "| caption | exact caption in training set | matches | why not |",
        "|---|---|---|---|",
    ]
    for r in report["samples"]:
        lines.append(
            f"| {r['caption']} | {'yes' if r['in_training_set'] else 'no'} | "
            f"{'✓' if r['match'] else '✗'} | {r['reason']} |"
        )
    lines += ["", "| part | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in report["timings_s"].items()]
    lines += ["", "| stage | steps | final loss | img/s | MLflow run |", "|---|---:|---:|---:|---|"]
    for s, r in report["stages"].items():
        lines.append(
            f"| {s} | {r['steps']} | {r['loss']:.4f} | {r['img_per_s']:.0f} | "
            f"`{r['mlflow_run_id']}` |"
        )
    return "\n".join(lines) + "\n"
