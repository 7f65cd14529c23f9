"""Batch sampling throughput: the Ray Data job at 1 and 2 actors against a plain in-process loop.

The same cascade (a trained folder, or the ``demo`` preset's networks with random weights), the
same prompts and settings; every image sampled alone (``per_image=True``, what the job does, so
the images are byte-identical across all runs). The loop runs twice: with torch's natural thread
count and with 1 thread. Reported, side by side in one run: images/s in the steady state
(between 10% and 90% of the images: actors started, model loaded, no tail), images/s of the
whole sampling phase, end-to-end seconds, and the peak resident memory of all processes involved
(the driver and Ray's workers). Compare ratios, not absolute figures, on a shared machine.

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


def _loop(cascade, prompts: list[str], args, threads: int) -> dict[str, float]:
    """The peer: the same per-image sampling in this process, ``threads`` intra-op threads."""
    import torch

    from diffusion_core.batch.prompts import derive_seed

    torch.set_num_threads(threads)
    with PeakMemory() as mem:
        t = time.perf_counter()
        for i, p in enumerate(prompts):
            cascade.sample([p], seed=[derive_seed(0, f"p-{i + 1}")], sampler=args.sampler,
                           steps=args.steps, guidance_scale=3.0, per_image=True)  # fmt: skip
        s = time.perf_counter() - t
    n = len(prompts)
    return {"images_per_s": n / s, "steady_per_s": n / s, "seconds": s, "peak_gb": mem.peak / 2**30}


class Steady:
    """images/s between 10% and 90% of the images (actors started, model loaded, no tail)."""

    def __init__(self, total: int) -> None:
        self.total, self.marks = total, []

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage == "sample":
            self.marks.append((time.perf_counter(), done))

    def rate(self) -> float:
        lo = next(m for m in self.marks if m[1] >= 0.1 * self.total)
        hi = next(m for m in self.marks if m[1] >= 0.9 * self.total)
        return (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cascade", help="a cascade folder (default: the demo preset, random)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--batch-size", type=int, default=8)
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
    natural = torch.get_num_threads()
    cascade = Cascade.load(cascade_dir)
    rows: dict[str, dict[str, float]] = {}

    def done(name: str, row: dict[str, float]) -> None:
        rows[name] = row
        print(name, json.dumps(row), flush=True)  # as it goes: a run can take minutes

    done(f"loop ({natural} threads)", _loop(cascade, prompts, args, natural))
    done("loop (1 thread)", _loop(cascade, prompts, args, 1))
    for actors in (1, 2):
        cfg = BatchConfig(model=str(cascade_dir), prompts=[str(tmp / "p.txt")],
                          out=str(tmp / f"out{actors}"), settings=settings, num_actors=actors,
                          batch_size=args.batch_size, contact_sheet=0)  # fmt: skip
        steady = Steady(len(prompts))
        with PeakMemory() as mem:
            r = run_batch(cfg, progress=steady)
        done(f"Ray job, {actors} actor{'s' * (actors > 1)}", {
            "images_per_s": r.images_per_s, "steady_per_s": steady.rate(), "seconds": r.seconds,
            "peak_gb": mem.peak / 2**30,
        })  # fmt: skip
    base = rows["loop (1 thread)"]
    one = rows["Ray job, 1 actor"]
    print(f"{len(prompts)} prompts, {args.sampler} {args.steps} steps, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, cascade {cascade_dir}")  # fmt: skip
    print("| run | images/s steady | vs loop 1 thread | images/s sampling phase | end to end s "
          "| vs 1 actor (end to end) | peak RSS GB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['steady_per_s']:.2f} | {r['steady_per_s'] / base['steady_per_s']:.2f}x "
              f"| {r['images_per_s']:.2f} | {r['seconds']:.1f} | {one['seconds'] / r['seconds']:.2f}x "
              f"| {r['peak_gb']:.2f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
