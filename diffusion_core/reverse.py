"""The decoder model (reverse process) p(z_{t-1}|z_t) as a network parameterises it.

Chapter 18, section 18.3 (eq. 18.16) and section 18.5.2 (eq. 18.35). A network ``model(z_t, t)``
predicts one of three equivalent targets (:class:`Parameterization`); every other quantity follows
from the schedule's algebra:

- ``eps``: the noise g_t[z_t] mixed into z_t (eq. 18.35, Algorithm 18.1);
- ``x0``:  the clean data x;
- ``v``:   the velocity sqrt(alpha_bar) eps - sqrt(1-alpha_bar) x (Salimans & Ho, 2022).

The mean of p(z_{t-1}|z_t) is f_t of eq. 18.35 computed from the implied noise. Its variance is
fixed (``"posterior"`` or ``"beta"``, :meth:`NoiseSchedule.reverse_log_variance`) or ``"learned"``
(Nichol & Dhariwal, 2021): the network then outputs 2C channels, and the second half
v in [-1, 1] interpolates the log-variance between log beta_t (v=1) and the clipped log posterior
variance (v=-1).

This module is shared by :mod:`diffusion_core.objectives` (losses), :mod:`diffusion_core.likelihood`
(the ELBO) and samplers; it holds no state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from diffusion_core.schedule import NoiseSchedule, extract

Tensor = torch.Tensor
Model = Callable[..., Tensor]


class Parameterization(StrEnum):
    """What the network outputs."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


class VarianceType(StrEnum):
    """How the variance sigma_t^2 of p(z_{t-1}|z_t) is chosen (eq. 18.16)."""

    POSTERIOR = "posterior"  # fixed: beta_t (1-alpha_bar_{t-1})/(1-alpha_bar_t), clipped at t=1
    BETA = "beta"  # fixed: beta_t
    LEARNED = "learned"  # interpolated by the network's extra C channels


def parse_enum(enum: type[StrEnum], value: Any, name: str) -> Any:
    """``enum(value)`` with an error that lists the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None


def split_model_output(output: Tensor, like: Tensor, learned_variance: bool) -> tuple[Tensor, Tensor | None]:
    """Split a network output into (prediction, variance interpolant v or None).

    With a learned variance the output has 2C channels on dim 1 for data with C channels.
    """
    if not learned_variance:
        if output.shape != like.shape:
            raise ValueError(
                f"model output has shape {tuple(output.shape)} but the data has {tuple(like.shape)}; "
                "a fixed-variance model outputs one value per data value"
            )
        return output, None
    expected = (like.shape[0], 2 * like.shape[1], *like.shape[2:])
    if tuple(output.shape) != expected:
        raise ValueError(
            f"model output has shape {tuple(output.shape)}; expected the data's shape "
            f"{tuple(like.shape)} or, for a learned-variance model, 2C channels {expected}"
        )
    prediction, v = output.chunk(2, dim=1)
    return prediction, v


def model_output_to_eps(
    output: Tensor,
    z_t: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    parameterization: Parameterization | str,
) -> Tensor:
    """The noise estimate g_t[z_t] implied by a network output (inverting eq. 18.7 if needed)."""
    p = parse_enum(Parameterization, parameterization, "parameterization")
    if p is Parameterization.EPS:
        return output
    if p is Parameterization.X0:
        return schedule.predict_eps_from_x(z_t, t, output)
    return schedule.eps_from_v(z_t, t, output)


def model_output_to_x0(
    output: Tensor,
    z_t: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    parameterization: Parameterization | str,
) -> Tensor:
    """The data estimate x_hat implied by a network output (inverting eq. 18.7 if needed)."""
    p = parse_enum(Parameterization, parameterization, "parameterization")
    if p is Parameterization.EPS:
        return schedule.predict_x_from_eps(z_t, t, output)
    if p is Parameterization.X0:
        return output
    return schedule.x_from_v(z_t, t, output)


def learned_log_variance(v: Tensor, t: Tensor | int, schedule: NoiseSchedule) -> Tensor:
    """log sigma_t^2 = frac log beta_t + (1-frac) log sigma_post_t^2 with frac = (v+1)/2.

    Nichol & Dhariwal (2021), eq. 15; sigma_post^2 is the clipped posterior variance (eq. 18.15).
    """
    frac = (v + 1.0) / 2.0
    max_log = extract(torch.log(schedule.betas), t, v)
    min_log = extract(schedule.posterior_log_variance_clipped, t, v)
    return frac * max_log + (1.0 - frac) * min_log


@dataclass(frozen=True)
class ReverseStep:
    """p(z_{t-1}|z_t) = Norm[mean, exp(log_variance)] and the estimates behind it."""

    mean: Tensor
    log_variance: Tensor
    eps: Tensor
    x0: Tensor


def p_mean_variance(
    output: Tensor,
    z_t: Tensor,
    t: Tensor | int,
    schedule: NoiseSchedule,
    *,
    parameterization: Parameterization | str = "eps",
    variance: VarianceType | str = "posterior",
) -> ReverseStep:
    """Mean f_t (eq. 18.35) and log-variance of p(z_{t-1}|z_t) from a raw network output.

    At index 0 (the chapter's step 1) the mean is the data estimate x_hat, i.e. the mean of the
    decoder Pr(x|z_1) (eqs. 18.16, 18.37).
    """
    var = parse_enum(VarianceType, variance, "variance")
    prediction, v = split_model_output(output, z_t, learned_variance=var is VarianceType.LEARNED)
    eps = model_output_to_eps(prediction, z_t, t, schedule, parameterization)
    x0 = model_output_to_x0(prediction, z_t, t, schedule, parameterization)
    mean = schedule.reverse_mean_from_eps(z_t, t, eps)
    if v is not None:
        log_variance = learned_log_variance(v, t, schedule)
    else:
        log_variance = extract(schedule.reverse_log_variance(var.value), t, z_t).expand_as(mean)
    return ReverseStep(mean=mean, log_variance=log_variance, eps=eps, x0=x0)


def eps_model(
    model: Model,
    schedule: NoiseSchedule,
    parameterization: Parameterization | str = "eps",
    *,
    learned_variance: bool = False,
) -> Model:
    """Wrap a network of any parameterisation as an eps predictor ``model(z_t, t, **kw) -> eps``.

    Samplers take eps callables; an ``x0`` or ``v`` network (or one with learned-variance channels,
    which are dropped) becomes one with this.
    """
    p = parse_enum(Parameterization, parameterization, "parameterization")
    if p is Parameterization.EPS and not learned_variance:
        return model

    def wrapped(z_t: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        prediction, _ = split_model_output(model(z_t, t, **model_kwargs), z_t, learned_variance)
        return model_output_to_eps(prediction, z_t, t, schedule, p)

    return wrapped
