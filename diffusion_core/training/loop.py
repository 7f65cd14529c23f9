"""The per-worker training loop of one cascade stage (runs inside Ray Train workers).

Each rank builds the stage, wraps it in DistributedDataParallel (gloo on CPU, NCCL on GPU), reads
its slice of every global batch (:mod:`diffusion_core.training.reader`) and runs
:func:`diffusion_core.training.step.training_step` (AdamW, clipping, the gradient guard,
condition dropout, bf16 autocast on GPU). Rank 0 keeps the EMA, writes checkpoints every ``checkpoint_every`` steps (every rank calls
``ray.train.report`` the same number of times; only rank 0 passes a checkpoint), logs metrics and
sample grids to MLflow, and writes ``progress.json`` for the driver's progress bar.

Resume: ``ray.train.get_checkpoint()`` (the latest checkpoint of this run, after a worker failure
or an explicit ``--resume``) restores weights, EMA, optimizer and step (the LR schedule is this run's
config: a resume with more steps stretches it, :func:`~diffusion_core.training.optim.load_lr_schedule`);
the data order and the random draws are functions of (seed, step, rank), so the continuation is
the same computation as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_core.cascade import TEXT_KEYS, Stage, images_to_model, model_to_images, resize
from diffusion_core.data.format import read_manifest
from diffusion_core.evaluation.grids import grid_image
from diffusion_core.storage import (
    append_bytes,
    exists,
    join,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from diffusion_core.training.checkpoint import (
    checkpoint_dir_name,
    load_checkpoint,
    save_checkpoint,
    seed_step,
)
from diffusion_core.training.config import TrainConfig
from diffusion_core.training.faults import maybe_inject_fault, nan_fault
from diffusion_core.training.optim import EMA, LRFactor, make_optimizer
from diffusion_core.training.reader import ShardReader, StepSampler, iter_batches
from diffusion_core.training.runs import ATTEMPTS_JSONL, NONFINITE_JSON, PROGRESS_JSON
from diffusion_core.training.step import training_step
from diffusion_core.training.tracking import Tracker


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; no checkpoint was written after it.

    Not transient: the data order and the random draws are deterministic, so a retry would
    diverge at the same step."""

    transient = False


# ============================================================================ sample grids
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
def warm_start_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of ``cfg.stage`` in the cascade folder ``cfg.init_weights``: the network
    config must be the one being trained (a warm start changes the weights, not the model)."""
    from diffusion_core.nn import load_network

    path = Path(cfg.init_weights or "") / "stages" / cfg.stage
    try:
        net = load_network(path, expected_config=cfg.stage_config.network)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot warm-start stage {cfg.stage!r} from {cfg.init_weights}: {e}") from e
    return net.state_dict()


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
    # the run's folder or object-store prefix: the same filesystem layer as the checkpoints
    run_dir: str | None = run.get("run_dir")

    if run_dir is not None and exists(join(run_dir, NONFINITE_JSON)):
        info = read_json(join(run_dir, NONFINITE_JSON))
        raise NonFiniteLossError(
            f"not retrying: this run already hit a non-finite loss at step {info['step']} "
            f"(deterministic data and RNG would hit it again); {info['message']}"
        )

    # ---- the stage (initialised from the seed: same on every rank and every run), DDP, ...
    torch.manual_seed(cfg.seed)
    stage = Stage(cfg.stage_config)
    if cfg.init_weights:  # warm start (the EMA below starts from these weights too)
        stage.network.load_state_dict(warm_start_weights(cfg))
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
        attempt = {"time": time.time(), "start_step": start, "stop": stop, "workers": nodes}
        append_bytes(join(run_dir, ATTEMPTS_JSONL), (json.dumps(attempt) + "\n").encode())

    # ---- data
    reader = ShardReader(info)
    sampler = StepSampler(len(reader), cfg.batch_size, world, cfg.seed)
    tracker = Tracker(run.get("mlflow_run_id")) if rank == 0 else None
    grid_batch = reader.read_batch(range(min(cfg.sample_count, len(reader)))) if rank == 0 else None

    last_ckpt = {"step": start}

    def checkpoint_and_report(step: int, metrics: dict[str, float]) -> None:
        report = {"step": step, **metrics}
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
                checkpoint_dir_name=checkpoint_dir_name(step),
            )

    def log_grid(step: int) -> None:
        assert tracker is not None and ema is not None and grid_batch is not None
        ema_net = type(stage.network)(stage.config.network).to(device)
        ema_net.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
        image = make_grid(stage, ema_net, grid_batch, cfg)
        tracker.image(image, f"{cfg.stage}_step{step:07d}.png")
        if run_dir is not None:
            import io

            from PIL import Image

            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            write_bytes_atomic(join(run_dir, "samples", f"step{step:07d}.png"), png.getvalue())

    # ---- steps
    window: list[tuple[float, float]] = []
    t_last = time.perf_counter()
    last_metrics: dict[str, float] = {}
    for step, batch in iter_batches(
        reader, sampler, rank=rank, first_step=start + 1, last_step=stop, prefetch=cfg.prefetch
    ):
        gen = seed_step(cfg.seed, step, rank)
        if nan_fault(step, rank):
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
        stats = torch.stack([out["loss"], out["grad_norm"]]).float()
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
                write_json_atomic(join(run_dir, NONFINITE_JSON), {"step": step, "message": msg})
            raise NonFiniteLossError(msg)
        if ema is not None:
            ema.update(stage.network)
        maybe_inject_fault(step, rank)
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
                write_json_atomic(
                    join(run_dir, PROGRESS_JSON),
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
