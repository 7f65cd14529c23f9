"""The Gaussian-mixture toy: closed forms checked against autograd, integration and sampling."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import (
    NULL_LABEL,
    GaussianMixture,
    exact_classifier,
    exact_classifier_grad,
    exact_eps_model,
    example_mixture_2d,
    sliced_wasserstein,
    wasserstein_1d,
)

SCHEDULE = NoiseSchedule.linear(1000)


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture([0.3, 0.7], [-1.0, 0.8], [0.04, 0.25], labels=[0, 1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_validation():
    mix = GaussianMixture([1, 3], [[0.0, 1.0], [2.0, 0.0]], [0.5, 0.25])
    assert (mix.n_components, mix.dim, mix.n_classes) == (2, 2, 2)
    torch.testing.assert_close(mix.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(mix.variances[1], torch.tensor([0.25, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([1.0], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture([1.0, 1.0], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0, 1.0]] * 2)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        mix.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="labels must lie"):
        mix.eps_star(torch.zeros(4, 2), 10, SCHEDULE, y=5)


@pytest.mark.parametrize("t", [None, 0, 300, 999])
def test_density_integrates_to_one_1d(t):
    mix = _mixture_1d()
    grid = torch.linspace(-12, 12, 40001, dtype=torch.float64)[:, None]
    log_p = mix.log_prob(grid) if t is None else mix.marginal_log_prob(grid, t, SCHEDULE)
    assert float(torch.trapezoid(log_p.exp(), grid[:, 0])) == pytest.approx(1.0, abs=1e-9)


def test_marginal_is_the_diffused_mixture_and_matches_q_sample():
    """eq. 18.8 per component: q(z_t) has the mean and covariance of sampled q_sample(x, t)."""
    mix = example_mixture_2d()
    t = 400
    ab = float(SCHEDULE.alpha_bar[t])
    z = torch.randn(5, 2, dtype=torch.float64, generator=_gen(0))
    torch.testing.assert_close(
        mix.marginal_log_prob(z, t, SCHEDULE), mix.diffused(ab).log_prob(z), rtol=0, atol=1e-12
    )
    x = mix.sample(200_000, _gen(1))
    zt = SCHEDULE.q_sample(x, t, torch.randn(x.shape, dtype=torch.float64, generator=_gen(2)))
    mean = (mix.weights[:, None] * mix.means).sum(0) * math.sqrt(ab)
    assert torch.allclose(zt.mean(0), mean, atol=0.01)
    # Mixture covariance: sum_k w_k (v_k + m_k m_k^T) - m m^T, after diffusion.
    d = mix.diffused(ab)
    second = (
        d.weights[:, None, None]
        * (torch.diag_embed(d.variances) + d.means[:, :, None] * d.means[:, None, :])
    ).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert torch.allclose(torch.cov(zt.T), cov, atol=0.01)


def test_eps_star_is_minus_scaled_score_by_autograd():
    """eps* = -sqrt(1-alpha_bar) grad log q(z_t), with one step per row."""
    mix = example_mixture_2d()
    z = torch.randn(6, 2, dtype=torch.float64, generator=_gen(3)).requires_grad_(True)
    t = torch.tensor([0, 5, 100, 400, 800, 999])
    (grad,) = torch.autograd.grad(mix.marginal_log_prob(z, t, SCHEDULE).sum(), z)
    expected = -(1 - SCHEDULE.alpha_bar[t])[:, None].sqrt() * grad
    torch.testing.assert_close(mix.eps_star(z.detach(), t, SCHEDULE), expected)
    for y in range(3):  # the class-conditional predictor scores q(z_t | y)
        (grad_y,) = torch.autograd.grad(mix.marginal_log_prob(z, t, SCHEDULE, y=y).sum(), z)
        expected_y = -(1 - SCHEDULE.alpha_bar[t])[:, None].sqrt() * grad_y
        torch.testing.assert_close(mix.eps_star(z.detach(), t, SCHEDULE, y=y), expected_y)


def test_eps_star_is_the_regression_optimum():
    """eps* minimises E||g(z_t) - eps||^2 (eq. 18.39): its residual is orthogonal to eps* itself."""
    mix = example_mixture_2d()
    x = mix.sample(100_000, _gen(4))
    eps = torch.randn(x.shape, dtype=torch.float64, generator=_gen(5))
    t = 250
    pred = mix.eps_star(SCHEDULE.q_sample(x, t, eps), t, SCHEDULE)
    loss_star = (pred - eps).square().sum(1).mean()
    for factor in (0.9, 1.1):
        assert (factor * pred - eps).square().sum(1).mean() > loss_star
    assert float((pred * (eps - pred)).sum(1).mean()) == pytest.approx(0.0, abs=0.01)


def test_class_posterior_and_classifier_gradient():
    mix = GaussianMixture([0.2, 0.3, 0.5], [[-1, 0], [1, 0], [0, 1]], 0.1, labels=[0, 1, 1])
    z = torch.randn(8, 2, dtype=torch.float64, generator=_gen(6)).requires_grad_(True)
    t = 200
    log_post = mix.class_log_posterior(z, t, SCHEDULE)
    torch.testing.assert_close(log_post.exp().sum(1), torch.ones(8, dtype=torch.float64))
    (grad,) = torch.autograd.grad(log_post[:, 1].sum(), z)
    torch.testing.assert_close(mix.classifier_log_prob_grad(z.detach(), t, SCHEDULE, 1), grad)
    classifier = exact_classifier(SCHEDULE, mix)
    torch.testing.assert_close(classifier(z.detach(), torch.full((8,), t)), log_post.detach())
    grad_fn = exact_classifier_grad(SCHEDULE, mix, 1)
    torch.testing.assert_close(grad_fn(z.detach(), torch.full((8,), t)), grad)


def test_conditional_sampling_and_null_label():
    mix = GaussianMixture([0.2, 0.3, 0.5], [[-1, 0], [1, 0], [0, 1]], 0.1, labels=[0, 1, 1])
    _, k = mix.sample(4000, _gen(7), y=1, return_components=True)
    assert set(k.tolist()) == {1, 2}
    assert float((k == 1).double().mean()) == pytest.approx(0.3 / 0.8, abs=0.03)
    model = exact_eps_model(SCHEDULE, mix)
    z = torch.randn(4, 2, generator=_gen(8))
    t = torch.full((4,), 300)
    y = torch.tensor([0, NULL_LABEL, 1, NULL_LABEL])
    out = model(z, t, y=y)
    assert out.dtype == z.dtype and out.shape == z.shape
    torch.testing.assert_close(out[1], model(z, t)[1])
    torch.testing.assert_close(out[0], model(z, t, y=0)[0])


def test_wasserstein_1d_exact_values():
    a = torch.tensor([0.0, 1.0, 3.0])
    assert float(wasserstein_1d(a, a + 0.5, p=1)) == pytest.approx(0.5)
    assert float(wasserstein_1d(torch.tensor([0.0]), torch.tensor([0.0, 1.0]), p=1)) == 0.5
    # Unequal, non-multiple sizes: {0, 1} vs {0, 0.5, 1} -> W1 = 1/3 * 0.5 * ... integrated exactly.
    w = wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0]), p=1)
    assert float(w) == pytest.approx(1 / 6)
    w2 = wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0]), p=2)
    assert float(w2) == pytest.approx(math.sqrt(1 / 12))


def test_sliced_wasserstein_is_deterministic_and_sees_shifts():
    x = torch.randn(2000, 2, generator=_gen(9), dtype=torch.float64)
    assert float(sliced_wasserstein(x, x)) == 0.0
    assert float(sliced_wasserstein(x, x.flip(0))) == 0.0  # order does not matter
    shifted = x + torch.tensor([0.3, 0.0], dtype=torch.float64)
    # A shift c moves every projection by c.theta: SW1 = |c| mean|cos(theta)| = 0.3 * 2/pi.
    assert float(sliced_wasserstein(x, shifted, n_projections=512, p=1)) == pytest.approx(
        0.3 * 2 / math.pi, rel=1e-3
    )
