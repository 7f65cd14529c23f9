"""Ingest throughput: the Ray Data job against a plain single-process loop, same input, same work.

Both engines run the same stages (read → validate/decode/resize/PNG → MiniLM caption embedding →
shard writing); ``engine="local"`` is the plain loop. Each run is a fresh subprocess whose whole
process tree (Ray's raylet, GCS and workers included) is sampled for memory: peak of the summed
PSS (proportional set size, so shared pages are not counted twice).

    python benchmarks/ingest_throughput.py --count 20000 --sizes 5000   # the issue's figure
    python benchmarks/ingest_throughput.py --captions shapes            # repetitive captions

Input: the shapes dataset as img2dataset tars (1000 samples each, 128² PNG). By default every
caption is made unique (``... (photo 123)``), as in web data where almost no two captions are
equal; ``--captions shapes`` keeps the shapes captions (~20% distinct), which favours the single
process (one caption cache instead of one per encoder actor).

Prints one JSON line per run and a summary; ``--json PATH`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _tree_memory(pid: int) -> int:
    """Summed PSS of a process and all its descendants (Linux /proc; no psutil needed)."""
    return sum(_pss(p) for p in _tree(pid))


def run_one(engine: str, raw: str, out: str, threads: str, resolution: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--raw", raw, "--out", out,
           "--resolution", str(resolution), "--threads", threads]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    peak = [0]
    cpu: dict[int, int] = {}  # pid -> last seen CPU ticks (processes of the run's tree)

    def sample() -> None:
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peak[0] = max(peak[0], sum(_pss(p) for p in pids))
            for p in pids:
                cpu[p] = max(cpu.get(p, 0), _cpu_ticks(p))
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed with exit code {proc.returncode}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["peak_pss_mib"] = round(peak[0] / 2**20)
    # CPU seconds of the run's process tree (sampled; misses at most the last 0.5 s per process)
    result["cpu_s"] = round(sum(cpu.values()) / os.sysconf("SC_CLK_TCK"), 1)
    with open("/proc/loadavg") as f:
        result["loadavg_after"] = float(f.read().split()[0])
    return result


def write_raw(out: str, count: int, size: int, unique: bool) -> None:
    """Shapes samples as img2dataset tars (``{shard:05d}{i:04d}`` keys, 1000 per tar)."""
    import io

    from diffusion_core.data.shapes import generate
    from diffusion_core.data.tario import write_tar

    os.makedirs(out, exist_ok=True)
    for shard, start in enumerate(range(0, count, 1000)):
        members = []
        for i, caption, img, _, _ in generate(min(1000, count - start), size=size, start=start):
            key = f"{shard:05d}{i - start:04d}"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            text = f"{caption} (photo {i})" if unique else caption
            members += [(f"{key}.png", buf.getvalue()), (f"{key}.txt", text.encode())]
        write_tar(os.path.join(out, f"{shard:05d}.tar"), members)


def worker(args: argparse.Namespace) -> None:
    import torch

    from diffusion_core.data.ingest import IngestConfig, ingest

    if args.threads != "default":
        torch.set_num_threads(int(args.threads))
    cfg = IngestConfig(sources=[args.raw], out=args.out, resolution=args.resolution)
    t0 = time.perf_counter()
    res = ingest(cfg, engine=args.worker, single_thread=args.threads == "1")
    dt = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "engine": args.worker,
                "torch_threads": args.threads,
                "samples": res.accepted,
                "seconds": round(dt, 2),
                "samples_per_s": round(res.accepted / dt, 1),
                "dataset_version": res.dataset_version,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20_000, help="Samples in the largest run.")
    ap.add_argument("--sizes", default="", help="Comma-separated dataset sizes for Ray memory.")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--render", type=int, default=128, help="Side of the raw shapes images.")
    ap.add_argument("--work", default=None, help="Folder for raw data (reused) and outputs.")
    ap.add_argument("--captions", choices=("unique", "shapes"), default="unique")
    ap.add_argument("--baseline-threads", default="default", help="torch threads of the loop.")
    ap.add_argument("--json", default=None, help="Write all results to this file.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--raw", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    work = args.work or tempfile.mkdtemp(prefix="ingest-bench-")
    sizes = sorted({args.count, *(int(s) for s in args.sizes.split(",") if s)})
    results = []
    for n in sizes:
        raw = os.path.join(work, f"raw-{args.captions}-{n}")
        if not os.path.exists(os.path.join(raw, "done")):
            t = time.perf_counter()
            write_raw(raw, n, args.render, args.captions == "unique")
            open(os.path.join(raw, "done"), "w").close()
            print(f"# wrote {n} raw samples in {time.perf_counter() - t:.0f} s", flush=True)
        for engine, threads in (("local", args.baseline_threads), ("ray", "1")):
            out = os.path.join(work, f"out-{args.captions}-{engine}-{n}")
            r = run_one(engine, raw, out, threads, args.resolution)
            print(json.dumps(r), flush=True)
            results.append(r)

    def run(engine: str, n: int) -> dict:
        return next(r for r in results if r["engine"] == engine and r["samples"] == n)

    local, ray_full = run("local", args.count), run("ray", args.count)
    summary = {
        "count": args.count,
        "captions": args.captions,
        "cpu_ratio_ray_over_loop": round(ray_full["cpu_s"] / local["cpu_s"], 2),
        "speedup_ray_over_loop": round(ray_full["samples_per_s"] / local["samples_per_s"], 2),
        "memory_ratio_ray_over_loop": round(ray_full["peak_pss_mib"] / local["peak_pss_mib"], 2),
        "same_bytes": ray_full["dataset_version"] == local["dataset_version"],
        "peak_pss_mib_by_size": {
            f"{r['engine']}-{r['samples']}": r["peak_pss_mib"] for r in results
        },
    }
    if len(sizes) > 1:
        # steady state: the marginal throughput between the smallest and the largest run,
        # start-up (Ray, worker processes, model loads) cancelled out
        small = sizes[0]

        def marginal(engine: str) -> float:
            a, b = run(engine, small), run(engine, args.count)
            return (b["samples"] - a["samples"]) / (b["seconds"] - a["seconds"])

        summary["marginal_samples_per_s"] = {e: round(marginal(e), 1) for e in ("local", "ray")}
        summary["marginal_speedup_ray_over_loop"] = round(marginal("ray") / marginal("local"), 2)
        summary["startup_s"] = {
            e: round(run(e, args.count)["seconds"] - args.count / marginal(e), 1)
            for e in ("local", "ray")
        }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
