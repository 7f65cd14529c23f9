"""The evidence lower bound (ELBO) of a diffusion model, in bits per dimension.

Chapter 18, eqs. 18.24-18.28. For one data example x the negative ELBO is a sum of T+1 terms,

    -ELBO(x) = L_prior + L_1 + sum_{t=2}^T L_t,
    L_prior = KL(q(z_T|x) || Norm[0, I])                                        (eq. 18.24, 3rd line)
    L_t     = E_{q(z_t|x)} KL(q(z_{t-1}|z_t, x) || Pr(z_{t-1}|z_t))  for t >= 2  (eqs. 18.25, 18.27)
    L_1     = -E_{q(z_1|x)} log Pr(x|z_1)                                       (eqs. 18.25, 18.26)

The chapter drops L_prior (q(z_T|x) is close to the prior); here it is kept, so the bound is an
exact upper bound on -log Pr(x). KLs between diagonal Gaussians are closed form (eq. 18.47).
The decoder Pr(x|z_1) is either the chapter's Gaussian (eq. 18.26, for continuous data: the bound
is then on a *density*) or Ho et al.'s discretised Gaussian for 8-bit data scaled to [-1, 1]
(the bound is then on a probability mass, comparable across papers).

Units. Every term is averaged over the data dimensions and divided by log 2: bits per dimension.
Multiply by D log 2 (D values per example) for nats per example.

Array index ``t`` holds the chapter's step t+1 (see :mod:`diffusion_core.schedule`), so column 0 of
``terms_bpd`` is the decoder term L_1 and column t >= 1 is the KL L_{t+1}.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from diffusion_core.reverse import Model, Parameterization, VarianceType, p_mean_variance
from diffusion_core.schedule import NoiseSchedule, extract

Tensor = torch.Tensor
Decoder = Literal["discretized", "gaussian"]

LOG2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (the batch): [B, ...] -> [B]."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Nats per example -> bits per dimension: divide by D log 2."""
    return nats / (num_dims * LOG2)


