"""Training losses of a diffusion model (chapter 18, sections 18.4.4-18.5; Algorithm 18.1).

One entry point, :func:`training_losses`, draws z_t ~ q(z_t|x) (eq. 18.7), calls the network once
and returns per-example losses of shape [B]. Which loss is used (:class:`LossType`):

- ``eps_simple``   ||output - target||^2, eq. 18.39 and Algorithm 18.1. The target is what the
  network predicts (:class:`Parameterization`): eps, x or v; with ``eps`` this is exactly eq. 18.39.
- ``elbo_weighted`` the eps error weighted as in the bound, eq. 18.38:
  beta_t^2 / ((1-alpha_bar_t)(1-beta_t) 2 sigma_t^2) ||g_t - eps||^2 (any parameterisation; the
  noise estimate is derived from the output).
- ``mean_matching`` eq. 18.29 (with eq. 18.28's weight): ||mu_q(z_t, x) - f_t[z_t]||^2 / (2 sigma_t^2),
  mu_q the posterior mean of eq. 18.15 and f_t the model mean of eq. 18.35. Algebraically equal to
  ``elbo_weighted`` (section 18.5.1); equal to the KL term L_t up to a constant.
- ``hybrid``       Nichol & Dhariwal (2021): the network outputs 2C channels, the second half
  v in [-1, 1] interpolating the log-variance between log beta_t and the clipped log posterior
  variance. loss = simple + lambda * L_vlb, where L_vlb = sum_t L_t is estimated at the sampled t
  as T * L_t in bits/dim (as in their code) with the mean's gradient stopped, so the VLB trains
  only the variance. ``vlb_weight`` is lambda (0.001 in the paper).

Fixed variances sigma_t^2 (``sigma``): ``"posterior"`` (default) = beta_t (1-alpha_bar_{t-1})/
(1-alpha_bar_t), clipped at the first step to the value of the second, or ``"beta"`` = beta_t.

Units. Squared errors are averaged over the data dimensions (the chapter sums them; multiply by D
for its scale), so losses do not grow with image size. ``elbo_weighted`` and ``mean_matching``
are in nats per dimension; the hybrid's ``vlb`` in bits per dimension.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import torch

from diffusion_core.likelihood import Decoder, check_decoder_data, mean_flat, vlb_term_bpd
from diffusion_core.reverse import (
    Model,
    Parameterization,
    VarianceType,
    eps_model,
    model_output_to_eps,
    model_output_to_x0,
    p_mean_variance,
    parse_enum,
    split_model_output,
)
from diffusion_core.schedule import NoiseSchedule, extract

Tensor = torch.Tensor

__all__ = [
    "LossType",
    "Parameterization",
    "elbo_eps_weight",
    "min_snr_weight",
    "eps_model",
    "model_output_to_eps",
    "model_output_to_x0",
    "sample_timesteps",
    "training_losses",
]


class LossType(StrEnum):
    """Which training loss (see the module docstring)."""

    EPS_SIMPLE = "eps_simple"
    ELBO_WEIGHTED = "elbo_weighted"
    MEAN_MATCHING = "mean_matching"
    HYBRID = "hybrid"


def sample_timesteps(
    batch: int, T: int, generator: torch.Generator | None = None, device: Any = None
) -> Tensor:
    """Uniform timesteps t ~ U{0, ..., T-1}, a LongTensor of shape [batch] (Algorithm 18.1)."""
    if batch < 1 or T < 1:
        raise ValueError(f"batch and T must be >= 1, got batch={batch}, T={T}")
    t = torch.randint(0, T, (batch,), generator=generator)
    return t.to(device) if device is not None else t


def elbo_eps_weight(schedule: NoiseSchedule, sigma: str = "posterior") -> Tensor:
    """Weight of ||g_t - eps||^2 in the bound, eq. 18.38: beta^2 / ((1-alpha_bar)(1-beta) 2 sigma^2).

    A float64 tensor of length T; index 0 is the decoder term of eq. 18.37.
    """
    sigma2 = torch.exp(schedule.reverse_log_variance(sigma))  # type: ignore[arg-type]
    return schedule.betas**2 / ((1.0 - schedule.alpha_bar) * schedule.alphas * 2.0 * sigma2)


def min_snr_weight(schedule: NoiseSchedule, gamma: float, parameterization: Parameterization | str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) per timestep, a float64 tensor of length T.

    With SNR_t = alpha_bar_t / (1 - alpha_bar_t) (eq. 18.8), the x-error is weighted by
    min(SNR_t, gamma): each parameterisation's squared error is an x-error times a known factor
    (eps: SNR_t, v: SNR_t + 1, x0: 1), so its weight is min(SNR_t, gamma) divided by that factor.
    Low-noise steps, where the x-error is tiny and easy, no longer dominate the gradient.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    p = parse_enum(Parameterization, parameterization, "parameterization")
    snr = schedule.snr
    clipped = snr.clamp(max=gamma)
    if p is Parameterization.EPS:
        return clipped / snr
    if p is Parameterization.V:
        return clipped / (snr + 1.0)
    return clipped


def _target(p: Parameterization, x: Tensor, t: Tensor, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    if p is Parameterization.EPS:
        return noise
    if p is Parameterization.X0:
        return x
    return schedule.v_target(x, t, noise)


def training_losses(
    model: Model,
    x: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    *,
    loss_type: LossType | str = "eps_simple",
    parameterization: Parameterization | str = "eps",
    noise: Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    vlb_weight: float = 0.001,
    sigma: str = "posterior",
    decoder: Decoder = "discretized",
    snr_gamma: float | None = None,
) -> dict[str, Tensor]:
    """Per-example training losses at timesteps t (a LongTensor [B]) for data x [B, ...].

    Returns ``loss`` (what to minimise, averaged over the batch by the caller) and ``mse`` (the
    unweighted squared error behind it), both [B]; ``hybrid`` adds ``vlb`` (the term L_t in
    bits/dim with a stopped-gradient mean). ``sigma`` is the fixed variance of ``elbo_weighted``
    and ``mean_matching``; ``decoder`` the likelihood of the hybrid's t=0 term (``"discretized"``
    for 8-bit images in [-1, 1], ``"gaussian"`` for continuous data). ``snr_gamma`` weights
    ``eps_simple``'s loss by :func:`min_snr_weight` (``mse`` stays unweighted); None: unweighted.
    """
    kind = parse_enum(LossType, loss_type, "loss_type")
    p = parse_enum(Parameterization, parameterization, "parameterization")
    t = torch.as_tensor(t, device=x.device).long()
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn_like(x)
    z_t = schedule.q_sample(x, t, noise)
    output = model(z_t, t, **(model_kwargs or {}))
    prediction, v = split_model_output(output, x, learned_variance=kind is LossType.HYBRID)

    if snr_gamma is not None and kind is not LossType.EPS_SIMPLE:
        raise ValueError(f"snr_gamma weights the eps_simple loss only, not {kind.value!r}")
    if kind is LossType.EPS_SIMPLE:
        mse = mean_flat((prediction - _target(p, x, t, noise, schedule)) ** 2)
        if snr_gamma is None:
            return {"loss": mse, "mse": mse}
        weight = extract(min_snr_weight(schedule, snr_gamma, p), t, mse)
        return {"loss": weight * mse, "mse": mse}

    if kind is LossType.ELBO_WEIGHTED:
        eps = model_output_to_eps(prediction, z_t, t, schedule, p)
        mse = mean_flat((eps - noise) ** 2)
        weight = extract(elbo_eps_weight(schedule, sigma), t, mse)
        return {"loss": weight * mse, "mse": mse}

    if kind is LossType.MEAN_MATCHING:
        target_mean, _ = schedule.posterior(z_t, x, t)
        mean = schedule.reverse_mean_from_eps(z_t, t, model_output_to_eps(prediction, z_t, t, schedule, p))
        mse = mean_flat((target_mean - mean) ** 2)
        sigma2 = extract(torch.exp(schedule.reverse_log_variance(sigma)), t, mse)  # type: ignore[arg-type]
        return {"loss": mse / (2.0 * sigma2), "mse": mse}

    # Hybrid: simple loss on the prediction + lambda * T * L_t on the variance alone.
    assert v is not None
    check_decoder_data(x, decoder)
    mse = mean_flat((prediction - _target(p, x, t, noise, schedule)) ** 2)
    frozen = torch.cat([prediction.detach(), v], dim=1)
    step = p_mean_variance(frozen, z_t, t, schedule, parameterization=p, variance=VarianceType.LEARNED)
    vlb = vlb_term_bpd(x, z_t, t, schedule, step.mean, step.log_variance, decoder=decoder)
    return {"loss": mse + vlb_weight * schedule.T * vlb, "mse": mse, "vlb": vlb}
