"""Gaussian-mixture toy data whose diffused marginals and optimal noise predictor are closed-form.

A mixture of Gaussians with diagonal covariances stays a mixture of Gaussians under the diffusion
kernel of eq. 18.8: component k, N(mu_k, Sigma_k), diffuses to

    q(z_t | k) = N(sqrt(alpha_bar_t) mu_k, alpha_bar_t Sigma_k + (1 - alpha_bar_t) I),

with the mixture weights unchanged. The marginal q(z_t) is therefore known exactly, and so is the
noise predictor that minimises the loss of eq. 18.39,

    eps*(z_t, t) = E[eps | z_t] = -sqrt(1 - alpha_bar_t) grad_z log q(z_t)      (Tweedie's formula),

computed below from the component responsibilities without autograd. Plugging ``eps*`` into a
sampler isolates the sampler's own discretisation error, which is what ``tests/unit`` measure; the
chapter's 1-D figures (18.2-18.8, 18.10) use the same closed forms.

Class labels. Every component carries a class label (by default its own index). Conditioning on a
label y restricts the mixture to the components with that label (weights renormalised), giving
q(z_t | y) and the exact class-conditional predictor; the label ``NULL_LABEL`` (-1) means "no
condition", which is how classifier-free guidance passes the unconditional branch in one batch.
The exact classifier is p(y | z_t) = q(z_t | y) p(y) / q(z_t).

Shapes: data and latents are ``[B, D]`` (``D = 1`` for the chapter's 1-D toy); ``t`` is an int or
a LongTensor ``[B]`` (one step per row). All computation is float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor

NULL_LABEL = -1
"""Label value meaning "unconditional" (the null condition of classifier-free guidance)."""

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """A mixture of Gaussians with isotropic or diagonal covariance per component.

    Args:
        weights: ``[K]`` positive mixture weights (normalised here).
        means: ``[K, D]`` component means, or ``[K]`` for a 1-D mixture.
        variances: a scalar (shared), ``[K]`` (isotropic per component) or ``[K, D]`` (diagonal).
        labels: ``[K]`` non-negative class label per component; default ``arange(K)``.
    """

    def __init__(
        self,
        weights: Tensor | list[float],
        means: Tensor | list,
        variances: Tensor | list | float,
        labels: Tensor | list[int] | None = None,
    ):
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[:, None]
        if means.ndim != 2:
            raise ValueError(f"means must be [K] or [K, D], got shape {tuple(means.shape)}")
        K, D = means.shape
        if weights.numel() != K:
            raise ValueError(f"got {weights.numel()} weights for {K} components")
        if not bool((weights > 0).all()):
            raise ValueError(f"weights must be positive, got {weights.tolist()}")
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 0:
            variances = variances.expand(K, D)
        elif variances.shape == (K,):
            variances = variances[:, None].expand(K, D)
        elif variances.shape != (K, D):
            raise ValueError(
                f"variances must be a scalar, [K]={K} or [K, D]=({K}, {D}); "
                f"got shape {tuple(variances.shape)}"
            )
        if not bool((variances > 0).all()):
            raise ValueError("variances must be positive")
        labels = torch.arange(K) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (K,) or bool((labels < 0).any()):
            raise ValueError(f"labels must be {K} non-negative integers, got {labels.tolist()}")

        self.weights = weights / weights.sum()
        self.means = means
        self.variances = variances.contiguous()
        self.labels = labels

    # ----------------------------------------------------------------- properties
    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, D={self.dim}, classes={self.n_classes})"

    def diffused(self, alpha_bar: float) -> GaussianMixture:
        """The mixture q(z_t) for one value of alpha_bar (eq. 18.8 applied to every component)."""
        ab = float(alpha_bar)
        if not 0.0 < ab <= 1.0:
            raise ValueError(f"alpha_bar must lie in (0, 1], got {ab}")
        return GaussianMixture(
            self.weights,
            math.sqrt(ab) * self.means,
            ab * self.variances + (1.0 - ab),
            self.labels,
        )

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        y: Tensor | int | None = None,
        return_components: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Draw ``n`` points ``[n, D]`` from the mixture (from q(x | y) when ``y`` is given)."""
        probs = self._log_weights(y, n).exp()
        k = torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.variances[k].sqrt() * noise
        return (x, k) if return_components else x

    # ----------------------------------------------------------------- densities
    def log_prob(self, x: Tensor, y: Tensor | int | None = None) -> Tensor:
        """log Pr(x) (or log Pr(x | y)) of data points ``[B, D]``; returns ``[B]``."""
        return torch.logsumexp(self._log_joint(x, None, None, y)[0], dim=-1)

    def marginal_log_prob(
        self, z: Tensor, t: Tensor | int, schedule: NoiseSchedule, y: Tensor | int | None = None
    ) -> Tensor:
        """log q(z_t) (or log q(z_t | y)) of the diffused data, eq. 18.8 per component; ``[B]``."""
        return torch.logsumexp(self._log_joint(z, t, schedule, y)[0], dim=-1)

    def score(
        self,
        z: Tensor,
        t: Tensor | int | None = None,
        schedule: NoiseSchedule | None = None,
        y: Tensor | int | None = None,
    ) -> Tensor:
        """grad_z log q(z_t) (of the data density when ``t`` is None), ``[B, D]``.

        For a Gaussian mixture: sum_k r_k(z) (m_k - z) / v_k with responsibilities r_k.
        """
        log_joint, scaled = self._log_joint(z, t, schedule, y)
        resp = torch.softmax(log_joint, dim=-1)
        return -(resp[..., None] * scaled).sum(dim=1)

    def eps_star(
        self, z_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, y: Tensor | int | None = None
    ) -> Tensor:
        """The exact noise predictor E[eps | z_t] = -sqrt(1-alpha_bar_t) grad log q(z_t), ``[B, D]``.

        It minimises the loss of eq. 18.39 (with ``y`` given: the class-conditional predictor).
        """
        alpha_bar = self._alpha_bar(t, schedule, z_t)
        return -(1.0 - alpha_bar).sqrt() * self.score(z_t, t, schedule, y)

    def class_log_posterior(
        self, z: Tensor, t: Tensor | int | None = None, schedule: NoiseSchedule | None = None
    ) -> Tensor:
        """log p(c | z_t) for every class c, ``[B, n_classes]`` (of the data when ``t`` is None).

        Differentiable in ``z``, so it doubles as an exact "classifier network" for autograd.
        """
        log_joint = self._log_joint(z, t, schedule, None)[0]
        per_class = torch.stack(
            [
                torch.logsumexp(log_joint[:, self.labels == c], dim=-1)
                for c in range(self.n_classes)
            ],
            dim=-1,
        )
        return per_class - torch.logsumexp(log_joint, dim=-1, keepdim=True)

    def classifier_log_prob_grad(
        self, z_t: Tensor, t: Tensor | int, schedule: NoiseSchedule, y: Tensor | int
    ) -> Tensor:
        """grad_z log p(y | z_t) = grad log q(z_t | y) - grad log q(z_t): the classifier term of eq. 18.40."""
        return self.score(z_t, t, schedule, y) - self.score(z_t, t, schedule, None)

    # ----------------------------------------------------------------- internals
    def _alpha_bar(
        self, t: Tensor | int | None, schedule: NoiseSchedule | None, z: Tensor
    ) -> Tensor:
        """alpha_bar as ``[B, 1]``, or ``[1, 1]`` when every row has the same step (float64).

        ``t`` None means the data itself (alpha_bar = 1).
        """
        if t is None:
            return torch.ones(1, 1, dtype=torch.float64, device=z.device)
        if schedule is None:
            raise ValueError("a timestep t needs its schedule")
        t = torch.as_tensor(t, dtype=torch.long).to(z.device)
        if t.ndim == 0 or bool((t == t.flatten()[0]).all()):  # one step for all rows (samplers)
            return schedule.alpha_bar.to(z.device)[t.flatten()[0]].reshape(1, 1)
        if t.shape != (z.shape[0],):
            raise ValueError(f"t must be an int or shaped [{z.shape[0]}], got {tuple(t.shape)}")
        return schedule.alpha_bar.to(z.device)[t].reshape(-1, 1)

    def _log_weights(self, y: Tensor | int | None, batch: int) -> Tensor:
        """Log mixture weights per row, ``[B, K]``, restricted to the components of class ``y``."""
        log_w = self.weights.log().expand(batch, -1)
        if y is None:
            return log_w
        y = torch.as_tensor(y, dtype=torch.long).to(log_w.device)
        y = y.expand(batch) if y.ndim == 0 else y
        if y.shape != (batch,):
            raise ValueError(f"labels y must be an int or shaped [{batch}], got {tuple(y.shape)}")
        bad = (y != NULL_LABEL) & ((y < 0) | (y >= self.n_classes))
        if bool(bad.any()):
            raise ValueError(
                f"labels must lie in [0, {self.n_classes - 1}] or be NULL_LABEL={NULL_LABEL}, "
                f"got {sorted(set(y[bad].tolist()))}"
            )
        keep = (self.labels[None, :] == y[:, None]) | (y[:, None] == NULL_LABEL)
        log_w = log_w.masked_fill(~keep, -math.inf)
        return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)

    def _log_joint(
        self,
        z: Tensor,
        t: Tensor | int | None,
        schedule: NoiseSchedule | None,
        y: Tensor | int | None,
    ) -> tuple[Tensor, Tensor]:
        """log(w_k q(z_t | k)) ``[B, K]`` and (z - m_k) / v_k ``[B, K, D]`` for the diffused components."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected points shaped [B, {self.dim}], got {tuple(z.shape)}")
        z = z.to(torch.float64)
        ab = self._alpha_bar(t, schedule, z)[..., None]  # [B, 1, 1]
        mean = ab.sqrt() * self.means  # [B, K, D]
        var = ab * self.variances + (1.0 - ab)
        scaled = (z[:, None, :] - mean) / var  # (z - m_k) / v_k, [B, K, D]
        mahalanobis = (scaled.square() * var).sum(dim=-1)
        log_normal = -0.5 * (mahalanobis + (var.log() + _LOG_2PI).sum(dim=-1))
        return self._log_weights(y, z.shape[0]) + log_normal, scaled


# --------------------------------------------------------------------- model-shaped callables
def exact_eps_model(schedule: NoiseSchedule, mixture: GaussianMixture) -> Callable[..., Tensor]:
    """The exact noise predictor as a sampler model ``model(z_t, t, y=None) -> eps``.

    ``z_t`` is ``[B, ...]`` with ``prod(...) == mixture.dim``; the output has ``z_t``'s shape and
    dtype. ``y`` (int or LongTensor ``[B]``) conditions on a class; ``None`` or rows equal to
    ``NULL_LABEL`` are unconditional.
    """

    def model(z_t: Tensor, t: Tensor, y: Tensor | int | None = None) -> Tensor:
        flat = z_t.reshape(z_t.shape[0], -1)
        eps = mixture.eps_star(flat, t, schedule, y)
        return eps.to(z_t.dtype).reshape(z_t.shape)

    return model


def exact_classifier(
    schedule: NoiseSchedule, mixture: GaussianMixture
) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact noisy classifier ``classifier(z_t, t) -> log p(c | z_t)`` ``[B, n_classes]``.

    Its outputs are normalised log-probabilities, so they can stand in for a classifier's logits.
    """

    def classifier(z_t: Tensor, t: Tensor) -> Tensor:
        flat = z_t.reshape(z_t.shape[0], -1)
        return mixture.class_log_posterior(flat, t, schedule).to(z_t.dtype)

    return classifier


