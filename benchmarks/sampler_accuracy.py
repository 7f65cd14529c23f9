"""Sampler accuracy: method x order x spacing x model calls on a 2-D Gaussian mixture, exact eps*.

With the exact noise predictor eps* (``diffusion_core.toy``) the only error left is the sampler's
own discretisation. Each row samples N points and reports the sliced Wasserstein distance to an
independent sample of the true mixture (mean and std over seeds), next to the noise floor: the
same distance between two independent true samples of size N, and their ratio. The model calls
are counted by wrapping the model. One table per schedule (linear, and the cascade's cosine, both
T = 1000). ``tests/unit/test_sampling*.py`` take their thresholds from these tables.

    .venv/bin/python benchmarks/sampler_accuracy.py               # markdown tables on stdout
    .venv/bin/python benchmarks/sampler_accuracy.py --fast --schedule cosine --seeds 2
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion_core.sampling import DEFAULT_SPACING, sample
from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import exact_eps_model, example_mixture_2d, sliced_wasserstein

# (method, order, spacing, model calls); spacing None = the method's default.
RUNS = [
    ("ddpm", None, None, 1000),
    ("ddpm", None, None, 250),
    ("ddpm", None, None, 50),
    ("ddim", None, None, 1000),
    ("ddim", None, None, 50),
    ("ddim", None, None, 20),
    ("ddim", None, None, 10),
    *[
        (method, order, spacing, calls)
        for calls in (5, 10, 20)
        for method, order in (("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3))
        for spacing in ("uniform", "logsnr", "logsnr_window", "karras")
    ],
    *[("unipc", 2, "logsnr_window", calls) for calls in (6, 8, 15)],
]
FAST = [run for run in RUNS if run[3] <= 20]


def _stats(values: list[float]) -> str:
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if len(values) > 1 else 0.0
    return f"{float(v.mean()):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="samples per run")
    parser.add_argument("--seeds", type=int, default=3, help="independent runs per row")
    parser.add_argument("--floor-pairs", type=int, default=8, help="true-vs-true pairs")
    parser.add_argument("--schedule", choices=["linear", "cosine", "both"], default="both")
    parser.add_argument("--fast", action="store_true", help="only the rows of <= 20 calls")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for kind in ("linear", "cosine") if args.schedule == "both" else (args.schedule,):
        table(kind, args)


def table(kind: str, args: argparse.Namespace) -> None:
    """One markdown table: every row of RUNS on the ``kind`` schedule (T = 1000)."""
    schedule = NoiseSchedule.linear(1000) if kind == "linear" else NoiseSchedule.cosine(1000)
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
        f"\nGaussian mixture {mixture}, {kind} schedule T={schedule.T}, N={args.n}, "
        f"{args.seeds} seeds per row, float64, exact eps*.\n"
    )
    print("| method | order | spacing | calls | sliced W1 | W1 / floor | sliced W2 | s per run |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    print(
        f"| noise floor (true vs true) | | | | {_stats([f[0] for f in floor])} | 1.00 | "
        f"{_stats([f[1] for f in floor])} | |"
    )
    for method, order, spacing, steps in FAST if args.fast else RUNS:
        spacing = spacing or DEFAULT_SPACING[method]
        w1, w2, seconds = [], [], []
        for seed in range(args.seeds):
            calls = [0]

            def counted(z_t, t, calls=calls):
                calls[0] += 1
                return model(z_t, t)

            start = time.perf_counter()
            x = sample(
                counted, (args.n, 2), schedule, method=method, steps=steps, spacing=spacing,
                order=order, generator=gen(seed), dtype=torch.float64,
            )  # fmt: skip
            seconds.append(time.perf_counter() - start)
            assert calls[0] == steps, (method, steps, calls[0])
            d1, d2 = distances(x, mixture.sample(args.n, gen(10_000 + seed)))
            w1.append(d1)
            w2.append(d2)
        ratio = float(torch.tensor(w1).mean()) / floor_w1
        print(
            f"| {method} | {order or ''} | {spacing} | {steps} | {_stats(w1)} | {ratio:.2f} | "
            f"{_stats(w2)} | {sum(seconds) / len(seconds):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
