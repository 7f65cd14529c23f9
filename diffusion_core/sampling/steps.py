"""The update rules: one jump of each sampler from the visited step to the next (18.3, 18.6.2).

Every rule is a pure function of the respaced schedule (:func:`~.timesteps.respaced`), the index
``i`` of the visited step and what the model predicted there, and returns the
:class:`Transition` Norm[mean, variance I] of the state at index ``i-1`` (the data for ``i = 0``).
The loop that calls the model and draws the noise is :func:`~.driver.drive`; the data prediction
every rule may use is :func:`predict_x`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffusion_core.reverse import learned_log_variance
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor

VARIANCES = ("posterior", "beta", "learned")


class Transition(NamedTuple):
    """z_{t-1} ~ Norm[mean, variance I]; ``variance`` is ``0.0`` for a deterministic step."""

    mean: Tensor
    variance: Tensor | float


def predict_x(
    schedule: NoiseSchedule, z_t: Tensor, i: int, eps: Tensor, clip_x: float | None
) -> tuple[Tensor, Tensor]:
    """x_hat from eps (eq. 18.7 inverted); with clipping, eps recomputed to match the clipped x."""
    x_hat = schedule.predict_x_from_eps(z_t, i, eps)
    if clip_x is None:
        return x_hat, eps
    x_hat = x_hat.clamp(-clip_x, clip_x)
    return x_hat, schedule.predict_eps_from_x(z_t, i, x_hat)


def ddpm_variance(schedule: NoiseSchedule, i: int, variance: str, v: Tensor | None) -> Tensor:
    """sigma_t^2 of eq. 18.16 at index ``i`` (a 0-d tensor, or per element if learned).

    ``"posterior"`` = beta_t (1-alpha_bar_{t-1})/(1-alpha_bar_t) (eq. 18.15), ``"beta"`` = beta_t,
    or ``"learned"``: the model returned ``[eps, v]`` and log sigma_t^2 = (v+1)/2 log beta_t +
    (1-v)/2 log(clipped posterior variance) (Nichol & Dhariwal, 2021, eq. 15).
    """
    if variance == "posterior":
        return schedule.posterior_variance[i]
    if variance == "beta":
        return schedule.betas[i]
    if v is None:
        raise ValueError(
            "variance='learned' needs a model that returns [eps, v] (twice z_t's channels)"
        )
    return learned_log_variance(v, i, schedule).exp()


def ddpm_step(
    schedule: NoiseSchedule,
    i: int,
    z_t: Tensor,
    eps: Tensor,
    variance: str = "posterior",
    v: Tensor | None = None,
) -> Transition:
    """Ancestral step of Algorithm 18.2: z_{t-1} ~ Norm[f_t[z_t], sigma_t^2 I] (eq. 18.16).

    The mean f_t = z_t/sqrt(1-beta_t) - beta_t/(sqrt(1-alpha_bar_t) sqrt(1-beta_t)) g_t is that of
    eq. 18.35 from the noise estimate g_t = ``eps``; sigma_t^2 is :func:`ddpm_variance`.
    """
    mean = schedule.reverse_mean_from_eps(z_t, i, eps)  # eq. 18.35
    return Transition(mean, ddpm_variance(schedule, i, variance, v))


def ddim_step(
    schedule: NoiseSchedule, i: int, x_hat: Tensor, eps: Tensor, eta: float = 0.0
) -> Transition:
    """DDIM (Song et al., 2021, eq. 12), the generalised step of 18.6.2, from t to s = ``i-1``:

        z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - sigma^2) eps + sigma * noise,
        sigma^2 = eta^2 (1-alpha_bar_s)/(1-alpha_bar_t) (1 - alpha_bar_t/alpha_bar_s),

    with x_hat = (z_t - sqrt(1-alpha_bar_t) eps)/sqrt(alpha_bar_t). ``eta = 0`` is deterministic
    (the chapter's DDIM, fig. 18.10c); ``eta = 1`` makes sigma^2 the posterior variance (eq. 18.15)
    of the respaced process, i.e. :func:`ddpm_step` with ``variance="posterior"``.
    """
    alpha_bar_prev = float(schedule.alpha_bar_prev[i])
    var = eta**2 * float(schedule.posterior_variance[i])
    mean = alpha_bar_prev**0.5 * x_hat + max(1.0 - alpha_bar_prev - var, 0.0) ** 0.5 * eps
    return Transition(mean, var)


def dpmsolver_pp_step(
    schedule: NoiseSchedule,
    i: int,
    z_t: Tensor,
    x_hat: Tensor,
    x_prev: Tensor | None,
    order: int = 2,
) -> Transition:
    """DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2): a multistep solver of the diffusion ODE.

    With alpha = sqrt(alpha_bar), sigma = sqrt(1-alpha_bar), lambda = log(alpha/sigma)
    (:attr:`NoiseSchedule.half_log_snr`) and h = lambda_s - lambda_t for the step from t to s:

        z_s = (sigma_s/sigma_t) z_t - alpha_s (e^{-h} - 1) D,
        D = x_hat_t                                        (first step, or ``order=1``: DDIM),
        D = (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_prev,  r = h_prev / h    (later steps),

    where ``x_prev`` is the data prediction of the previous visit (index ``i+1``, ``None`` at the
    first) and h_prev the length of that step. The last step, from index 0 to the data
    (sigma = 0, lambda = inf), is first order: it returns x_hat. Deterministic.
    """
    if i == 0:
        return Transition(x_hat, 0.0)
    lam = schedule.half_log_snr
    alpha, sigma = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    h = float(lam[i - 1] - lam[i])
    d = x_hat
    if order == 2 and x_prev is not None:
        r = float(lam[i] - lam[i + 1]) / h
        d = (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
    mean = float(sigma[i - 1] / sigma[i]) * z_t - float(alpha[i - 1]) * math.expm1(-h) * d
    return Transition(mean, 0.0)
