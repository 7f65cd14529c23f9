"""Training throughput with 1 and 2 Ray Train workers, and the data loader's own throughput.

For one stage of a preset (default: ``demo``, stage ``base``) on an ingested dataset:

1. **loader alone**: the reader a worker uses (:class:`ShardReader` + :class:`StepSampler`,
   PNG decode, embeddings, collate), in one thread, for the per-worker batch of the 2-worker
   run: images/s.
2. **training, 1 worker** and **2 workers** (DDP over gloo): a real ``train()`` run (real Ray,
   checkpoints off until the end, MLflow into a scratch store); images/s is the steady-state
   rate rank 0 measures over its logging windows (start-up and the first window excluded).

The loader must deliver at least 5x what the training consumes: the table prints the ratio of
the loader's rate to the 2-worker run's per-worker rate.

    python benchmarks/train_scaling.py --data out/demo/data              # ~3-4 minutes on 2 cores
    python benchmarks/train_scaling.py --data DIR --config demo --stage sr1 --steps 60

Results are printed and written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def loader_rate(data: str, batch: int, world: int, seconds: float) -> float:
    """Images/s of one worker's reader (decode + collate), one thread, rank 0's batches."""
    from diffusion_core.data.format import read_manifest
    from diffusion_core.training.reader import ShardReader, StepSampler

    reader = ShardReader(read_manifest(data))
    sampler = StepSampler(len(reader), batch * world, world, seed=0)
    reader.read_batch(sampler.indices(1, 0))  # warm the file handles
    n, step, t0 = 0, 1, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(reader.read_batch(sampler.indices(step, 0))["key"])
        step += 1
    rate = n / (time.perf_counter() - t0)
    reader.close()
    return rate


def train_rate(data: str, config: str, stage: str, workers: int, steps: int, root: Path) -> dict:
    """Steady-state images/s of a real training run with ``workers`` workers."""
    from mlflow.tracking import MlflowClient

    from diffusion_core.training import load_preset, train

    log_every = max(5, steps // 8)
    cfg = load_preset(config).for_stage(
        stage,
        steps=steps,
        warmup_steps=min(10, steps),
        log_every=log_every,
        checkpoint_every=steps,
        sample_every=0,
        storage_path=str(root / "runs"),
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        scaling={"num_workers": workers},
    )
    t0 = time.perf_counter()
    result = train(cfg, data, export_dir=None)
    wall = time.perf_counter() - t0
    history = MlflowClient(cfg.tracking_uri).get_metric_history(result.mlflow_run_id, "img_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # drop the first window
    return {
        "workers": workers,
        "steps": steps,
        "global_batch": cfg.batch_size,
        "img_per_s": statistics.median(rates),
        "per_worker_img_per_s": statistics.median(rates) / workers,
        "wall_s": wall,
        "final_loss": result.metrics.get("loss"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder (cascade ingest output)")
    p.add_argument("--config", default="demo")
    p.add_argument("--stage", default="base")
    p.add_argument("--steps", type=int, default=120, help="steps per training run")
    p.add_argument("--loader-seconds", type=float, default=10.0)
    p.add_argument("--out", default="out/bench/train_scaling.json")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)

    from diffusion_core.training import load_preset

    cfg = load_preset(args.config).for_stage(args.stage)
    per_worker = cfg.batch_size // 2
    results: dict = {"config": args.config, "stage": args.stage, "cores": os.cpu_count()}
    results["loader_img_per_s"] = loader_rate(args.data, per_worker, 2, args.loader_seconds)
    print(f"loader alone: {results['loader_img_per_s']:.0f} img/s (batch {per_worker})")
    with tempfile.TemporaryDirectory() as d:
        results["runs"] = [
            train_rate(args.data, args.config, args.stage, w, args.steps, Path(d) / f"w{w}")
            for w in (1, 2)
        ]
    one, two = results["runs"]
    results["speedup_2_vs_1"] = two["img_per_s"] / one["img_per_s"]
    results["loader_over_consumption"] = results["loader_img_per_s"] / two["per_worker_img_per_s"]
    print(f"\n{'setting':<24}{'img/s':>10}{'wall s':>10}")
    print(f"{'loader alone (1 thread)':<24}{results['loader_img_per_s']:>10.0f}{'':>10}")
    for r in results["runs"]:
        label = f"train, {r['workers']} worker(s)"
        print(f"{label:<24}{r['img_per_s']:>10.0f}{r['wall_s']:>10.1f}")
    print(f"2 vs 1 worker: {results['speedup_2_vs_1']:.2f}x")
    print(
        f"loader / per-worker consumption: {results['loader_over_consumption']:.1f}x "
        f"({'ok' if results['loader_over_consumption'] >= 5 else 'LOADER IS A BOTTLENECK'})"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
