"""Sampler accuracy: every method x step count on a 2-D Gaussian mixture with the exact predictor.

With the exact noise predictor eps* (``diffusion_core.toy``) the only error left is the sampler's
own discretisation. Each row samples N points and reports the sliced Wasserstein distance to an
independent sample of the true mixture (mean and std over seeds), next to the noise floor: the
same distance between two independent true samples of size N. ``tests/unit/test_sampling.py``
takes its thresholds from this table.

    .venv/bin/python benchmarks/sampler_accuracy.py               # markdown table on stdout
    .venv/bin/python benchmarks/sampler_accuracy.py --n 5000 --seeds 2
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion_core.sampling import DEFAULT_SPACING, sample
from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import exact_eps_model, example_mixture_2d, sliced_wasserstein

RUNS = [
    ("ddpm", 1000),
    ("ddpm", 250),
    ("ddpm", 50),
    ("ddim", 1000),
    ("ddim", 50),
    ("ddim", 20),
    ("ddim", 10),
    ("dpmsolver++", 20),
    ("dpmsolver++", 10),
]


def _stats(values: list[float]) -> str:
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return f"{float(v.mean()):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="samples per run")
    parser.add_argument("--seeds", type=int, default=3, help="independent runs per row")
    parser.add_argument("--floor-pairs", type=int, default=8, help="true-vs-true pairs")
    parser.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    parser.add_argument("--spacing", default=None, help="override every method's step spacing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    schedule = (
        NoiseSchedule.linear(1000) if args.schedule == "linear" else NoiseSchedule.cosine(1000)
    )
    mixture = example_mixture_2d()
    model = exact_eps_model(schedule, mixture)

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def distances(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return float(sliced_wasserstein(x, y, p=1)), float(sliced_wasserstein(x, y, p=2))

    floor = [
        distances(mixture.sample(args.n, gen(s)), mixture.sample(args.n, gen(100 + s)))
        for s in range(args.floor_pairs)
    ]
    floor_w1 = float(torch.tensor([f[0] for f in floor]).mean())
    print(
        f"Gaussian mixture {mixture}, {args.schedule} schedule T={schedule.T}, N={args.n}, "
        f"{args.seeds} seeds per row, float64, exact eps*.\n"
    )
    print("| method | steps | spacing | sliced W1 | W1 / floor | sliced W2 | s per run |")
    print("|---|---:|---|---:|---:|---:|---:|")
    print(
        f"| noise floor (true vs true) | | | {_stats([f[0] for f in floor])} | 1.00 | "
        f"{_stats([f[1] for f in floor])} | |"
    )
    for method, steps in RUNS:
        spacing = args.spacing or DEFAULT_SPACING[method]
        w1, w2, seconds = [], [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            x = sample(
                model, (args.n, 2), schedule, method=method, steps=steps, spacing=spacing,
                generator=gen(seed), dtype=torch.float64,
            )  # fmt: skip
            seconds.append(time.perf_counter() - start)
            d1, d2 = distances(x, mixture.sample(args.n, gen(10_000 + seed)))
            w1.append(d1)
            w2.append(d2)
        ratio = float(torch.tensor(w1).mean()) / floor_w1
        print(
            f"| {method} | {steps} | {spacing} | {_stats(w1)} | {ratio:.2f} | {_stats(w2)} | "
            f"{sum(seconds) / len(seconds):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
