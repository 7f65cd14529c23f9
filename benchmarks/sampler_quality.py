"""Quality against cost: KID / FID / faithfulness of a trained cascade per sampler and step count.

Each row is one :func:`diffusion_core.evaluation.evaluate` of the cascade on the dataset's
evaluation split, at the same held-out captions, seeds and guidance, with another sampler or
number of network calls per stage; the held-out side of KID/FID is computed once and cached
(``docs/evaluation.md``). Seconds per image are the cascade's sampling time only (the Inception
features of the samples are timed apart, in the last column). Not run by the tests.

    .venv/bin/python benchmarks/sampler_quality.py --cascade out/cascade --data out/data
    .venv/bin/python benchmarks/sampler_quality.py --cascade out/cascade --data out/data \\
        --num-samples 200 --runs ddim:10,ddim:25,ddim:50,dpmsolver++:10,dpmsolver++:20,ddpm:100 \\
        --out out/benchmarks/sampler_quality.md
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from diffusion_core.evaluation import EvalSettings, evaluate

DEFAULT_RUNS = "ddim:10,ddim:25,ddim:50,dpmsolver++:10,dpmsolver++:20,ddpm:50"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cascade", required=True, help="cascade folder (cascade.json + stages/)")
    ap.add_argument("--data", required=True, help="dataset folder with an evaluation split")
    ap.add_argument("--num-samples", type=int, default=64, help="held-out captions per row")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="sampler:steps, comma-separated")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-fid", action="store_true", help="skip FID (~4 s of eigvals per row)")
    ap.add_argument("--cache-dir", default=None, help="reference-feature cache")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    metrics = ("kid",) if args.no_fid else ("kid", "fid")
    metrics += ("faithfulness",)
    lines = [
        f"Cascade `{args.cascade}` on the evaluation split of `{args.data}`: "
        f"{args.num_samples} held-out captions, guidance {args.guidance_scale}, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}, device "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}.",
        "",
        "| sampler | steps/stage | KID ± std | FID | faithfulness | s/image (sampling) | "
        "s/image (Inception) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    dataset_version = None
    t0 = time.perf_counter()
    for run in args.runs.split(","):
        sampler, steps = run.strip().split(":")
        settings = EvalSettings(
            num_samples=args.num_samples,
            sampler=sampler,
            steps=int(steps),
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            batch_size=args.batch_size,
            metrics=metrics,
        )
        r = evaluate(args.cascade, args.data, settings, cache_dir=args.cache_dir)
        dataset_version = r.dataset_version
        m = r.metrics
        row = (
            f"| {sampler} | {steps} | {_fmt(m.get('kid'))} ± {_fmt(m.get('kid_std'), 2)} | "
            f"{_fmt(m.get('fid'))} | {_fmt(m.get('faithfulness'), 3)} | "
            f"{m['seconds_per_image']:.3f} | {r.details.get('inception_seconds_per_image', 0):.3f} |"
        )
        lines.append(row)
        print(row, flush=True)
    tail = [
        "",
        f"Dataset version `{(dataset_version or '')[:16]}`, {int(m['num_samples'])} samples per "
        f"row, {time.perf_counter() - t0:.0f} s in all. FID at this sample count is biased "
        "upwards: compare rows with each other, not with published FIDs.",
    ]
    lines += tail
    print("\n".join(tail))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