def exact_classifier_grad(
    schedule: NoiseSchedule, mixture: GaussianMixture, y: Tensor | int
) -> Callable[..., Tensor]:
    """Closed-form ``grad_log_prob(z_t, t, **_) = grad log p(y | z_t)`` for classifier guidance."""

    def grad_log_prob(z_t: Tensor, t: Tensor, **_: object) -> Tensor:
        flat = z_t.reshape(z_t.shape[0], -1)
        grad = mixture.classifier_log_prob_grad(flat, t, schedule, y)
        return grad.to(z_t.dtype).reshape(z_t.shape)

    return grad_log_prob


# --------------------------------------------------------------------- distances between samples
def wasserstein_1d(a: Tensor, b: Tensor, p: float = 2.0) -> Tensor:
    """Exact p-Wasserstein distance between two 1-D empirical distributions (any sizes).

    W_p^p = int_0^1 |F_a^{-1}(u) - F_b^{-1}(u)|^p du, with piecewise-constant quantile functions.
    """
    a = a.flatten().to(torch.float64)[:, None]
    b = b.flatten().to(torch.float64)[:, None]
    return _wasserstein_pp(a, b, p)[0].pow(1.0 / p)


def _wasserstein_pp(a: Tensor, b: Tensor, p: float) -> Tensor:
    """W_p^p between the columns of ``a`` ``[n, J]`` and ``b`` ``[m, J]``, ``[J]``."""
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        raise ValueError("Wasserstein distances need non-empty samples")
    a, b = a.sort(dim=0).values, b.sort(dim=0).values
    if n == m:
        return (a - b).abs().pow(p).mean(dim=0)
    # Breakpoints of both quantile functions; between them both are constant. Division is
    # correctly rounded, so equal fractions i/n = j/m give equal floats and merge.
    u = torch.unique(torch.cat([torch.arange(1, n + 1) / n, torch.arange(1, m + 1) / m]).double())
    widths = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - widths / 2
    ia = torch.clamp(torch.ceil(mid * n).long() - 1, 0, n - 1)
    ib = torch.clamp(torch.ceil(mid * m).long() - 1, 0, m - 1)
    return ((a[ia] - b[ib]).abs().pow(p) * widths[:, None]).sum(dim=0)


