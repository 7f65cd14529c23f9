"""Step selection: which timesteps a sampler visits, and the shorter process they define (18.6.2).

A sampler with ``S`` steps visits the increasing sub-sequence ``ts`` of :func:`timesteps_for` from
``ts[S-1]`` down to ``ts[0]``, calls the model once per visit, and jumps from ``ts[i]`` to
``ts[i-1]`` (from ``ts[0]`` to the data). The jump uses the respaced schedule
(:meth:`NoiseSchedule.respace`), whose index ``i`` has ``alpha_bar[ts[i]]``: the same model then
defines a shorter diffusion process, which is what "accelerated" sampling is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffusion_core.sampling.checks import check_choice, check_steps
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor

SPACINGS = ("uniform", "logsnr", "logsnr_window", "karras", "trailing", "leading")

LOGSNR_WINDOW = (-2.0, 3.0)
"""The lambda range of ``spacing="logsnr_window"``: below lambda = -2 (alpha/sigma = 0.14) data of
unit scale are lost in the noise and x_hat hardly moves; above lambda = 3 (sigma/alpha = 0.05) the
last call buys little. Measured on ``benchmarks/sampler_accuracy.py`` (docs/maths.md)."""
KARRAS_RHO = 7.0
KARRAS_SIGMA_MAX = 80.0
"""rho and sigma_max of ``spacing="karras"`` (Karras et al., 2022, eq. 5 and Table 1)."""


def timesteps_for(steps: int, schedule: NoiseSchedule | int, spacing: str = "uniform") -> Tensor:
    """The increasing sub-sequence of ``steps`` timesteps out of ``0..T-1`` that a sampler visits.

    ``schedule`` is the :class:`NoiseSchedule` (or just ``T`` for the spacings that need no more).

    - ``"uniform"``: evenly spaced in t and including both ends, ``round(linspace(0, T-1, steps))``
      (Nichol & Dhariwal's respacing); one step is ``[T-1]``.
    - ``"logsnr"``: evenly spaced in lambda = log(sqrt(alpha_bar)/sqrt(1-alpha_bar)) between
      both ends (nearest integer steps, kept distinct), which DPM-Solver (Lu et al., 2022)
      recommends; its steps crowd where the data prediction changes fastest, at low noise.
    - ``"logsnr_window"``: the first visit at ``T-1`` (where z_T ~ Norm[0, I] starts), the other
      ``steps-1`` evenly spaced in lambda over the window :data:`LOGSNR_WINDOW` (clipped to the
      schedule's range). The ODE in lambda does not depend on the schedule, so the same window
      serves the linear and the cosine schedule; it spends no call in pure noise (where the cosine
      schedule's lambda runs down to -10) nor at lambda > 3, where the last call of ``"logsnr"``
      changes the sample by 1% of its scale.
    - ``"karras"``: Karras et al. (2022, eq. 5) in the noise level sigma/alpha of the VE form,
      sigma_i = (s_max^(1/rho) + i/(S-1) (s_min^(1/rho) - s_max^(1/rho)))^rho from s_min at step
      0 to s_max = min(80, sigma/alpha at T-1) (their Table 1), rho = :data:`KARRAS_RHO`; the
      noisiest visit is moved to ``T-1``, where z_T starts.
    - ``"trailing"``: evenly spaced back from ``T-1`` with stride ``T/steps``, so the last visit
      is ``T/steps - 1`` rather than 0 (Lin et al., 2024).
    - ``"leading"``: ``0, c, 2c, ...`` with ``c = T // steps``, as in the DDIM paper (Song et al.,
      2021); it does not start at ``T-1``.

    ``steps == T`` gives ``arange(T)`` for every spacing.
    """
    T = schedule if isinstance(schedule, int) else schedule.T
    check_steps(steps, T)
    steps = int(steps)
    check_choice("spacing", spacing, SPACINGS)
    if steps == T:
        return torch.arange(T)
    if steps == 1 and spacing in ("uniform", "logsnr", "logsnr_window", "karras"):
        return torch.tensor([T - 1])
    if spacing in ("logsnr", "logsnr_window", "karras") and isinstance(schedule, int):
        raise ValueError(f"spacing={spacing!r} needs the NoiseSchedule, not just T")
    if spacing == "uniform":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
    elif spacing == "logsnr":
        lam = schedule.half_log_snr
        ts = _nearest(lam, torch.linspace(float(lam[0]), float(lam[-1]), steps))
    elif spacing == "logsnr_window":
        lam = schedule.half_log_snr
        lo, hi = max(LOGSNR_WINDOW[0], float(lam[-1])), min(LOGSNR_WINDOW[1], float(lam[0]))
        window = _nearest(lam, torch.linspace(hi, lo, steps - 1))
        ts = torch.cat([window, torch.tensor([T - 1.0], dtype=torch.float64)])
    elif spacing == "karras":
        log_sigma = -schedule.half_log_snr  # log(sigma/alpha), increasing in t
        lo = math.exp(float(log_sigma[0]) / KARRAS_RHO)  # sigma_min^(1/rho)
        hi = min(KARRAS_SIGMA_MAX, math.exp(float(log_sigma[-1]))) ** (1 / KARRAS_RHO)
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        sigma = (lo + ramp * (hi - lo)) ** KARRAS_RHO
        ts = _nearest(log_sigma, sigma.log())
        ts[-1] = T - 1  # z_T ~ Norm[0, I] starts at the noisiest step
    elif spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().flip(0) - 1
    else:
        ts = torch.arange(steps, dtype=torch.float64) * (T // steps)
    return _strictly_increasing(ts.long(), T)


def _nearest(values: Tensor, targets: Tensor) -> Tensor:
    """For each target, the index of the nearest entry of ``values`` (as float64)."""
    targets = targets.to(torch.float64)
    return (values[None, :] - targets[:, None]).abs().argmin(dim=1).double()


def _strictly_increasing(ts: Tensor, T: int) -> Tensor:
    """Push rounded steps apart (up from the bottom, then down from the top) so none repeat."""
    ts = ts.clone()
    for i in range(1, len(ts)):
        ts[i] = max(int(ts[i]), int(ts[i - 1]) + 1)
    ts[-1] = min(int(ts[-1]), T - 1)
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(int(ts[i]), int(ts[i + 1]) - 1)
    return ts


def respaced(
    schedule: NoiseSchedule,
    steps: int | None,
    timesteps: Sequence[int] | Tensor | None,
    spacing: str,
) -> tuple[Tensor, NoiseSchedule]:
    """The visited timesteps and the schedule of the process over them (18.6.2).

    ``steps`` (``None``: all ``T``) chooses them by :func:`timesteps_for`; explicit ``timesteps``
    (increasing, within ``[0, T-1]``) replace that choice.
    """
    if timesteps is not None:
        if steps is not None:
            raise ValueError("pass either steps or timesteps, not both")
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten().cpu()
    else:
        ts = timesteps_for(schedule.T if steps is None else steps, schedule, spacing)
    if ts.numel() == schedule.T and bool((ts == torch.arange(schedule.T)).all()):
        return ts, schedule
    return ts, schedule.respace(ts)  # validates: increasing, within [0, T-1]
