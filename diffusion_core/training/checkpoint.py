"""Checkpoints of a stage's run, and the per-step random streams that make resuming exact.

A checkpoint is a directory (no pickle except the optimizer's own state dict, loaded with
``weights_only=True``)::

    state.json          step, epoch, dataset version, the TrainConfig, run name, metrics
    model.safetensors   the network's weights (what the optimizer updates)
    ema.safetensors     the exponential moving average of the weights (what is exported)
    optim.pt            AdamW and LR-scheduler state dicts

RNG. The random draws of step ``s`` on rank ``r`` (timesteps, noise, condition dropout,
augmentation levels, dropout) come from generators seeded by ``(seed, s, r)`` at the start of the
step (:func:`seed_step`), so a run resumed at step ``s`` draws exactly what the uninterrupted run
drew. No RNG state is saved: there is none to restore (``docs/training.md``, "Resume").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion_core.training.optim import EMA, load_lr_schedule

STATE_JSON = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optim.pt"
CHECKPOINT_FILES = (STATE_JSON, MODEL_FILE, EMA_FILE, OPTIM_FILE)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (seed, step, rank): independent streams per step and rank."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int) -> torch.Generator:
    """Seed the global torch RNG (dropout) and return the generator for the step's draws."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s ^ 0x5DEECE66D)


def checkpoint_dir_name(step: int) -> str:
    """The name of the checkpoint of ``step`` in the run's folder (given to Ray Train)."""
    return f"checkpoint_{step:08d}"


def save_checkpoint(
    directory: str | Path,
    *,
    network: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: Mapping[str, Any],
) -> Path:
    """Write a checkpoint directory (see the module docstring)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(network.state_dict()), str(d / MODEL_FILE))
    save_file(_cpu(ema.state_dict()), str(d / EMA_FILE), metadata={"updates": str(ema.updates)})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / OPTIM_FILE
    )
    (d / STATE_JSON).write_text(json.dumps(dict(state), indent=2, sort_keys=True) + "\n")
    return d


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def read_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint: no {STATE_JSON}")
    return json.loads(path.read_text())


def load_checkpoint(
    directory: str | Path,
    *,
    network: torch.nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns ``state.json``."""
    d = Path(directory)
    state = read_state(d)
    network.load_state_dict(load_file(str(d / MODEL_FILE), device=str(device)), strict=True)
    if ema is not None:
        from safetensors import safe_open

        with safe_open(str(d / EMA_FILE), framework="pt") as f:
            updates = int((f.metadata() or {}).get("updates", state["step"]))
        ema.load_state_dict(load_file(str(d / EMA_FILE)), updates)
    if optimizer is not None or scheduler is not None:
        blob = torch.load(d / OPTIM_FILE, map_location=device, weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None:  # the step count only: the schedule is this run's (resume)
            load_lr_schedule(scheduler, blob["scheduler"])
    return state


