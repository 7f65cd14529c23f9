"""Guidance (18.6.3): classifier guidance and classifier-free guidance.

- Classifier guidance: a sampler gets ``grad_log_prob(z_t, t, **model_kwargs) -> grad log
  p(c | z_t)`` (closed-form, or :func:`classifier_grad` over a classifier network) and a
  ``classifier_scale`` s. Ancestral sampling shifts the mean by ``sigma_t^2 * s * grad``
  (eq. 18.40, :func:`guide_mean`); DDIM and DPM-Solver++, which have no sampling variance to scale
  by, use the equivalent noise form ``eps - sqrt(1 - alpha_bar_t) * s * grad`` (Dhariwal & Nichol,
  2021, sec. 4.2; :func:`guide_eps`).
- Classifier-free guidance: wrap the model with :func:`classifier_free_guidance`; the result is
  an ordinary model callable for any sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_core.sampling.model import EpsModel, GradLogProb, split_output
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor


# --------------------------------------------------------------------- classifier guidance
@dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance as a sampler applies it: the gradient, its scale and where it acts.

    ``on_mean``: shift the mean of the step (eq. 18.40, ancestral sampling), else the noise
    estimate before the data prediction (the noise form, for the ODE samplers).
    """

    grad_log_prob: GradLogProb
    scale: float
    on_mean: bool


def guide_mean(mean: Tensor, variance: Tensor | float, scale: float, grad: Tensor) -> Tensor:
    """The guided mean f_t + sigma_t^2 * s * grad log p(c|z_t) (eq. 18.40, with a scale s)."""
    return mean + variance * scale * grad


def guide_eps(schedule: NoiseSchedule, i: int, eps: Tensor, scale: float, grad: Tensor) -> Tensor:
    """Classifier guidance in noise form: eps - sqrt(1-alpha_bar_t) * s * grad log p(c|z_t)."""
    return eps - float(schedule.sqrt_one_minus_alpha_bar[i]) * scale * grad


def classifier_grad(classifier: Callable[[Tensor, Tensor], Tensor], y: Tensor | int) -> GradLogProb:
    """grad_z log p(y | z_t) by autograd through a noisy classifier, for eq. 18.40.

    ``classifier(z_t, t) -> logits [B, n_classes]`` (normalised with ``log_softmax`` here);
    ``y`` an int or LongTensor ``[B]``. Returns ``grad_log_prob(z_t, t, **_)`` for the samplers'
    ``grad_log_prob`` argument (model kwargs are ignored: the class is fixed by ``y``).
    """

    def grad_log_prob(z_t: Tensor, t: Tensor, **_: Any) -> Tensor:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            log_p = torch.log_softmax(classifier(z, t), dim=-1)
            labels = torch.as_tensor(y, dtype=torch.long, device=log_p.device)
            labels = labels.expand(log_p.shape[0]) if labels.ndim == 0 else labels
            picked = log_p.gather(1, labels[:, None]).sum()  # rows are independent
            (grad,) = torch.autograd.grad(picked, z)
        return grad

    return grad_log_prob


# --------------------------------------------------------------------- classifier-free guidance
def classifier_free_guidance(
    model: EpsModel, guidance_scale: float, null_kwargs: Mapping[str, Any]
) -> EpsModel:
    """Classifier-free guidance (Ho & Salimans, 2022; 18.6.3) as a model for any sampler.

    The returned ``guided(z_t, t, **cond_kwargs)`` evaluates the conditional and unconditional
    branches in **one** call of ``model`` on a batch of ``2B``: ``z_t`` and ``t`` twice, and the
    model kwargs concatenated along dim 0 as [conditional; null]:

    - a key in ``null_kwargs`` (the null condition, e.g. ``{"y": NULL_LABEL}`` or an empty-prompt
      embedding): the caller's value and the null value are concatenated; a null tensor with batch
      size 1 is expanded to ``B``, and Python numbers on either side become ``[B]`` tensors;
    - any other tensor kwarg with batch size ``B`` (e.g. the low-resolution image of a cascade
      stage) is repeated in both halves; non-tensor kwargs are passed through unchanged.

    Then eps = eps_u + s (eps_c - eps_u), computed with ``torch.lerp`` so that ``s = 0`` returns
    the unconditional and ``s = 1`` the conditional output exactly. For a model that learns its
    variance the noise half is guided and ``v`` is taken from the conditional branch (GLIDE).
    """
    if not null_kwargs:
        raise ValueError("null_kwargs must name the null condition, e.g. {'y': -1}")
    scale = float(guidance_scale)

    def guided(z_t: Tensor, t: Tensor, **cond_kwargs: Any) -> Tensor:
        batch = z_t.shape[0]
        kwargs = _concat_kwargs(cond_kwargs, null_kwargs, batch, z_t.device)
        out = model(torch.cat([z_t, z_t]), torch.cat([t, t]), **kwargs)
        out_c, out_u = out[:batch], out[batch:]
        if out_c.shape != z_t.shape:  # [eps, v]: guide the noise, keep the conditional v
            eps_c, v_c = split_output(out_c, z_t)
            eps_u, _ = split_output(out_u, z_t)
            guided_eps = torch.lerp(eps_u, eps_c, scale)
            return torch.cat([guided_eps, v_c], dim=1)  # type: ignore[list-item]
        return torch.lerp(out_u, out_c, scale)

    return guided


def _concat_kwargs(
    cond: Mapping[str, Any], null: Mapping[str, Any], batch: int, device: torch.device
) -> dict[str, Any]:
    """Model kwargs for the [conditional; null] batch of classifier-free guidance."""
    missing = sorted(set(null) - set(cond))
    if missing:
        raise ValueError(
            f"classifier-free guidance has a null value for {missing} but the sampler got no "
            f"conditional value for it; pass e.g. {missing[0]}=... to the sampler"
        )
    out: dict[str, Any] = {}
    for key, value in cond.items():
        if key in null:
            c = _batched(key, value, batch, device)
            u = _batched(key, null[key], batch, device)
            if c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"null value of {key!r} has shape {tuple(u.shape)}, conditional "
                    f"{tuple(c.shape)}: they must agree after dim 0"
                )
            out[key] = torch.cat([c, u.to(c.dtype)])
        elif isinstance(value, Tensor):
            if value.ndim == 0 or value.shape[0] != batch:
                raise ValueError(
                    f"model kwarg {key!r} is a tensor of shape {tuple(value.shape)}, not a batch "
                    f"of {batch}; bind non-batched tensors to the model (functools.partial)"
                )
            out[key] = torch.cat([value, value])
        else:
            out[key] = value
    return out


def _batched(key: str, value: Any, batch: int, device: torch.device) -> Tensor:
    """A conditioning value as a ``[batch, ...]`` tensor (numbers filled, batch-1 expanded)."""
    if isinstance(value, bool | int | float):
        return torch.full((batch,), value, device=device)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"classifier-free guidance concatenates {key!r}, so it must be a tensor or a number, "
            f"got {type(value).__name__}"
        )
    if value.ndim == 0:
        return value.expand(batch).to(device)
    if value.shape[0] == 1 and batch != 1:
        return value.expand(batch, *value.shape[1:]).to(device)
    if value.shape[0] != batch:
        raise ValueError(f"{key!r} has batch size {value.shape[0]}, expected {batch} or 1")
    return value.to(device)
