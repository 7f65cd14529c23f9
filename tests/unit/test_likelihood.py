"""The ELBO (eqs. 18.24-18.28, 18.47) against Monte Carlo and against exact Gaussian likelihoods.

Tolerances. Monte Carlo comparisons use 5 standard errors of the estimate (computed from the
samples themselves), with fixed seeds; closed-form identities use float64 and 1e-10 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.likelihood import (
    LOG2,
    discretized_gaussian_log_likelihood,
    elbo_terms,
    gaussian_log_likelihood,
    nats_to_bpd,
    nll_bpd,
    normal_kl,
    prior_bpd,
    vlb_term_bpd,
)
from diffusion_core.reverse import p_mean_variance
from diffusion_core.schedule import NoiseSchedule
from tests.unit._gaussian import GaussianData

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _within_se(samples: torch.Tensor, expected: float, k: float = 5.0) -> None:
    mean = samples.mean().item()
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(mean - expected) < k * se + 1e-12, f"{mean} vs {expected} (se {se})"


# --------------------------------------------------------------------------- Gaussian maths
def test_normal_kl_is_eq_18_47_for_diagonal_covariances():
    g = _gen(1)
    d = 5
    a, b = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    la, lb = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    A, B = torch.diag(la.exp()), torch.diag(lb.exp())
    Binv = torch.linalg.inv(B)
    full = 0.5 * (torch.trace(Binv @ A) - d + (a - b) @ Binv @ (a - b)
                  + torch.logdet(B) - torch.logdet(A))
    assert normal_kl(a, la, b, lb).sum().item() == pytest.approx(full.item(), rel=1e-10)
    assert normal_kl(a, la, a, la).abs().max().item() < 1e-15


def test_normal_kl_matches_monte_carlo():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(1.7)
    w = m1 + math.sqrt(0.5) * torch.randn(400_000, generator=_gen(2), dtype=F64)
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    log_ratio = gaussian_log_likelihood(w, t(m1), t(lv1)) - gaussian_log_likelihood(w, t(m2), t(lv2))
    _within_se(log_ratio, normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item())


def test_gaussian_log_likelihood_is_the_normal_density():
    x = torch.linspace(-3, 3, 13, dtype=F64)
    mean, logvar = torch.tensor(0.4, dtype=F64), torch.tensor(-0.7, dtype=F64)
    expected = torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, logvar), expected)


# --------------------------------------------------------------------------- discretised decoder
BINS = torch.linspace(-1.0, 1.0, 256, dtype=F64)  # bin centres of 8-bit data scaled to [-1, 1]


@pytest.mark.parametrize("mean,std", [(0.0, 0.1), (0.37, 1e-3), (-0.99, 0.02), (1.0, 0.5),
                                      (3.0, 0.3), (-0.5, 1e-5), (0.2, 30.0)])
def test_discretized_decoder_sums_to_one_over_256_bins(mean, std):
    logvar = torch.tensor(2 * math.log(std), dtype=F64)
    logp = discretized_gaussian_log_likelihood(BINS, torch.tensor(mean, dtype=F64), logvar)
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_decoder_bin_masses():
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    mean, std = 0.1, 0.05
    logvar = torch.tensor(2 * math.log(std), dtype=F64)
    logp = discretized_gaussian_log_likelihood(BINS, torch.tensor(mean, dtype=F64), logvar)
    k = 140  # an interior bin
    lo, hi = BINS[k].item() - 1 / 255, BINS[k].item() + 1 / 255
    assert logp[k].exp().item() == pytest.approx(phi((hi - mean) / std) - phi((lo - mean) / std),
                                                 rel=1e-9)
    assert logp[0].exp().item() == pytest.approx(phi((-1 + 1 / 255 - mean) / std), rel=1e-9)
    assert logp[-1].exp().item() == pytest.approx(1 - phi((1 - 1 / 255 - mean) / std), rel=1e-9)
    # Far in the right tail the difference of CDFs is computed without cancellation.
    tail = discretized_gaussian_log_likelihood(BINS[200:201], torch.tensor(0.0, dtype=F64),
                                               torch.tensor(2 * math.log(0.1), dtype=F64))
    lo, hi = (BINS[200].item() - 1 / 255) / 0.1, (BINS[200].item() + 1 / 255) / 0.1
    exact = math.log(0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2))))
    assert tail.item() == pytest.approx(exact, rel=1e-9)


# --------------------------------------------------------------------------- ELBO terms
DATA = GaussianData([0.3, -0.5, 0.1], [0.5, 0.8, 0.3])


def _wrong_model(z_t, t):
    """A deliberately imperfect eps predictor, so the KL terms are far from their minimum."""
    return 0.5 * z_t + 0.2


@pytest.mark.parametrize("t", [1, 10, 250, 999])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_kl_term_matches_monte_carlo(t, exact, variance):
    """L_t = KL(q(z_{t-1}|z_t,x) || p(z_{t-1}|z_t)) = E_q[log q - log p] for sampled z_{t-1}."""
    s = NoiseSchedule.linear(1000)
    g = _gen(t)
    x = DATA.sample(1, g)
    tt = torch.tensor([t])
    z_t = s.q_sample(x, tt, torch.randn(x.shape, generator=g, dtype=F64))
    model = DATA.eps_model(s) if exact else _wrong_model
    step = p_mean_variance(model(z_t, tt), z_t, tt, s, variance=variance)
    term_nats = vlb_term_bpd(x, z_t, tt, s, step.mean, step.log_variance).item() * DATA.D * LOG2

    q_mean, q_var = s.posterior(z_t, x, tt)
    n = 200_000
    z_prev = q_mean + q_var.sqrt() * torch.randn(n, DATA.D, generator=g, dtype=F64)
    log_q = gaussian_log_likelihood(z_prev, q_mean, q_var.log()).sum(1)
    log_p = gaussian_log_likelihood(z_prev, step.mean, step.log_variance).sum(1)
    _within_se(log_q - log_p, term_nats)


def test_prior_term_matches_monte_carlo():
    s = NoiseSchedule.linear(50)  # short, so q(z_T|x) is visibly different from Norm[0, I]
    x = DATA.sample(1, _gen(3)) * 4
    mean, var = s.q_mean_variance(x, s.T - 1)
    w = mean + var.sqrt() * torch.randn(300_000, DATA.D, generator=_gen(4), dtype=F64)
    zero = torch.zeros((), dtype=F64)
    log_ratio = (gaussian_log_likelihood(w, mean, var.log()) - gaussian_log_likelihood(w, zero, zero)).sum(1)
    _within_se(log_ratio, prior_bpd(x, s).item() * DATA.D * LOG2)


def test_decoder_term_at_t0_is_negative_log_likelihood():
    s = NoiseSchedule.linear(100)
    x = DATA.sample(4, _gen(5))
    t = torch.zeros(4, dtype=torch.long)
    z = s.q_sample(x, t, torch.randn(x.shape, generator=_gen(6), dtype=F64))
    mean, logvar = 0.9 * z, torch.full_like(z, -3.0)
    term = vlb_term_bpd(x, z, t, s, mean, logvar, decoder="gaussian")
    expected = -gaussian_log_likelihood(x, mean, logvar).mean(1) / LOG2
    torch.testing.assert_close(term, expected)


def test_bits_per_dim_of_a_one_step_model():
    """T = 1: -ELBO = -log Norm[x; f_1, beta] + KL(q(z_1|x) || Norm[0, I]), in nats / (D log 2).

    The model's eps estimate is chosen so that its data estimate f_1 is the constant c; the bound is
    then deterministic and is checked exactly.
    """
    beta = 0.3
    s = NoiseSchedule.constant(beta, 1)
    c = torch.tensor([0.2, -0.1, 0.4], dtype=F64)

    def model(z, t):  # f_1 = (z - sqrt(beta) g) / sqrt(1-beta) = c
        return (z - math.sqrt(1 - beta) * c) / math.sqrt(beta)

    x = torch.tensor([[0.5, 0.0, -1.2], [1.0, 2.0, 3.0]], dtype=F64)
    bpd = nll_bpd(model, x, s, variance="beta", decoder="gaussian", generator=_gen(0))
    decoder = -torch.distributions.Normal(c, math.sqrt(beta)).log_prob(x).sum(1)
    prior = (0.5 * (beta + (1 - beta) * x**2 - 1 - math.log(beta))).sum(1)
    expected = nats_to_bpd(decoder + prior, num_dims=3)
    torch.testing.assert_close(bpd, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected, (decoder + prior) / (3 * math.log(2)))


def test_elbo_terms_shapes_and_total():
    s = NoiseSchedule.linear(30)
    x = torch.randint(0, 256, (3, 2, 4, 4), generator=_gen(7)).to(F64) / 127.5 - 1
    out = elbo_terms(lambda z, t: 0.1 * z, x, s, steps_per_call=7, generator=_gen(8))
    assert out["terms_bpd"].shape == (3, 30) and out["mse"].shape == (3, 30)
    assert out["prior_bpd"].shape == (3,)
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["terms_bpd"].sum(1))
    assert bool((out["terms_bpd"][:, 1:] >= 0).all())  # KLs are non-negative
    assert bool((out["terms_bpd"][:, 0] >= 0).all())  # a probability mass: -log2 P >= 0


def test_discretized_decoder_rejects_unscaled_data():
    s = NoiseSchedule.linear(5)
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        elbo_terms(lambda z, t: z, torch.full((1, 3), 2.0, dtype=F64), s)


@pytest.mark.parametrize("v,fixed", [(1.0, "beta"), (-1.0, "posterior")])
def test_learned_variance_endpoints_are_the_fixed_variances(v, fixed):
    s = NoiseSchedule.linear(20)
    x = DATA.sample(16, _gen(9))
    eps = DATA.eps_model(s)

    def learned(z, t):
        return torch.cat([eps(z, t), torch.full_like(z, v)], dim=1)

    kw = {"decoder": "gaussian", "steps_per_call": 5}
    a = nll_bpd(learned, x, s, variance="learned", generator=_gen(1), **kw)
    b = nll_bpd(eps, x, s, variance=fixed, generator=_gen(1), **kw)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- exact Gaussian data
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_exact_model_elbo_matches_closed_form(variance):
    """Monte Carlo -ELBO of the exact eps predictor = its closed-form expectation (5 SE)."""
    s = NoiseSchedule.linear(20)
    x = DATA.sample(4000, _gen(10))
    out = elbo_terms(DATA.eps_model(s), x, s, variance=variance, decoder="gaussian",
                     steps_per_call=20, generator=_gen(11))
    closed = DATA.expected_neg_elbo_terms(s, variance)
    to_bpd = 1.0 / (DATA.D * LOG2)
    _within_se(out["total_bpd"], closed["total"].item() * to_bpd)
    for t in (0, 1, 5, 19):
        _within_se(out["terms_bpd"][:, t], closed["terms"][t].item() * to_bpd)


def test_bound_is_above_exact_nll_and_tightens_with_T():
    """For x ~ Norm[m, s^2] and the exact eps predictor, -ELBO >= -log Pr(x), the gap shrinking in T.

    Closed form (exact): the expected gap for T = 10, 100, 1000 with either fixed variance.
    Monte Carlo (library): with sigma^2 = posterior variance the gap is large enough to resolve
    T = 100 vs 1000 at 5 SE; with sigma^2 = beta it is consistent with >= 0.
    """
    nll = DATA.expected_nll()
    for variance in ("posterior", "beta"):
        gaps = [DATA.expected_neg_elbo_terms(NoiseSchedule.linear(T), variance)["total"].item() - nll
                for T in (10, 100, 1000)]
        assert 0 < gaps[2] < gaps[1] < gaps[0], (variance, gaps)

    g = _gen(12)
    x = DATA.sample(1000, g)
    exact_bpd = -DATA.log_prob(x) / (DATA.D * LOG2)
    mc = {}
    for T in (100, 1000):
        s = NoiseSchedule.linear(T)
        for variance in ("posterior", "beta"):
            bpd = nll_bpd(DATA.eps_model(s), x, s, variance=variance, decoder="gaussian",
                          steps_per_call=250, generator=g)
            gap = bpd - exact_bpd  # paired: the same x for both
            mc[T, variance] = (gap.mean().item(), gap.std().item() / math.sqrt(gap.numel()))
    for key, (gap, se) in mc.items():
        assert gap > -5 * se, (key, gap, se)
    (g100, se100), (g1000, se1000) = mc[100, "posterior"], mc[1000, "posterior"]
    assert g1000 > 5 * se1000
    assert g100 - g1000 > 5 * math.hypot(se100, se1000)
