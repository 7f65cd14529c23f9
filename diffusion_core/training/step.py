"""The optimiser step of a cascade stage: losses, backward, the gradient guard, clipping, AdamW."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion_core.cascade import Stage, stage_losses

Tensor = torch.Tensor


def training_step(
    stage: Stage,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    *,
    model: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One optimisation step of a stage (Algorithm 18.1): losses, backward, clipping, step.

    Returns detached scalars (``loss``, ``mse``, ``vlb`` for the hybrid loss, ``grad_norm``) as
    tensors. ``grad_norm`` (the global L2 norm before clipping) is always computed, with or without
    ``max_grad_norm``, so a non-finite gradient behind a finite loss is never silent: when the loss
    or the gradient is not finite the optimizer does **not** step (the weights stay as they were)
    and the caller sees the non-finite value. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the
    forward under ``torch.autocast``.
    """
    net = stage.network if model is None else model
    net.train()
    device = next(stage.network.parameters()).device
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        losses = stage_losses(stage, batch, model=net, generator=generator)
    loss = losses["loss"].float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    out = {k: v.detach().float().mean() for k, v in losses.items()}
    params = [p for p in net.parameters() if p.grad is not None]
    if max_grad_norm is None:
        out["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    # one host sync per step; the training loop reads the loss every step anyway
    if bool(torch.isfinite(out["grad_norm"]) & torch.isfinite(out["loss"])):
        optimizer.step()
    return out
