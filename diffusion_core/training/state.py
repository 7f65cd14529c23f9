"""Training state: EMA of the weights, the learning-rate schedule, checkpoints and export.

A checkpoint is a directory (no pickle except the optimizer's own state dict, loaded with
``weights_only=True``)::

    state.json          step, epoch, dataset version, the TrainConfig, run name, metrics
    model.safetensors   the network's weights (what the optimizer updates)
    ema.safetensors     the exponential moving average of the weights (what is exported)
    optim.pt            AdamW and LR-scheduler state dicts
    rng.safetensors     every rank's torch RNG state at the checkpoint (see below)

RNG. The random draws of step ``s`` on rank ``r`` (timesteps, noise, condition dropout,
augmentation levels, dropout) come from generators seeded by ``(seed, s, r)`` at the start of the
step (:func:`step_seed`), so a run resumed at step ``s`` draws what the uninterrupted run drew.
The saved states are there for inspection; resuming restores them too, which changes nothing.

Export: :func:`export_stage` writes the EMA weights into a :class:`~diffusion_core.cascade.Cascade`
directory (``cascade.json`` + ``stages/<name>/``) that ``Cascade.load`` reads. Stages trained
separately (even concurrently) are exported into the same directory; ``cascade.json`` always lists
the longest prefix of the configured stages that is present, so the directory loads at every
point and holds the whole cascade once every stage is trained.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion_core.cascade import CASCADE_JSON, CascadeConfig, Stage
from diffusion_core.nn import UNet, save_network

STATE_JSON = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIM_FILE = "optim.pt"
RNG_FILE = "rng.safetensors"
TRAINING_JSON = "training.json"


# ============================================================================ RNG
def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (seed, step, rank): independent streams per step and rank."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def seed_step(seed: int, step: int, rank: int) -> torch.Generator:
    """Seed the global torch RNG (dropout) and return the generator for the step's draws."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s ^ 0x5DEECE66D)


# ============================================================================ EMA
class EMA:
    """Exponential moving average of a network's parameters (and a copy of its buffers).

    ``decay_at(n) = min(decay, (1 + n) / (10 + n))`` with warm-up (n = updates so far), so the
    average does not remember the random initialisation for thousands of steps.
    """

    def __init__(self, network: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in network.state_dict().items()
        }
        self._params = {k for k, _ in network.named_parameters()}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        d = self.decay_at(self.updates)
        for k, v in network.state_dict().items():
            s = self.shadow[k]
            if k in self._params and v.is_floating_point():
                s.lerp_(v.detach().float(), 1.0 - d)
            else:
                s.copy_(v)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the network: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.updates = updates


# ============================================================================ LR schedule
def lr_factor(step: int, *, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR after ``step`` completed optimizer steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRFactor:
    """A picklable LambdaLR function (so the scheduler's state dict stays plain)."""

    def __init__(self, steps: int, warmup: int, schedule: str, min_ratio: float):
        self.kw = dict(steps=steps, warmup=warmup, schedule=schedule, min_ratio=min_ratio)

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kw)  # type: ignore[arg-type]


def make_optimizer(
    network: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW; weight decay only on weight matrices and kernels (ndim >= 2)."""
    decay, no_decay = [], []
    for p in network.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# ============================================================================ checkpoints
def save_checkpoint(
    directory: str | Path,
    *,
    network: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: Mapping[str, torch.Tensor],
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
    save_file({k: v.contiguous() for k, v in rng_states.items()}, str(d / RNG_FILE))
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
    """Restore what :func:`save_checkpoint` wrote; returns ``state.json`` (+ ``rng`` states)."""
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
        if scheduler is not None:
            scheduler.load_state_dict(blob["scheduler"])
    state["rng"] = load_file(str(d / RNG_FILE)) if (d / RNG_FILE).is_file() else {}
    return state


# ============================================================================ export
@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_export_dir(export_dir: str | Path, cascade: CascadeConfig) -> None:
    """Refuse an export folder that holds stages of a different cascade config."""
    path = Path(export_dir) / TRAINING_JSON
    if not path.is_file():
        return
    held = json.loads(path.read_text()).get("cascade")
    if held not in (None, cascade.model_dump(mode="json")):
        names = [s["name"] for s in held.get("stages", [])]
        raise ValueError(
            f"export folder {export_dir} already holds stages {names} of a different cascade "
            "config; export into an empty folder (--export) or the one of this cascade"
        )


def export_stage(
    checkpoint_dir: str | Path,
    export_dir: str | Path,
    *,
    cascade: CascadeConfig,
    stage: str,
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint's EMA weights as stage ``stage`` of the cascade directory ``export_dir``.

    ``training.json`` beside ``cascade.json`` records, per stage, where the weights came from
    (``lineage``: run name, step, dataset version, MLflow run id, ...). Refuses to mix stages of
    different cascades in one directory.
    """
    export_dir = Path(export_dir)
    check_export_dir(export_dir, cascade)
    stage_cfg = next(s for s in cascade.stages if s.name == stage)
    network = UNet(stage_cfg.network)
    network.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)), strict=True)
    Stage(stage_cfg, network=network)  # cross-checks network and stage configs
    full = cascade.model_dump(mode="json")
    with _locked(export_dir):
        tpath = export_dir / TRAINING_JSON
        training = json.loads(tpath.read_text()) if tpath.is_file() else {}
        check_export_dir(export_dir, cascade)
        save_network(network, export_dir / "stages" / stage)
        training["cascade"] = full
        training.setdefault("stages", {})[stage] = {
            **dict(lineage or {}),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        present = []
        for s in cascade.stages:
            if s.name not in training["stages"]:
                break
            present.append(s)
        _write_json_atomic(tpath, training)
        if present:
            partial = cascade.model_copy(update={"stages": tuple(present)})
            CascadeConfig.model_validate(partial.model_dump())
            _write_json_atomic(export_dir / CASCADE_JSON, partial.model_dump(mode="json"))
    return export_dir