def projection_directions(dim: int, n_projections: int = 64, seed: int = 0) -> Tensor:
    """Fixed unit directions ``[n_projections, dim]`` for :func:`sliced_wasserstein`.

    1-D: the axis. 2-D: angles evenly spaced over [0, pi). Higher: seeded Gaussian directions.
    """
    if dim == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if dim == 2:
        angle = torch.arange(n_projections, dtype=torch.float64) * math.pi / n_projections
        return torch.stack([angle.cos(), angle.sin()], dim=-1)
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(n_projections, dim, generator=gen, dtype=torch.float64)
    return d / d.norm(dim=-1, keepdim=True)


def sliced_wasserstein(
    x: Tensor, y: Tensor, n_projections: int = 64, p: float = 2.0, seed: int = 0
) -> Tensor:
    """Sliced p-Wasserstein distance between point sets ``[N, D]`` and ``[M, D]``.

    SW_p = (mean over directions theta of W_p^p(theta . x, theta . y))^(1/p), with the fixed
    directions of :func:`projection_directions`, so equal inputs give equal answers.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"point sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    directions = projection_directions(x.shape[1], n_projections, seed)
    return _wasserstein_pp(x @ directions.T, y @ directions.T, p).mean().pow(1.0 / p)


# --------------------------------------------------------------------- reference problems
def example_mixture_2d() -> GaussianMixture:
    """The 2-D, three-class mixture used by the sampler tests and ``benchmarks/sampler_accuracy``.

    Unequal weights, one anisotropic component and separated modes, on the unit scale the linear
    schedule is designed for.
    """
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-1.0, -0.4], [0.9, 0.8], [0.8, -0.9]],
        variances=[[0.09, 0.04], [0.02, 0.02], [0.05, 0.01]],
    )
