"""The per-worker training loop of one cascade stage (runs inside Ray Train workers).

Each rank builds the stage, wraps it in DistributedDataParallel (gloo on CPU, NCCL on GPU), reads
its slice of every global batch (:mod:`diffusion_core.training.data`) and runs
:func:`diffusion_core.cascade.training_step` (AdamW, clipping, condition dropout, bf16 autocast on
GPU). Rank 0 keeps the EMA, writes checkpoints every ``checkpoint_every`` steps (every rank calls
``ray.train.report`` the same number of times; only rank 0 passes a checkpoint), logs metrics and
sample grids to MLflow, and writes ``progress.json`` for the driver's progress bar.

Resume: ``ray.train.get_checkpoint()`` (the latest checkpoint of this run, after a worker failure
or an explicit ``--resume``) restores weights, EMA, optimizer, scheduler and step; the data order
and the random draws are functions of (seed, step, rank), so the continuation is the same
computation as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_core.cascade import (
    TEXT_KEYS,
    Stage,
    images_to_model,
    model_to_images,
    resize,
    training_step,
)
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.data import ShardReader, StepSampler, iter_batches, read_manifest
from diffusion_core.training.state import (
    EMA,
    LRFactor,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    seed_step,
)

PROGRESS_JSON = "progress.json"
ATTEMPTS_JSONL = "attempts.jsonl"
NONFINITE_JSON = "nonfinite.json"
FAULT_ENV = "CASCADE_TRAIN_FAULT"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; no checkpoint was written after it."""


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Test hook: ``$CASCADE_TRAIN_FAULT = {"step": s, "rank": r, "kind": "exit"|"nan"|"raise",
    "marker": path, "delay_s": d}`` kills/breaks rank r at step s (after d seconds), once (the
    marker file records that it did)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault = json.loads(spec)
    if step != fault["step"] or rank != fault.get("rank", 0) or fault.get("kind") == "nan":
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "rank": rank, "pid": os.getpid()}))
    time.sleep(float(fault.get("delay_s", 0)))
    if fault.get("kind", "exit") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def _nan_fault(step: int, rank: int) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    fault = json.loads(spec)
    return fault.get("kind") == "nan" and step == fault["step"] and rank == fault.get("rank", 0)


