"""The samplers: :func:`run_sampler` from given noise with the method dispatch, and its faces.

``method`` names the update rule of :mod:`~.steps` that :func:`~.driver.drive` runs:
``"ddpm"`` (ancestral, Algorithm 18.2), ``"ddim"`` (18.6.2), ``"dpmsolver++"`` (Lu et al.,
2022) or ``"unipc"`` (Zhao et al., 2023, with its corrector). :func:`sample` draws z_T ~ Norm[0, I]
first; :func:`sample_ddpm`, :func:`sample_ddim`, :func:`sample_dpmsolver_pp` and
:func:`sample_unipc` are :func:`run_sampler` with the method fixed (k-diffusion style,
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
from diffusion_core.sampling.driver import Corrector, StepRule, Visit, drive
from diffusion_core.sampling.guidance import ClassifierGuidance
from diffusion_core.sampling.model import Callback, EpsModel, GradLogProb
from diffusion_core.sampling.noise import randn
from diffusion_core.sampling.steps import (
    VARIANCES,
    ddim_step,
    ddpm_step,
    dpmsolver_pp_step,
    unipc_step,
    unipc_update,
)
from diffusion_core.sampling.timesteps import respaced
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor
Output = Tensor | tuple[Tensor, Tensor]

METHODS = ("ddpm", "ddim", "dpmsolver++", "unipc")
DEFAULT_SPACING = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "dpmsolver++": "logsnr",
    "unipc": "logsnr_window",
}
DEFAULT_ORDER = {"dpmsolver++": 2, "unipc": 2}
"""Order of the multistep methods when a sampler gets ``order=None``."""
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
    order: int | None = None,
    clip_x: float | None = None,
    decoder_noise: bool = False,
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
        method: ``"ddpm"``, ``"ddim"``, ``"dpmsolver++"`` or ``"unipc"`` (:data:`METHODS`).
        steps: model calls in ``[1, T]`` (``None``: all ``T``), at the timesteps
            :func:`timesteps_for` chooses with ``spacing`` (``None``: :data:`DEFAULT_SPACING` of
            the method); or explicit increasing ``timesteps`` instead.
        eta: ``"ddim"`` only: 0 deterministic, 1 the posterior variance (= ``"ddpm"``).
        variance: ``"ddpm"`` only: sigma_t^2 of eq. 18.16, ``"posterior"`` (eq. 18.15),
            ``"beta"``, or ``"learned"`` for a model that returns ``[eps, v]``
            (:func:`~diffusion_core.sampling.steps.ddpm_variance`). The ODE samplers accept such
            a model too, and drop ``v``.
        order: ``"dpmsolver++"`` and ``"unipc"`` only (``None``: :data:`DEFAULT_ORDER`): 1
            (= DDIM), 2 (DPM-Solver++(2M); UniPC's UniP-2 with UniC-2) or 3.
        clip_x: clamp the predicted data to [-clip_x, clip_x] at every step.
        decoder_noise: ``"ddpm"`` only: also draw the last step, x ~ Pr(x|z_1) = Norm[f_1,
            sigma_1^2 I] (the decoder of eqs. 18.16, 18.26; sigma_1^2 = beta_1 for the fixed
            variances), instead of returning its mean f_1 (Algorithm 18.2). With a large beta_1
            (the chapter's toy: 0.03) the mean alone makes every mode of the samples too narrow.
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
    check_only_for("decoder_noise", decoder_noise, False, method, "ddpm")
    order = _check_order(method, order)
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
        _step_rule(method, eta=eta, variance=variance, order=order, decoder_noise=decoder_noise),
        correct=_corrector(method, order),
        noise_last=decoder_noise,
        name=method,
        guidance=guidance,
        clip_x=clip_x,
        generator=generator,
        callback=callback,
        return_trajectory=return_trajectory,
        progress=progress,
        model_kwargs=model_kwargs,
    )


def _check_order(method: str, order: int | None) -> int:
    """The order of a multistep method (its default for ``None``); 0 for the other methods."""
    if method not in DEFAULT_ORDER:
        if order is not None:
            raise ValueError(
                f"order={order!r} only applies to method='dpmsolver++' or 'unipc', "
                f"not method={method!r}"
            )
        return 0
    order = DEFAULT_ORDER[method] if order is None else order
    check_order(order)
    return order


def _step_rule(
    method: str, *, eta: float, variance: str, order: int, decoder_noise: bool
) -> StepRule:
    """The update rule of ``method`` with its option bound."""
    if method == "ddpm":
        return lambda s: ddpm_step(s.schedule, s.i, s.z, s.eps, variance, s.v, decoder_noise)
    if method == "ddim":
        return lambda s: ddim_step(s.schedule, s.i, s.x_hat, s.eps, eta)
    if method == "unipc":
        return lambda s: unipc_step(s.schedule, s.i, s.z, s.x_hat, s.history[: order - 1])
    return lambda s: dpmsolver_pp_step(
        s.schedule, s.i, s.z, s.x_hat, s.x_prev, order, s.history[1] if len(s.history) > 1 else None
    )


def _corrector(method: str, order: int) -> Corrector | None:
    """UniPC's corrector UniC: the step from ``i+1`` redone with the model call made at ``i``."""
    if method != "unipc":
        return None

    def correct(s: Visit) -> Tensor:
        if s.i == 0:  # the last step returns x_hat of the predicted state: nothing to correct
            return s.z
        return unipc_update(
            s.schedule, s.i + 1, s.z_last, s.history[0], s.history[1:order], x_new=s.x_hat
        )

    return correct


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

    ``method``: ``"ddpm"``, ``"ddim"`` (uses ``eta``), ``"dpmsolver++"`` or ``"unipc"``. ``steps`` in
    ``[1, T]`` model calls. ``generator`` makes the result deterministic (it draws z_T and every
    step's noise); ``device`` defaults to the generator's, and a generator on another device than
    ``device`` (a CPU generator for a CUDA model) draws there and the noise is moved. Other
    keyword arguments: the options of :func:`run_sampler` (``spacing``, ``order``, ``variance``,
    ``clip_x``, ``grad_log_prob``, ``classifier_scale``, ``callback``, ``return_trajectory``,
    ``progress``), then the model's.
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
    deterministic, one model call per step (10-20 suffice); ``order=1`` is DDIM, ``order=3``
    DPM-Solver++(3M). Classifier
    guidance uses the noise form as :func:`sample_ddim`. Other options as :func:`run_sampler`.

    Steps default to ``spacing="logsnr"`` (equal lambda steps, Lu et al.'s choice for low
    resolution). Time-uniform steps on the linear schedule make the last lambda steps several
    times longer than the previous ones, and the multistep extrapolation then overshoots: on the
    toy mixture of ``benchmarks/sampler_accuracy.py`` 10 uniform steps are worse than DDIM.
    """
    return run_sampler(
        model, z, schedule, method="dpmsolver++", steps=steps, order=order, **options
    )


def sample_unipc(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    order: int = 2,
    **options: Any,
) -> Output:
    """UniPC-bh2 (Zhao et al., 2023): the multistep predictor UniP-p and the corrector UniC-p.

    Each visit's model call first corrects the state it was made at (UniC, order p+1, from the
    previous state and data predictions, :func:`~diffusion_core.sampling.steps.unipc_update`),
    then predicts the next state from the corrected one (UniP): one model call per step, like
    DPM-Solver++, whose 2M update UniP-2 is. ``order`` is p (1-3; the first steps warm up from 1).
    Steps default to ``spacing="logsnr_window"``: on ``benchmarks/sampler_accuracy.py`` 10 calls
    reach about 1.1x the noise floor on the linear and the cosine schedule. Deterministic;
    classifier guidance in noise form as :func:`sample_ddim`. Other options as
    :func:`run_sampler`.
    """
    return run_sampler(model, z, schedule, method="unipc", steps=steps, order=order, **options)
