"""The callables a sampler takes, and one call of the noise predictor.

A model is any callable ``model(z_t, t, **model_kwargs) -> eps_hat`` with ``t`` a LongTensor
``[B]`` of timesteps in ``{0, ..., T-1}`` (index ``t`` is the chapter's step ``t+1``), returning
the noise estimate g_t[z_t] of eq. 18.35 shaped like ``z_t``. A model that also learns its
variance (Nichol & Dhariwal) returns ``2C`` channels along dim 1: the noise, then ``v`` in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffusion_core.reverse import split_model_output

Tensor = torch.Tensor
EpsModel = Callable[..., Tensor]
"""``model(z_t, t, **model_kwargs) -> eps_hat`` (or ``[eps_hat, v]`` along dim 1)."""
GradLogProb = Callable[..., Tensor]
"""``grad_log_prob(z_t, t, **model_kwargs) -> grad_z log p(c | z_t)``, shaped like ``z_t``."""
Callback = Callable[[dict[str, Any]], None]
"""Called after every step with ``{"i", "t", "z", "x_hat"}``: the step count (0 first), the
model's timestep, the new state and the data prediction made at that step."""


def split_output(out: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """A model output as (eps, None), or (eps, v) when it has twice ``z``'s channels."""
    out = out.to(z.dtype)
    return split_model_output(out, z, learned_variance=out.shape != z.shape)


def predict_eps(
    model: EpsModel, z: Tensor, step: int, model_kwargs: Mapping[str, Any]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One model call at timestep ``step``: (eps, v or None, the LongTensor t)."""
    t = torch.full((z.shape[0],), step, dtype=torch.long, device=z.device)
    eps, v = split_output(model(z, t, **model_kwargs), z)
    return eps, v, t