# ============================================================================ sample grids
def grid_image(rows: list[torch.Tensor], size: int) -> np.ndarray:
    """Rows of uint8 [N, h, w, 3] images, each upsampled (nearest) to ``size``, tiled with a
    1-pixel gap: a [rows*(size+1)-1, N*(size+1)-1, 3] array."""
    n = rows[0].shape[0]
    out = np.full((len(rows) * (size + 1) - 1, n * (size + 1) - 1, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for c in range(n):
            img = imgs[c].numpy()
            f = size // img.shape[0]
            img = img.repeat(f, 0).repeat(f, 1)
            out[r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = (
                img
            )
    return out


def make_grid(
    stage: Stage, ema_net: torch.nn.Module, batch: dict[str, Any], cfg: TrainConfig
) -> np.ndarray:
    """A sample grid of the EMA weights: (SR: the low-res input,) samples, the training images."""
    device = next(ema_net.parameters()).device
    ema_stage = Stage(stage.config, network=ema_net)  # type: ignore[arg-type]
    images = images_to_model(batch["image"]).to(device)
    x = resize(images, stage.resolution)
    low = None
    rows: list[torch.Tensor] = []
    if stage.is_super_resolution:
        low = resize(images, stage.config.network.low_res_size)  # type: ignore[arg-type]
        rows.append(model_to_images(low).cpu())
    cond = {k: batch[k] for k in TEXT_KEYS}
    gen = torch.Generator(device).manual_seed(cfg.seed)
    with torch.no_grad():
        samples = ema_stage.sample(
            cond,
            x.shape[0],
            low_res=low,
            steps=cfg.sample_steps,
            guidance_scale=cfg.guidance_scale,
            generator=gen,
        )
    rows += [model_to_images(samples).cpu(), model_to_images(x).cpu()]
    return grid_image(rows, max(stage.resolution, 32) * 2)


# ============================================================================ the loop
class _Tracker:
    """MLflow from rank 0: metrics (deduplicated across restarts) and sample-grid artifacts."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        self.run_id = run_id
        self.logged_until = 0
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            history = self.client.get_metric_history(run_id, "loss")
            self.logged_until = max((m.step for m in history), default=0)
        self.pending: list[Any] = []

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.client is None or step <= self.logged_until:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in values.items()]

    def flush(self) -> None:
        if self.client is None or not self.pending:
            return
        for i in range(0, len(self.pending), 900):
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 900])
        self.pending = []

    def image(self, image: np.ndarray, name: str) -> None:
        if self.client is None:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            Image.fromarray(image).save(path)
            self.client.log_artifact(self.run_id, str(path), "samples")


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point. ``payload``: ``config`` (a TrainConfig as JSON data) and ``run``
    (run name and directory, data path, MLflow run id and tracking URI, ``stop_at``)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(payload["config"])
    run: dict[str, Any] = payload["run"]
    torch.set_num_threads(cfg.scaling.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_dir = Path(run["run_dir"]) if run.get("run_dir") else None

    if run_dir is not None and (run_dir / NONFINITE_JSON).exists():
        info = json.loads((run_dir / NONFINITE_JSON).read_text())
        raise NonFiniteLossError(
            f"not retrying: this run already hit a non-finite loss at step {info['step']} "
            f"(deterministic data and RNG would hit it again); {info['message']}"
        )

    # ---- the stage (initialised from the seed: same on every rank and every run), DDP, ...
    torch.manual_seed(cfg.seed)
    stage = Stage(cfg.stage_config)
    stage.network.to(device)
    model: torch.nn.Module = stage.network
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            stage.network, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(
        stage.network, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRFactor(cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.lr_min_ratio)
    )
    ema = EMA(stage.network, cfg.ema_decay, cfg.ema_warmup) if rank == 0 else None
    autocast = None
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        autocast = torch.bfloat16

    # ---- resume
    info = read_manifest(run["data"])
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(
                d,
                network=stage.network,
                ema=ema,
                optimizer=optimizer,
                scheduler=scheduler,
                device=device,
            )
        if state["dataset_version"] != info.version:
            raise RuntimeError(
                f"the checkpoint was trained on dataset {state['dataset_version'][:12]} but "
                f"{run['data']} is version {info.version[:12]}: resume with the same data"
            )
        start = int(state["step"])
    stop = min(cfg.steps, int(run.get("stop_at") or cfg.steps))
    node = ray.get_runtime_context().get_node_id()
    nodes = _gather({"rank": rank, "node_id": node, "host": socket.gethostname()}, world)
    if rank == 0 and run_dir is not None:
        with open(run_dir / ATTEMPTS_JSONL, "a") as f:
            attempt = {"time": time.time(), "start_step": start, "stop": stop, "workers": nodes}
            f.write(json.dumps(attempt) + "\n")

    # ---- data
    reader = ShardReader(info)
    sampler = StepSampler(len(reader), cfg.batch_size, world, cfg.seed)
    tracker = _Tracker(run.get("tracking_uri"), run.get("mlflow_run_id")) if rank == 0 else None
    grid_batch = reader.read_batch(range(min(cfg.sample_count, len(reader)))) if rank == 0 else None

    last_ckpt = {"step": start}

    def checkpoint_and_report(step: int, metrics: dict[str, float]) -> None:
        report = {"step": step, **metrics}
        rng = _gather(torch.get_rng_state(), world)  # a collective: every rank takes part
        last_ckpt["step"] = step
        if rank != 0:
            ray.train.report(report)
            return
        assert ema is not None
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(
                d,
                network=stage.network,
                ema=ema,
                optimizer=optimizer,
                scheduler=scheduler,
                rng_states={f"rank{r}.torch": s for r, s in enumerate(rng)},
                state={
                    "step": step,
                    "epoch": sampler.epoch_of(step),
                    "dataset_version": info.version,
                    "run_name": run["run_name"],
                    "config": cfg.model_dump(mode="json"),
                    "metrics": metrics,
                    "rng_scheme": "per-step: seed_step(seed, step, rank)",
                },
            )
            ray.train.report(
                report,
                checkpoint=Checkpoint.from_directory(d),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )

    def log_grid(step: int) -> None:
        assert tracker is not None and ema is not None and grid_batch is not None
        ema_net = type(stage.network)(stage.config.network).to(device)
        ema_net.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
        image = make_grid(stage, ema_net, grid_batch, cfg)
        tracker.image(image, f"{cfg.stage}_step{step:07d}.png")
        if run_dir is not None:
            from PIL import Image

            (run_dir / "samples").mkdir(exist_ok=True)
            Image.fromarray(image).save(run_dir / "samples" / f"step{step:07d}.png")

    # ---- steps
    window: list[tuple[float, float]] = []
    t_last = time.perf_counter()
    last_metrics: dict[str, float] = {}
    for step, batch in iter_batches(
        reader, sampler, rank=rank, first_step=start + 1, last_step=stop, prefetch=cfg.prefetch
    ):
        gen = seed_step(cfg.seed, step, rank)
        if _nan_fault(step, rank):
            batch = dict(batch, text_pooled=batch["text_pooled"] * float("nan"))
        out = training_step(
            stage,
            batch,
            optimizer,
            model=model,
            generator=gen,
            max_grad_norm=cfg.grad_clip,
            autocast_dtype=autocast,
        )
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        # the global mean loss (every rank's batch), and NaN/Inf anywhere seen by every rank
        zero = torch.zeros((), device=out["loss"].device)
        stats = torch.stack([out["loss"], out.get("grad_norm", zero)]).float()
        if world > 1:  # on the device: NCCL reduces CUDA tensors only
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats /= world
        loss, grad_norm = (float(v) for v in stats.cpu())
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            msg = (
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                f"{step} (loss={loss}, grad_norm={grad_norm}); the last good checkpoint (step "
                f"{last_ckpt['step'] or 'none yet'}) is intact; start a new run with a lower lr, "
                "more warmup_steps or grad_clip set"
            )
            if run_dir is not None:
                _write_json_atomic(run_dir / NONFINITE_JSON, {"step": step, "message": msg})
            raise NonFiniteLossError(msg)
        if ema is not None:
            ema.update(stage.network)
        _maybe_inject_fault(step, rank)
        window.append((loss, grad_norm))
        if rank == 0 and (step % cfg.log_every == 0 or step == stop):
            now = time.perf_counter()
            n = len(window)
            metrics = {
                "loss": sum(w[0] for w in window) / n,
                "grad_norm": sum(w[1] for w in window) / n,
                "lr": lr,
                "img_per_s": n * cfg.batch_size / max(now - t_last, 1e-9),
                "epoch": sampler.epoch_of(step),
            }
            t_last, window = now, []
            last_metrics = metrics
            assert tracker is not None
            tracker.metrics(step, metrics)
            tracker.flush()
            if run_dir is not None:
                _write_json_atomic(
                    run_dir / PROGRESS_JSON,
                    {
                        "step": step,
                        "steps": cfg.steps,
                        "stop": stop,
                        **metrics,
                        "time": time.time(),
                    },
                )
        elif rank != 0 and (step % cfg.log_every == 0 or step == stop):
            window = []
        if step % cfg.checkpoint_every == 0 or step == stop:
            checkpoint_and_report(step, last_metrics if rank == 0 else {})
        if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0 and step != stop:
            log_grid(step)
    if rank == 0:
        assert tracker is not None
        tracker.flush()
        if stop == cfg.steps and start < stop:
            log_grid(stop)
    reader.close()
