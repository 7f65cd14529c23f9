"""Sampling from a trained noise predictor: ancestral (DDPM), DDIM and DPM-Solver++, with guidance.

Chapter 18 of Prince, *Understanding Deep Learning*, sections 18.3, 18.5.2 and 18.6.2-18.6.3.

Every sampler is a plain function ``sample_*(model, z, schedule, ...)`` that starts from given
noise ``z`` (k-diffusion style); :func:`sample` draws the noise and dispatches on ``method``. A
model is any callable ``model(z_t, t, **model_kwargs) -> eps_hat`` with ``t`` a LongTensor ``[B]``
of timesteps in ``{0, ..., T-1}`` (index ``t`` is the chapter's step ``t+1``), returning the noise
estimate g_t[z_t] of eq. 18.35 shaped like ``z_t``. A model that also learns its variance (Nichol
& Dhariwal) returns ``2C`` channels along dim 1: the noise, then ``v`` in [-1, 1].

Step selection. A sampler with ``S`` steps visits the increasing sub-sequence ``ts`` of
:func:`timesteps_for` from ``ts[S-1]`` down to ``ts[0]``, calls the model once per visit, and jumps
from ``ts[i]`` to ``ts[i-1]`` (from ``ts[0]`` to the data). The jump uses the respaced schedule
(:meth:`NoiseSchedule.respace`), whose index ``i`` has ``alpha_bar[ts[i]]``: the same model then
defines a shorter diffusion process (18.6.2), which is what "accelerated" sampling is.

Guidance (18.6.3).
- Classifier guidance: pass ``grad_log_prob(z_t, t, **model_kwargs) -> grad log p(c | z_t)``
  (closed-form, or :func:`classifier_grad` over a classifier network) and ``classifier_scale``.
  Ancestral sampling shifts the mean by ``sigma_t^2 * scale * grad`` (eq. 18.40); DDIM and
  DPM-Solver++, which have no sampling variance to scale by, use the equivalent noise form
  ``eps - sqrt(1 - alpha_bar_t) * scale * grad`` (Dhariwal & Nichol, 2021, sec. 4.2).
- Classifier-free guidance: wrap the model with :func:`classifier_free_guidance`; the result is
  an ordinary model callable for any sampler.

Reserved keyword names (the samplers' own options, so not usable as model kwargs): ``steps``,
``timesteps``, ``spacing``, ``eta``, ``variance``, ``order``, ``clip_x``, ``grad_log_prob``,
``classifier_scale``, ``generator``, ``callback``, ``return_trajectory``, ``progress``, and for
:func:`sample` also ``method``, ``device``, ``dtype``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from diffusion_core.reverse import learned_log_variance, split_model_output
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor
EpsModel = Callable[..., Tensor]
"""``model(z_t, t, **model_kwargs) -> eps_hat`` (or ``[eps_hat, v]`` along dim 1)."""
GradLogProb = Callable[..., Tensor]
"""``grad_log_prob(z_t, t, **model_kwargs) -> grad_z log p(c | z_t)``, shaped like ``z_t``."""
Callback = Callable[[dict[str, Any]], None]
"""Called after every step with ``{"i", "t", "z", "x_hat"}``: the step count (0 first), the
model's timestep, the new state and the data prediction made at that step."""

METHODS = ("ddpm", "ddim", "dpmsolver++")
SPACINGS = ("uniform", "logsnr", "trailing", "leading")
VARIANCES = ("posterior", "beta", "learned")
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpmsolver++": "logsnr"}
"""Step spacing per method when :func:`sample` gets ``spacing=None`` (see :func:`timesteps_for`)."""


