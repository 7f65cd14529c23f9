"""The optimiser side of a stage's run: AdamW, the learning-rate schedule, and the EMA of the
weights (what is exported and sampled)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


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




def load_lr_schedule(scheduler: Any, state: Mapping[str, Any]) -> None:
    """Load a ``LambdaLR`` state, keeping only its step count: the schedule stays the one the
    scheduler was built with (this run's config).

    ``LambdaLR`` saves the ``__dict__`` of a callable object and restores it, so a run resumed
    with more ``steps`` would otherwise keep decaying towards the *old* end; the optimizer's param
    groups also hold the LR that the old schedule set. Both are recomputed here, so the LR of
    every later step equals that of a fresh schedule with the new horizon.
    """
    # LambdaLR.load_state_dict updates the callables in place: keep their state out of it
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
