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
``cascade/`` (what ``Cascade.load`` reads) and ``samples/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HELD_OUT_SEED = 1_000_003


def held_out_captions(n: int, train_count: int, train_seed: int = 0) -> list[tuple[str, bool]]:
    """``n`` captions of scenes drawn with a seed the training data did not use, each with
    whether the exact caption string also occurs in the training set."""
    from diffusion_core.data.shapes import sample_scene

    seen = {
        sample_scene(np.random.default_rng([train_seed, i]))[0].caption()
        for i in range(train_count)
    }
    out: list[tuple[str, bool]] = []
    i = 0
    while len(out) < n:
        caption = sample_scene(np.random.default_rng([HELD_OUT_SEED, i]))[0].caption()
        i += 1
        if caption not in (c for c, _ in out):
            out.append((caption, caption in seen))
    return out


def caption_grid(
    images: np.ndarray,
    captions: list[str],
    matches: list[bool] | None = None,
    scale: int = 4,
    cols: int = 4,
) -> Any:
    """A PIL grid of uint8 [N, H, W, 3] images (upscaled ``scale``x), each above its caption;
    with ``matches``, a green (match) or red (no match) frame and "OK"/"NO" before the caption."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cell_w, text_h = max(w * scale, 150), 40
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (h * scale + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        r, c = divmod(i, cols)
        x, y = c * cell_w, r * (h * scale + text_h)
        big = Image.fromarray(img).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        left = x + (cell_w - w * scale) // 2
        grid.paste(big, (left, y))
        if matches is not None:
            colour = (30, 160, 60) if matches[i] else (220, 30, 30)
            draw.rectangle(
                (left, y, left + w * scale - 1, y + h * scale - 1), outline=colour, width=2
            )
            cap = ("OK  " if matches[i] else "NO  ") + cap
        words, lines, line = cap.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > cell_w // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((x + 3, y + h * scale + 2 + 12 * k), text, fill="black")
    return grid


def sample_and_check(
    cascade_dir: Path, out: Path, *, train_count: int, samples: int = 16, steps: int = 50
) -> list[dict[str, Any]]:
    """Sample the cascade for held-out captions (one seed each), check every image with the
    shapes checker, write ``grid.png`` (OK/NO and a green/red frame); return a row per caption."""
    from diffusion_core.cascade import Cascade
    from diffusion_core.data.shapes import check_caption

    cascade = Cascade.load(cascade_dir)
    held = held_out_captions(samples, train_count)
    captions = [c for c, _ in held]
    images = cascade.sample(captions, seed=list(range(len(captions))), steps=steps)
    images_np = images.numpy()  # type: ignore[union-attr]
    checks = [check_caption(img, cap) for img, cap in zip(images_np, captions, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    caption_grid(images_np, captions, [c.match for c in checks]).save(out / "grid.png")
    return [
        {"caption": cap, "in_training_set": seen, "match": c.match, "reason": c.reason}
        for (cap, seen), c in zip(held, checks, strict=True)
    ]


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