# --------------------------------------------------------------------- step selection
def timesteps_for(steps: int, schedule: NoiseSchedule | int, spacing: str = "uniform") -> Tensor:
    """The increasing sub-sequence of ``steps`` timesteps out of ``0..T-1`` that a sampler visits.

    ``schedule`` is the :class:`NoiseSchedule` (or just ``T`` for the spacings that need no more).

    - ``"uniform"``: evenly spaced in t and including both ends, ``round(linspace(0, T-1, steps))``
      (Nichol & Dhariwal's respacing); one step is ``[T-1]``.
    - ``"logsnr"``: evenly spaced in lambda = log(sqrt(alpha_bar)/sqrt(1-alpha_bar)) between
      both ends (nearest integer steps, kept distinct), which DPM-Solver (Lu et al., 2022)
      recommends; its steps crowd where the data prediction changes fastest, at low noise.
    - ``"trailing"``: evenly spaced back from ``T-1`` with stride ``T/steps``, so the last visit
      is ``T/steps - 1`` rather than 0 (Lin et al., 2024).
    - ``"leading"``: ``0, c, 2c, ...`` with ``c = T // steps``, as in the DDIM paper (Song et al.,
      2021); it does not start at ``T-1``.

    ``steps == T`` gives ``arange(T)`` for every spacing.
    """
    T = schedule if isinstance(schedule, int) else schedule.T
    _check_steps(steps, T)
    steps = int(steps)
    _check_choice("spacing", spacing, SPACINGS)
    if steps == T:
        return torch.arange(T)
    if steps == 1 and spacing in ("uniform", "logsnr"):
        return torch.tensor([T - 1])
    if spacing == "uniform":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round()
    elif spacing == "logsnr":
        if isinstance(schedule, int):
            raise ValueError("spacing='logsnr' needs the NoiseSchedule, not just T")
        lam = schedule.half_log_snr
        target = torch.linspace(float(lam[0]), float(lam[-1]), steps, dtype=torch.float64)
        ts = (lam[None, :] - target[:, None]).abs().argmin(dim=1).double()
    elif spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().flip(0) - 1
    else:
        ts = torch.arange(steps, dtype=torch.float64) * (T // steps)
    return _strictly_increasing(ts.long(), T)


def _strictly_increasing(ts: Tensor, T: int) -> Tensor:
    """Push rounded steps apart (up from the bottom, then down from the top) so none repeat."""
    ts = ts.clone()
    for i in range(1, len(ts)):
        ts[i] = max(int(ts[i]), int(ts[i - 1]) + 1)
    ts[-1] = min(int(ts[-1]), T - 1)
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(int(ts[i]), int(ts[i + 1]) - 1)
    return ts


# --------------------------------------------------------------------- the samplers
@torch.no_grad()
def sample_ddpm(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | Tensor | None = None,
    spacing: str = "uniform",
    variance: str = "posterior",
    clip_x: float | None = None,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Ancestral sampling, Algorithm 18.2, from the noise ``z`` = z_T.

    Each step draws z_{t-1} ~ Norm[f_t[z_t], sigma_t^2 I] (eq. 18.16) with the mean f_t of
    eq. 18.35 computed from the model's noise estimate; the last step returns the mean f_1 without
    noise. With ``steps < T`` (or explicit ``timesteps``) the steps are those of the respaced
    schedule ("accelerated" sampling, 18.6.2).

    Args:
        variance: sigma_t^2 of eq. 18.16: ``"posterior"`` = beta_t (1-alpha_bar_{t-1})/(1-alpha_bar_t)
            (eq. 18.15), ``"beta"`` = beta_t, or ``"learned"``: the model returns ``[eps, v]`` and
            log sigma_t^2 = (v+1)/2 log beta_t + (1-v)/2 log(clipped posterior variance)
            (Nichol & Dhariwal, 2021, eq. 15).
        clip_x: clamp the predicted data to [-clip_x, clip_x] before forming the mean.
        grad_log_prob, classifier_scale: classifier guidance, the mean is shifted by
            sigma_t^2 * scale * grad log p(c|z_t) (eq. 18.40).
        generator: source of the noise added at each step.
        return_trajectory: also return the states ``[S+1, *z.shape]``, z_T first and x last.
    """
    _check_choice("variance", variance, VARIANCES)
    _check_guidance(grad_log_prob, classifier_scale)
    ts, sub = _respaced(schedule, steps, timesteps, spacing)
    trajectory = [z] if return_trajectory else None
    for n, i in enumerate(_descending(len(ts), progress, "ddpm")):
        eps, v, t = _predict_eps(model, z, int(ts[i]), model_kwargs)
        x_hat, eps = _predict_x(sub, z, i, eps, clip_x)
        mean = sub.reverse_mean_from_eps(z, i, eps)  # eq. 18.35
        var = _ddpm_variance(sub, i, variance, v)
        if grad_log_prob is not None:  # eq. 18.40
            mean = mean + var * classifier_scale * grad_log_prob(z, t, **model_kwargs)
        z = mean + var.sqrt() * _randn_like(z, generator) if i > 0 else mean
        _record(n, t, z, x_hat, callback, trajectory)
    return _result(z, trajectory)


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | Tensor | None = None,
    spacing: str = "uniform",
    eta: float = 0.0,
    clip_x: float | None = None,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """DDIM (Song et al., 2021, eq. 12) over any sub-sequence of steps (18.6.2).

    From z_t and the data prediction x_hat = (z_t - sqrt(1-alpha_bar_t) eps)/sqrt(alpha_bar_t):

        z_s = sqrt(alpha_bar_s) x_hat + sqrt(1 - alpha_bar_s - sigma^2) eps + sigma * noise,
        sigma^2 = eta^2 (1-alpha_bar_s)/(1-alpha_bar_t) (1 - alpha_bar_t/alpha_bar_s),

    for the next visited step s. ``eta = 0`` is deterministic (the chapter's DDIM, fig. 18.10c);
    ``eta = 1`` makes sigma^2 the posterior variance of the respaced process, i.e. ancestral
    sampling with ``variance="posterior"`` (and the same noise draws). Classifier guidance uses
    the noise form eps - sqrt(1-alpha_bar_t) * scale * grad. Other arguments as :func:`sample_ddpm`.
    """
    _check_eta(eta)
    _check_guidance(grad_log_prob, classifier_scale)
    ts, sub = _respaced(schedule, steps, timesteps, spacing)
    trajectory = [z] if return_trajectory else None
    for n, i in enumerate(_descending(len(ts), progress, "ddim")):
        eps, _, t = _predict_eps(model, z, int(ts[i]), model_kwargs)
        eps = _guide_eps(sub, z, i, eps, t, grad_log_prob, classifier_scale, model_kwargs)
        x_hat, eps = _predict_x(sub, z, i, eps, clip_x)
        alpha_bar_prev = float(sub.alpha_bar_prev[i])
        var = eta**2 * float(sub.posterior_variance[i])
        z = alpha_bar_prev**0.5 * x_hat + max(1.0 - alpha_bar_prev - var, 0.0) ** 0.5 * eps
        if var > 0.0:
            z = z + var**0.5 * _randn_like(z, generator)
        _record(n, t, z, x_hat, callback, trajectory)
    return _result(z, trajectory)


@torch.no_grad()
def sample_dpmsolver_pp(
    model: EpsModel,
    z: Tensor,
    schedule: NoiseSchedule,
    steps: int | None = None,
    *,
    timesteps: Sequence[int] | Tensor | None = None,
    spacing: str = "logsnr",
    order: int = 2,
    clip_x: float | None = None,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data prediction.

    Lu et al., 2022, "DPM-Solver++", Algorithm 2. With alpha = sqrt(alpha_bar),
    sigma = sqrt(1-alpha_bar), lambda = log(alpha/sigma) (:attr:`NoiseSchedule.half_log_snr`) and
    h = lambda_s - lambda_t for the step from t to s:

        z_s = (sigma_s/sigma_t) z_t - alpha_s (e^{-h} - 1) D,
        D = x_hat_t                                        (first step, or ``order=1``: DDIM),
        D = (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_prev,  r = h_prev / h    (later steps).

    The last step, from ``ts[0]`` to the data (sigma = 0, lambda = inf), is first order: it
    returns the data prediction x_hat. Deterministic; one model call per step (10-20 suffice).
    Classifier guidance uses the noise form as in :func:`sample_ddim`.

    Steps default to ``spacing="logsnr"`` (equal lambda steps, Lu et al.'s choice for low
    resolution). Time-uniform steps on the linear schedule make the last lambda steps several
    times longer than the previous ones, and the multistep extrapolation then overshoots: on the
    toy mixture of ``benchmarks/sampler_accuracy.py`` 10 uniform steps are worse than DDIM.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    _check_guidance(grad_log_prob, classifier_scale)
    ts, sub = _respaced(schedule, steps, timesteps, spacing)
    lam, alpha, sigma = sub.half_log_snr, sub.sqrt_alpha_bar, sub.sqrt_one_minus_alpha_bar
    trajectory = [z] if return_trajectory else None
    x_prev, h_prev = None, 0.0
    for n, i in enumerate(_descending(len(ts), progress, "dpmsolver++")):
        eps, _, t = _predict_eps(model, z, int(ts[i]), model_kwargs)
        eps = _guide_eps(sub, z, i, eps, t, grad_log_prob, classifier_scale, model_kwargs)
        x_hat, _ = _predict_x(sub, z, i, eps, clip_x)
        if i == 0:
            z = x_hat
        else:
            h = float(lam[i - 1] - lam[i])
            d = x_hat
            if order == 2 and x_prev is not None:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
            z = float(sigma[i - 1] / sigma[i]) * z - float(alpha[i - 1]) * math.expm1(-h) * d
            x_prev, h_prev = x_hat, h
        _record(n, t, z, x_hat, callback, trajectory)
    return _result(z, trajectory)


def sample(
    model: EpsModel,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    method: str,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    spacing: str | None = None,
    variance: str = "posterior",
    clip_x: float | None = None,
    grad_log_prob: GradLogProb | None = None,
    classifier_scale: float = 1.0,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw ``shape[0]`` samples: z_T ~ Norm[0, I] (eq. 18.16), then the sampler ``method``.

    ``method``: ``"ddpm"`` (:func:`sample_ddpm`, uses ``variance``), ``"ddim"``
    (:func:`sample_ddim`, uses ``eta``) or ``"dpmsolver++"`` (:func:`sample_dpmsolver_pp`).
    ``steps`` in ``[1, T]`` model calls, chosen by :func:`timesteps_for` with ``spacing``.
    ``generator`` makes the result deterministic (it draws z_T and every step's noise); its
    device is the default ``device``. Remaining keyword arguments go to the model. Other
    arguments as the sampler functions.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {list(METHODS)}")
    _check_steps(steps, schedule.T)
    _check_eta(eta)
    if eta != 0.0 and method != "ddim":
        raise ValueError(f"eta={eta} only applies to method='ddim', not method={method!r}")
    _check_choice("variance", variance, VARIANCES)
    if variance != "posterior" and method != "ddpm":
        raise ValueError(
            f"variance={variance!r} only applies to method='ddpm', not method={method!r}"
        )
    if device is None and generator is not None:
        device = generator.device
    z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    common: dict[str, Any] = dict(
        steps=steps,
        spacing=DEFAULT_SPACING[method] if spacing is None else spacing,
        clip_x=clip_x,
        grad_log_prob=grad_log_prob,
        classifier_scale=classifier_scale,
        callback=callback,
        return_trajectory=return_trajectory,
        progress=progress,
    )
    if method == "ddpm":
        return sample_ddpm(
            model, z, schedule, variance=variance, generator=generator, **common, **model_kwargs
        )
    if method == "ddim":
        return sample_ddim(
            model, z, schedule, eta=eta, generator=generator, **common, **model_kwargs
        )
    return sample_dpmsolver_pp(model, z, schedule, **common, **model_kwargs)


# --------------------------------------------------------------------- guidance
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
            eps_c, v_c = _split_output(out_c, z_t)
            eps_u, _ = _split_output(out_u, z_t)
            return torch.cat([torch.lerp(eps_u, eps_c, scale), v_c], dim=1)  # type: ignore[list-item]
        return torch.lerp(out_u, out_c, scale)

    return guided


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


# --------------------------------------------------------------------- internals
def _respaced(
    schedule: NoiseSchedule,
    steps: int | None,
    timesteps: Sequence[int] | Tensor | None,
    spacing: str,
) -> tuple[Tensor, NoiseSchedule]:
    """The visited timesteps and the schedule of the process over them (18.6.2)."""
    if timesteps is not None:
        if steps is not None:
            raise ValueError("pass either steps or timesteps, not both")
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    else:
        ts = timesteps_for(schedule.T if steps is None else steps, schedule, spacing)
    if ts.numel() == schedule.T and bool((ts == torch.arange(schedule.T)).all()):
        return ts, schedule
    return ts, schedule.respace(ts)  # validates: increasing, within [0, T-1]


def _predict_eps(
    model: EpsModel, z: Tensor, step: int, model_kwargs: Mapping[str, Any]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One model call at timestep ``step``: (eps, v or None, the LongTensor t)."""
    t = torch.full((z.shape[0],), step, dtype=torch.long, device=z.device)
    eps, v = _split_output(model(z, t, **model_kwargs), z)
    return eps, v, t


def _split_output(out: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """A model output as (eps, None), or (eps, v) when it has twice ``z``'s channels."""
    out = out.to(z.dtype)
    return split_model_output(out, z, learned_variance=out.shape != z.shape)


def _predict_x(
    sub: NoiseSchedule, z: Tensor, i: int, eps: Tensor, clip_x: float | None
) -> tuple[Tensor, Tensor]:
    """x_hat from eps (eq. 18.7 inverted); with clipping, eps recomputed to match the clipped x."""
    x_hat = sub.predict_x_from_eps(z, i, eps)
    if clip_x is None:
        return x_hat, eps
    x_hat = x_hat.clamp(-clip_x, clip_x)
    return x_hat, sub.predict_eps_from_x(z, i, x_hat)


def _guide_eps(
    sub: NoiseSchedule,
    z: Tensor,
    i: int,
    eps: Tensor,
    t: Tensor,
    grad_log_prob: GradLogProb | None,
    scale: float,
    model_kwargs: Mapping[str, Any],
) -> Tensor:
    """Classifier guidance in noise form: eps - sqrt(1-alpha_bar_t) * scale * grad log p(c|z_t)."""
    if grad_log_prob is None:
        return eps
    grad = grad_log_prob(z, t, **model_kwargs)
    return eps - float(sub.sqrt_one_minus_alpha_bar[i]) * scale * grad


def _ddpm_variance(sub: NoiseSchedule, i: int, variance: str, v: Tensor | None) -> Tensor:
    """sigma_t^2 of eq. 18.16 at respaced index ``i`` (a 0-d tensor, or per element if learned)."""
    if variance == "posterior":
        return sub.posterior_variance[i]
    if variance == "beta":
        return sub.betas[i]
    if v is None:
        raise ValueError(
            "variance='learned' needs a model that returns [eps, v] (twice z_t's channels)"
        )
    return learned_log_variance(v, i, sub).exp()


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


def _randn_like(z: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def _descending(n: int, progress: bool, name: str) -> Iterable[int]:
    """Indices n-1, ..., 0, with a progress bar if asked."""
    indices = range(n - 1, -1, -1)
    if not progress:
        return indices
    from rich.progress import track

    return track(indices, total=n, description=f"sampling ({name}, {n} steps)")


def _record(
    n: int,
    t: Tensor,
    z: Tensor,
    x_hat: Tensor,
    callback: Callback | None,
    trajectory: list[Tensor] | None,
) -> None:
    if callback is not None:
        callback({"i": n, "t": int(t[0]), "z": z, "x_hat": x_hat})
    if trajectory is not None:
        trajectory.append(z)


def _result(z: Tensor, trajectory: list[Tensor] | None) -> Tensor | tuple[Tensor, Tensor]:
    return z if trajectory is None else (z, torch.stack(trajectory))


# --------------------------------------------------------------------- validation
def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(valid)}")


def _check_steps(steps: int, T: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, T={T}], got {steps}")


def _check_eta(eta: float) -> None:
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta}")


def _check_guidance(grad_log_prob: GradLogProb | None, scale: float) -> None:
    if grad_log_prob is None and scale != 1.0:
        raise ValueError(
            f"classifier_scale={scale} has no effect without grad_log_prob; pass "
            "grad_log_prob=classifier_grad(classifier, y)"
        )
