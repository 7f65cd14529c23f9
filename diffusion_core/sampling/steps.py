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
    decoder_noise: bool = False,
) -> Transition:
    """Ancestral step of Algorithm 18.2: z_{t-1} ~ Norm[f_t[z_t], sigma_t^2 I] (eq. 18.16).

    The mean f_t = z_t/sqrt(1-beta_t) - beta_t/(sqrt(1-alpha_bar_t) sqrt(1-beta_t)) g_t is that of
    eq. 18.35 from the noise estimate g_t = ``eps``; sigma_t^2 is :func:`ddpm_variance`.
    ``decoder_noise``: at the last step (``i = 0``), the decoder Pr(x|z_1) = Norm[f_1, sigma_1^2 I]
    of eqs. 18.16/18.26 has sigma_1^2 = beta_1 for ``"posterior"`` too, whose value there is 0:
    the posterior variance and beta_t bound the true reverse variance (Ho et al., 2020, sec. 3.2),
    and at the first step only the upper bound is a distribution.
    """
    mean = schedule.reverse_mean_from_eps(z_t, i, eps)  # eq. 18.35
    if decoder_noise and i == 0 and variance == "posterior":
        return Transition(mean, schedule.betas[0])
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
    x_prev2: Tensor | None = None,
) -> Transition:
    """DPM-Solver++ multistep (Lu et al., 2022b, "DPM-Solver++", Algorithm 2 and its 3M variant).

    The diffusion ODE in data prediction, integrated exactly in its linear part (Lu et al.,
    2022b, eq. 9): with alpha = sqrt(alpha_bar), sigma = sqrt(1-alpha_bar), lambda =
    log(alpha/sigma) (:attr:`NoiseSchedule.half_log_snr`) and h = lambda_s - lambda_t for the
    step from t (index ``i``) to s (index ``i-1``),

        z_s = (sigma_s/sigma_t) z_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda x(lambda) dlambda,

    with x(lambda) the polynomial through the last data predictions, written with
    phi_1 = e^{-h} - 1, phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2:

        z_s = (sigma_s/sigma_t) z_t - alpha_s phi_1 x_hat_t + alpha_s phi_2 D1 - alpha_s phi_3 D2.

    - order 1 (or the first step): D1 = D2 = 0, which is DDIM;
    - order 2 (2M, Algorithm 2): the phi_2 term taken to leading order, -phi_1/2 (x_hat_t -
      x_prev)/r0 with r0 = h_prev/h, i.e. z_s = (sigma_s/sigma_t) z_t - alpha_s phi_1 D with
      D = (1 + 1/(2 r0)) x_hat_t - 1/(2 r0) x_prev;
    - order 3 (3M): x(lambda) the quadratic through the last three predictions, so that
      D1 = h x'(lambda_t) and D2 = h^2 x''(lambda_t) exactly for quadratic x: with r0 = h_prev/h,
      r1 = h_prev2/h, D1_0 = (x_hat_t - x_prev)/r0, D1_1 = (x_prev - x_prev2)/r1,
      D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = 2 (D1_0 - D1_1)/(r0+r1). The phi functions are
      the exact integrals int_0^h e^{tau-h} tau^k/k! dtau (-phi_1, h phi_2, -h^2 phi_3), so the
      step is exact when x is quadratic in lambda (``tests/unit/test_sampling_multistep.py``).
      It needs ``x_prev2`` (else it falls back to order 2).

    ``x_prev``, ``x_prev2`` are the data predictions of the previous two visits (indices ``i+1``,
    ``i+2``; ``None`` before there are any) and h_prev, h_prev2 the lengths of those steps. The
    last step, from index 0 to the data (sigma = 0, lambda = inf), returns x_hat. Deterministic.
    """
    if i == 0:
        return Transition(x_hat, 0.0)
    lam = schedule.half_log_snr
    alpha, sigma = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    h = float(lam[i - 1] - lam[i])
    phi_1 = math.expm1(-h)
    mean = float(sigma[i - 1] / sigma[i]) * z_t
    if order == 1 or x_prev is None:
        return Transition(mean - float(alpha[i - 1]) * phi_1 * x_hat, 0.0)
    r0 = float(lam[i] - lam[i + 1]) / h
    if order == 2 or x_prev2 is None:
        d = (1.0 + 0.5 / r0) * x_hat - (0.5 / r0) * x_prev
        return Transition(mean - float(alpha[i - 1]) * phi_1 * d, 0.0)
    r1 = float(lam[i + 1] - lam[i + 2]) / h
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    d1_0 = (x_hat - x_prev) / r0
    d1_1 = (x_prev - x_prev2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
    a = float(alpha[i - 1])
    return Transition(mean - a * phi_1 * x_hat + a * phi_2 * d1 - a * phi_3 * d2, 0.0)


def unipc_weights(h: float, r: list[float], solve_last: bool) -> tuple[float, list[float]]:
    """B(h) and the weights rho_m of UniPC's polynomial terms (Zhao et al., 2023, sec. 3).

    In data prediction the update of a step of length h in lambda is
    z_s = (sigma_s/sigma_t) z_t - alpha_s phi_1 x_t - alpha_s B(h) sum_m rho_m D_m/r_m with
    phi_1 = e^{-h} - 1, the "bh2" choice B(h) = e^{-h} - 1, r_m = (lambda_{t_m} - lambda_t)/h the
    relative positions of the other data predictions (r = 1: the new one, for the corrector) and
    D_m their differences to x_t. The rho solve R rho = g/B(h), R_km = r_m^{k-1} and
    g_k = k! h^k phi_{k+1}(-h) (order conditions of the Taylor expansion of x in lambda).
    ``solve_last`` (the corrector) solves the full system over ``r``; the predictor solves the
    system without its last row and column (``r`` then lists the history and a trailing 1).
    With one history point the predictor takes rho = 1/2 and with none the corrector rho = 1/2,
    as Zhao et al. do; the predictor of order 2 is then DPM-Solver++(2M).
    """
    hh = -h
    b_h = math.expm1(hh)
    g, factorial = [], 1.0
    phi_k = math.expm1(hh) / hh - 1.0  # h phi_2-like recursion: phi_{k+1} = (phi_k - 1/k!)/hh
    for k in range(1, len(r) + 1):
        g.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1.0 / factorial
    p = len(r) if solve_last else len(r) - 1
    if p <= 1:
        return b_h, [0.5] * p
    R = torch.tensor(
        [[rm ** (k - 1) for rm in r[:p]] for k in range(1, p + 1)], dtype=torch.float64
    )
    rho = torch.linalg.solve(R, torch.tensor(g[:p], dtype=torch.float64))
    return b_h, rho.tolist()


def unipc_update(
    schedule: NoiseSchedule,
    i: int,
    z_t: Tensor,
    x_t: Tensor,
    history: tuple[Tensor, ...],
    x_new: Tensor | None = None,
) -> Tensor:
    """One UniPC-bh2 update from index ``i`` to ``i-1`` (Zhao et al., 2023, UniP-p / UniC-p).

    ``x_t`` is the data prediction at ``i``, ``history`` the earlier ones at ``i+1, i+2, ...``
    (most recent first; their count plus one is the order p). Without ``x_new`` this is the
    predictor UniP-p; with ``x_new``, the data prediction at ``i-1`` of the predicted state, it is
    the corrector UniC-p, of order p+1, which reuses that model call (so the corrector costs no
    extra evaluation). See :func:`unipc_weights` for the formula.
    """
    lam = schedule.half_log_snr
    alpha, sigma = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    h = float(lam[i - 1] - lam[i])
    r = [float(lam[i + m] - lam[i]) / h for m in range(1, len(history) + 1)] + [1.0]
    b_h, rho = unipc_weights(h, r, solve_last=x_new is not None)
    others = history if x_new is None else (*history, x_new)
    diffs = [(x_m - x_t) / r_m for x_m, r_m in zip(others, r, strict=False)]
    a = float(alpha[i - 1])
    z_s = float(sigma[i - 1] / sigma[i]) * z_t - a * math.expm1(-h) * x_t
    for rho_m, d_m in zip(rho, diffs, strict=False):
        z_s = z_s - a * b_h * rho_m * d_m
    return z_s


def unipc_step(
    schedule: NoiseSchedule, i: int, z_t: Tensor, x_hat: Tensor, history: tuple[Tensor, ...]
) -> Transition:
    """The predictor UniP of UniPC from index ``i`` (:func:`unipc_update`); x_hat at index 0."""
    if i == 0:
        return Transition(x_hat, 0.0)
    return Transition(unipc_update(schedule, i, z_t, x_hat, history), 0.0)
