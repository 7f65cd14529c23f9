"""The samplers: :func:`run_sampler` from given noise with the method dispatch, and its faces.

``method`` names the update rule of :mod:`~.steps` that :func:`~.driver.drive` runs:
``"ddpm"`` (ancestral, Algorithm 18.2), ``"ddim"`` (18.6.2) or ``"dpmsolver++"`` (Lu et al.,
2022). :func:`sample` draws z_T ~ Norm[0, I] first; :func:`sample_ddpm`, :func:`sample_ddim` and
:func:`sample_dpmsolver_pp` are :func:`run_sampler` with the method fixed (k-diffusion style,
``sample_*(model, z, schedule, steps)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffusion_core.sampling.checks import (
    check_choice,
    check_eta,
    check_guidance,
    check_only_for,
    check_order,
    check_steps,
)
from diffusion_core.sampling.driver import StepRule, drive
from diffusion_core.sampling.guidance import ClassifierGuidance
from diffusion_core.sampling.model import Callback, EpsModel, GradLogProb
from diffusion_core.sampling.noise import randn
from diffusion_core.sampling.steps import VARIANCES, ddim_step, ddpm_step, dpmsolver_pp_step
from diffusion_core.sampling.timesteps import respaced
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor
Output = Tensor | tuple[Tensor, Tensor]

METHODS = ("ddpm", "ddim", "dpmsolver++")
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmsolver++": "logsnr"}
"""Step spacing per method when a sampler gets ``spacing=None`` (see :func:`timesteps_for`)."""


def run_sampler(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    *,
    method: str,
    steps: int | None = None,
    timesteps: Sequence[int] | Tensor | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    variance: str = "posterior",
    order: int = 2,
    clip_x: float | None = None,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    **model_kwargs: Any,
) -> Output:
    """Sample with ``method`` from the noise ``z`` = z_T; other keyword arguments go to the model.

    Args:
        method: ``"ddpm"``, ``"ddim"`` or ``"dpmsolver++"`` (:data:`METHODS`).
        steps: model calls in ``[1, T]`` (``None``: all ``T``), at the timesteps
            :func:`timesteps_for` chooses with ``spacing`` (``None``: :data:`DEFAULT_SPACING` of
            the method); or explicit increasing ``timesteps`` instead.
        eta: ``"ddim"`` only: 0 deterministic, 1 the posterior variance (= ``"ddpm"``).
        variance: ``"ddpm"`` only: sigma_t^2 of eq. 18.16, ``"posterior"`` (eq. 18.15),
            ``"beta"``, or ``"learned"`` for a model that returns ``[eps, v]``
            (:func:`~diffusion_core.sampling.steps.ddpm_variance`). The ODE samplers accept such
            a model too, and drop ``v``.
        order: ``"dpmsolver++"`` only: 2 (DPM-Solver++(2M)) or 1 (= DDIM).
        clip_x: clamp the predicted data to [-clip_x, clip_x] at every step.
        grad_log_prob, classifier_scale: classifier guidance (18.6.3): on the mean for
            ``"ddpm"`` (eq. 18.40), in noise form for the others.
        generator: source of every step's noise (any device: drawn there, moved to ``z``'s).
        callback: called after every step (:data:`Callback`).
        return_trajectory: also return the states ``[S+1, *z.shape]``, z_T first and x last.
        progress: show a progress bar.
    """
    check_choice("sampling method", method, METHODS)
    if steps is not None:
        check_steps(steps, schedule.T)
    check_eta(eta)
    check_only_for("eta", eta, 0.0, method, "ddim")
    check_choice("variance", variance, VARIANCES)
    check_only_for("variance", variance, "posterior", method, "ddpm")
    check_order(order)
    check_only_for("order", order, 2, method, "dpmsolver++")
    check_guidance(grad_log_prob, classifier_scale)
    spacing = DEFAULT_SPACING[method] if spacing is None else spacing
    ts, sub = respaced(schedule, steps, timesteps, spacing)
    guidance = None
    if grad_log_prob is not None:
        guidance = ClassifierGuidance(grad_log_prob, classifier_scale, on_mean=method == "ddpm")
    return drive(
        model,
        z,
        ts,
        sub,
        _step_rule(method, eta=eta, variance=variance, order=order),
        name=method,
        guidance=guidance,
        clip_x=clip_x,
        generator=generator,
        callback=callback,
        return_trajectory=return_trajectory,
        progress=progress,
        model_kwargs=model_kwargs,
    )


def _step_rule(method: str, *, eta: float, variance: str, order: int) -> StepRule:
    """The update rule of ``method`` with its option bound."""
    if method == "ddpm":
        return lambda s: ddpm_step(s.schedule, s.i, s.z, s.eps, variance, s.v)
    if method == "ddim":
        return lambda s: ddim_step(s.schedule, s.i, s.x_hat, s.eps, eta)
    return lambda s: dpmsolver_pp_step(s.schedule, s.i, s.z, s.x_hat, s.x_prev, order)


def sample(
    model: EpsModel,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    method: str,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Output:
    """Draw ``shape[0]`` samples: z_T ~ Norm[0, I] (eq. 18.16), then :func:`run_sampler`.

    ``method``: ``"ddpm"``, ``"ddim"`` (uses ``eta``) or ``"dpmsolver++"``. ``steps`` in
    ``[1, T]`` model calls. ``generator`` makes the result deterministic (it draws z_T and every
    step's noise); ``device`` defaults to the generator's, and a generator on another device than
    ``device`` (a CPU generator for a CUDA model) draws there and the noise is moved. Other
    keyword arguments: the options of :func:`run_sampler` (``spacing``, ``variance``, ``clip_x``,
    ``grad_log_prob``, ``classifier_scale``, ``callback``, ``return_trajectory``, ``progress``),
    then the model's.
    """
    check_steps(steps, schedule.T)
    if device is None and generator is not None:
        device = generator.device
    z = randn(shape, generator, device=device, dtype=dtype)
    return run_sampler(
        model, z, schedule, method=method, steps=steps, eta=eta, generator=generator, **options
    )


def sample_ddpm(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    variance: str = "posterior",
    generator: torch.Generator | None = None,
    **options: Any,
) -> Output:
    """Ancestral sampling, Algorithm 18.2, from the noise ``z`` = z_T.

    Each step draws z_{t-1} ~ Norm[f_t[z_t], sigma_t^2 I] (eq. 18.16) with the mean f_t of
    eq. 18.35 computed from the model's noise estimate; the last step returns the mean f_1 without
    noise. With ``steps < T`` (or explicit ``timesteps``) the steps are those of the respaced
    schedule ("accelerated" sampling, 18.6.2). ``variance``: sigma_t^2, ``"posterior"``
    (eq. 18.15), ``"beta"`` or ``"learned"``. Classifier guidance shifts the mean by
    sigma_t^2 * scale * grad log p(c|z_t) (eq. 18.40). Other options as :func:`run_sampler`.
    """
    return run_sampler(
        model,
        z,
        schedule,
        method="ddpm",
        steps=steps,
        variance=variance,
        generator=generator,
        **options,
    )


def sample_ddim(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Output:
    """DDIM (Song et al., 2021, eq. 12) over any sub-sequence of steps (18.6.2).

    Each step is :func:`~diffusion_core.sampling.steps.ddim_step`: ``eta = 0`` is deterministic
    (the chapter's DDIM, fig. 18.10c); ``eta = 1`` makes its variance the posterior variance of the
    respaced process, i.e. ancestral sampling with ``variance="posterior"`` (and the same noise
    draws). Classifier guidance uses the noise form eps - sqrt(1-alpha_bar_t) * scale * grad.
    Other options as :func:`run_sampler`.
    """
    return run_sampler(
        model, z, schedule, method="ddim", steps=steps, eta=eta, generator=generator, **options
    )


def sample_dpmsolver_pp(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    order: int = 2,
    **options: Any,
) -> Output:
    """DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data prediction.

    Lu et al., 2022, Algorithm 2 (:func:`~diffusion_core.sampling.steps.dpmsolver_pp_step`);
    deterministic, one model call per step (10-20 suffice); ``order=1`` is DDIM. Classifier
    guidance uses the noise form as :func:`sample_ddim`. Other options as :func:`run_sampler`.

    Steps default to ``spacing="logsnr"`` (equal lambda steps, Lu et al.'s choice for low
    resolution). Time-uniform steps on the linear schedule make the last lambda steps several
    times longer than the previous ones, and the multistep extrapolation then overshoots: on the
    toy mixture of ``benchmarks/sampler_accuracy.py`` 10 uniform steps are worse than DDIM.
    """
    return run_sampler(
        model, z, schedule, method="dpmsolver++", steps=steps, order=order, **options
    )