# --------------------------------------------------------------------------- Gaussian maths
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(Norm[mean1, e^logvar1] || Norm[mean2, e^logvar2]) elementwise, in nats.

    Eq. 18.47 for diagonal covariances, one dimension at a time:
    0.5 (var1/var2 - 1 + (mean1-mean2)^2/var2 + log var2 - log var1). Arguments broadcast.
    """
    return 0.5 * (
        torch.exp(logvar1 - logvar2)
        - 1.0
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        + logvar2
        - logvar1
    )


def gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log Norm_x[mean, e^logvar] elementwise (a density, eq. 18.26)."""
    return -0.5 * (math.log(2.0 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, logvar: Tensor, *, bins: int = 256
) -> Tensor:
    """log of the probability that Norm[mean, e^logvar] falls in x's bin, elementwise.

    Ho et al. (2020), eq. 13: 8-bit data scaled to [-1, 1] have bin centres -1 + 2k/255; each bin
    has width 2/255 and the two edge bins are open ((-inf, -1 + 1/255] and [1 - 1/255, inf)), so
    the probabilities of all ``bins`` values sum to one. ``x`` must hold bin centres.
    """
    half_width = 1.0 / (bins - 1)
    std = torch.exp(0.5 * logvar)
    lower = (x - mean - half_width) / std
    upper = (x - mean + half_width) / std
    # Phi(upper) - Phi(lower), computed in the tail where it is small so it does not cancel.
    right_tail = lower > 0
    mass = torch.where(
        right_tail,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mid = torch.log(mass.clamp(min=1e-12))
    log_first = torch.special.log_ndtr(upper)  # x = -1: everything below the first upper edge
    log_last = torch.special.log_ndtr(-lower)  # x = +1: everything above the last lower edge
    edge = 1.0 - 0.5 * half_width
    return torch.where(x < -edge, log_first, torch.where(x > edge, log_last, log_mid))


# --------------------------------------------------------------------------- ELBO terms
def prior_bpd(x: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_prior = KL(q(z_T|x) || Norm[0, I]) in bits/dim, shape [B] (eqs. 18.8, 18.47)."""
    mean, var = schedule.q_mean_variance(x, schedule.T - 1)
    kl = normal_kl(mean, torch.log(var), torch.zeros_like(mean), torch.zeros_like(mean))
    return mean_flat(kl) / LOG2


def vlb_term_bpd(
    x: Tensor,
    z_t: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    mean: Tensor,
    log_variance: Tensor,
    *,
    decoder: Decoder = "discretized",
) -> Tensor:
    """One term of the bound for a sampled z_t, given the model's p(z_{t-1}|z_t), bits/dim, [B].

    Where t >= 1: KL(q(z_{t-1}|z_t, x) || Norm[mean, e^log_variance]) (eq. 18.27, 18.47);
    where t == 0: the decoder's -log Pr(x|z_1) with that mean and variance (eq. 18.26).
    """
    true_mean, _ = schedule.posterior(z_t, x, t)
    true_logvar = extract(schedule.posterior_log_variance_clipped, t, x)
    kl = mean_flat(normal_kl(true_mean, true_logvar, mean, log_variance)) / LOG2
    nll = -mean_flat(decoder_log_likelihood(x, mean, log_variance, decoder)) / LOG2
    return torch.where(t.to(kl.device) == 0, nll, kl)


def decoder_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor, decoder: Decoder) -> Tensor:
    """log Pr(x|z_1) elementwise for the chosen decoder."""
    if decoder == "discretized":
        return discretized_gaussian_log_likelihood(x, mean, logvar)
    if decoder == "gaussian":
        return gaussian_log_likelihood(x, mean, logvar)
    raise ValueError(f"decoder must be 'discretized' or 'gaussian', got {decoder!r}")


def check_decoder_data(x: Tensor, decoder: Decoder) -> None:
    """Raise if the discretized decoder is asked to score data outside [-1, 1]."""
    if decoder == "discretized" and bool((x.abs() > 1.0 + 1e-6).any()):
        raise ValueError(
            "the discretized decoder expects 8-bit data scaled to [-1, 1], but x spans "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; scale it or use decoder='gaussian'"
        )


@torch.no_grad()
def elbo_terms(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    parameterization: Parameterization | str = "eps",
    variance: VarianceType | str = "posterior",
    decoder: Decoder = "discretized",
    model_kwargs: dict[str, Any] | None = None,
    steps_per_call: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Every term of the negative ELBO (eq. 18.25) for a batch x, in bits per dimension.

    Each L_t is estimated with one sample z_t ~ q(z_t|x) (eq. 18.7) and the closed-form KL;
    L_prior is exact. Cost: T network evaluations per example (``T / steps_per_call`` calls on a
    batch of ``steps_per_call * B``), the same as one ancestral sample with all T steps.

    Returns ``prior_bpd`` [B], ``terms_bpd`` [B, T] (column 0 = decoder term, column t = KL at
    index t), ``mse`` [B, T] (the eps-MSE per step, a diagnostic) and ``total_bpd`` [B], the
    bound on -log2 Pr(x) per dimension.
    """
    check_decoder_data(x, decoder)
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    kwargs = model_kwargs or {}
    B, T = x.shape[0], schedule.T
    terms = torch.zeros(B, T, dtype=x.dtype, device=x.device)
    mse = torch.zeros_like(terms)
    chunks = list(torch.arange(T).split(steps_per_call))
    if progress:
        from rich.progress import track

        chunks = track(chunks, description="ELBO terms")
    for steps in chunks:
        k = steps.numel()
        t = steps.to(x.device).repeat_interleave(B)  # [k*B]: each step for the whole batch
        xs = x.repeat(k, *([1] * (x.ndim - 1)))
        kw = {
            name: value.repeat(k, *([1] * (value.ndim - 1))) if isinstance(value, Tensor) else value
            for name, value in kwargs.items()
        }
        noise = torch.randn(xs.shape, generator=generator, dtype=x.dtype, device=x.device)
        z_t = schedule.q_sample(xs, t, noise)
        step = p_mean_variance(
            model(z_t, t, **kw),
            z_t,
            t,
            schedule,
            parameterization=parameterization,
            variance=variance,
        )
        term = vlb_term_bpd(xs, z_t, t, schedule, step.mean, step.log_variance, decoder=decoder)
        terms[:, steps] = term.reshape(k, B).T
        mse[:, steps] = mean_flat((step.eps - noise) ** 2).reshape(k, B).T
    prior = prior_bpd(x, schedule)
    return {
        "prior_bpd": prior,
        "terms_bpd": terms,
        "mse": mse,
        "total_bpd": prior + terms.sum(dim=1),
    }


def nll_bpd(model: Model, x: Tensor, schedule: NoiseSchedule, **kwargs: Any) -> Tensor:
    """Upper bound on -log2 Pr(x) per dimension (the negative ELBO, all T steps), shape [B].

    Keyword arguments as :func:`elbo_terms`; the cost is T network evaluations per example.
    """
    return elbo_terms(model, x, schedule, **kwargs)["total_bpd"]
