"""Batch sampling throughput: the Ray Data job at 1 and 2 actors against a plain in-process loop.

The same cascade (a trained folder, or the ``demo`` preset's networks with random weights), the
same prompts and settings; every image sampled alone (``per_image=True``, what the job does, so
the images are byte-identical across the three). Reported: images/s of the sampling phase (the
job's steady state: actors started, model loaded), end-to-end seconds, and the peak resident
memory of all processes involved (the driver and Ray's workers), side by side in one run.

    python benchmarks/batch_sampling.py [--cascade DIR] [--prompts 300] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (Linux)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak total RSS of this process and its descendants (Ray's raylet and workers)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(os.getpid())))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_cascade(path: Path) -> Path:
    import torch

    from diffusion_core.cascade import Cascade
    from diffusion_core.training import load_preset

    cfg = load_preset("demo").cascade.model_copy(update={"text_encoder": "hash-test"})
    torch.manual_seed(0)
    Cascade.from_config(cfg).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cascade", help="a cascade folder (default: the demo preset, random)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from diffusion_core.batch import BatchConfig, SamplerSettings, run_batch
    from diffusion_core.cascade import Cascade

    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    cascade_dir = Path(args.cascade) if args.cascade else make_cascade(tmp / "cascade")
    prompts = [f"{n} {c} {s}" for n, c, s in zip(
        [str(i) for i in range(args.prompts)], ["red", "blue", "green"] * args.prompts,
        ["circles", "squares", "triangles", "stars"] * args.prompts, strict=False)]  # fmt: skip
    (tmp / "p.txt").write_text("\n".join(prompts) + "\n")
    settings = SamplerSettings(sampler=args.sampler, num_inference_steps=args.steps)
    rows = {}

    torch.set_num_threads(1)
    cascade = Cascade.load(cascade_dir)
    with PeakMemory() as mem:
        t = time.perf_counter()
        from diffusion_core.batch.prompts import derive_seed

        for i, p in enumerate(prompts):
            cascade.sample([p], seed=[derive_seed(0, f"p-{i + 1}")], sampler=args.sampler,
                           steps=args.steps, guidance_scale=3.0, per_image=True)  # fmt: skip
        loop_s = time.perf_counter() - t
    rows["loop (1 process, 1 thread)"] = {
        "images_per_s": len(prompts) / loop_s, "seconds": loop_s, "peak_gb": mem.peak / 2**30
    }  # fmt: skip
    for actors in (1, 2):
        cfg = BatchConfig(model=str(cascade_dir), prompts=[str(tmp / "p.txt")],
                          out=str(tmp / f"out{actors}"), settings=settings, num_actors=actors,
                          contact_sheet=0)  # fmt: skip
        with PeakMemory() as mem:
            r = run_batch(cfg)
        rows[f"Ray job, {actors} actor{'s' * (actors > 1)}"] = {
            "images_per_s": r.images_per_s, "seconds": r.seconds, "peak_gb": mem.peak / 2**30
        }  # fmt: skip
    base = rows["loop (1 process, 1 thread)"]["images_per_s"]
    print(f"{len(prompts)} prompts, {args.sampler} {args.steps} steps, cascade {cascade_dir}")
    print("| run | images/s (sampling) | vs loop | end to end s | peak RSS GB |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f}x | "
              f"{r['seconds']:.1f} | {r['peak_gb']:.2f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
