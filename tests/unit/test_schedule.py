"""NoiseSchedule against the chapter's closed forms (eqs. 18.1, 18.7-18.8, 18.15).

Monte Carlo checks use a fixed seed and a tolerance of 5 standard errors of the estimate (a
two-sided miss of a correct implementation has probability < 1e-6); grid integrals are compared
to 1e-6 relative, far above the quadrature error of a Gaussian sampled at > 1000 points per std.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from diffusion_core.schedule import NoiseSchedule, ScheduleConfig


def test_linear_endpoints_and_T_scaling():
    s = NoiseSchedule.linear(1000)
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    s100 = NoiseSchedule.linear(100)  # scaled by 1000/T
    assert s100.betas[0].item() == pytest.approx(1e-3, rel=1e-12)
    assert s100.betas[-1].item() == pytest.approx(0.2, rel=1e-12)
    assert bool((s.betas[1:] > s.betas[:-1]).all())


def test_cosine_matches_its_formula():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2
    expected = f[1:] / f[0]
    # The last beta is clipped to 0.999 (f(T) = 0 would give beta_T = 1); every other step is exact.
    torch.testing.assert_close(s.alpha_bar[:-1], expected[:-1], rtol=1e-10, atol=1e-14)
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())


def test_constant_schedule_and_dtypes():
    s = NoiseSchedule.constant(0.05, 20)
    assert bool((s.betas == 0.05).all())
    torch.testing.assert_close(s.alpha_bar, 0.95 ** torch.arange(1, 21, dtype=torch.float64))
    for name in ("betas", "alpha_bar", "alpha_bar_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef_z", "posterior_mean_coef_x"):
        value = getattr(s, name)
        assert value.dtype == torch.float64, name
        assert value.shape == (20,), name


@pytest.mark.parametrize("make", [lambda: NoiseSchedule.linear(50), lambda: NoiseSchedule.cosine(50)])
def test_index_zero_is_the_chapters_first_step(make):
    s = make()
    assert s.alpha_bar[0].item() == pytest.approx(1.0 - s.betas[0].item(), rel=1e-14)
    assert s.alpha_bar_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0


@pytest.mark.parametrize("t", [0, 9, 59])
def test_iterating_eq_18_1_gives_the_kernel_eq_18_8(t):
    """t+1 steps of z_s = sqrt(1-beta_s) z_{s-1} + sqrt(beta_s) eps_s from x: Norm[sqrt(ab) x, 1-ab]."""
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(t)
    n = 50_000
    x = torch.full((n,), 0.7, dtype=torch.float64)
    z = x
    for step in range(t + 1):
        z = s.q_step(z, step, torch.randn(n, generator=g, dtype=torch.float64))
    mean, var = s.q_mean_variance(x[:1], t)
    mean, var = mean.item(), var.item()
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt(2.0 / (n - 1))
    assert abs(z.mean().item() - mean) < 5 * se_mean
    assert abs(z.var().item() - var) < 5 * se_var


def _bayes_posterior_on_grid(s: NoiseSchedule, t: int, x: float, z_t: float) -> tuple[float, float]:
    """Mean and variance of q(z_t|z_{t-1}) q(z_{t-1}|x) / normaliser by integration on a grid."""
    beta = s.betas[t].item()
    ab_prev = s.alpha_bar_prev[t].item()
    # Centre the grid on the peak of the likelihood term and span 12 of its std on either side;
    # the posterior is narrower than that term and lies between it and the prior.
    centre = z_t / math.sqrt(1 - beta)
    width = 12 * math.sqrt(beta / (1 - beta))
    grid = torch.linspace(centre - width, centre + width, 400_001, dtype=torch.float64)
    log_lik = -0.5 * (z_t - math.sqrt(1 - beta) * grid) ** 2 / beta  # q(z_t|z_{t-1}), eq. 18.2
    log_prior = -0.5 * (grid - math.sqrt(ab_prev) * x) ** 2 / (1 - ab_prev)  # q(z_{t-1}|x), 18.8
    w = torch.softmax(log_lik + log_prior, dim=0)  # normalised weights of a uniform grid
    mean = (w * grid).sum().item()
    var = (w * (grid - mean) ** 2).sum().item()
    return mean, var


@pytest.mark.parametrize("kind,t", [("linear", 1), ("linear", 5), ("linear", 200), ("linear", 999),
                                    ("constant", 3), ("constant", 30)])
def test_posterior_eq_18_15_is_bayes_rule(kind, t):
    s = NoiseSchedule.linear(1000) if kind == "linear" else NoiseSchedule.constant(0.05, 40)
    x = -0.8
    z_t = math.sqrt(s.alpha_bar[t].item()) * x + math.sqrt(1 - s.alpha_bar[t].item()) * 0.6
    mean, var = s.posterior(torch.tensor([z_t], dtype=torch.float64),
                            torch.tensor([x], dtype=torch.float64), t)
    grid_mean, grid_var = _bayes_posterior_on_grid(s, t, x, z_t)
    assert mean.item() == pytest.approx(grid_mean, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(grid_var, rel=1e-6)


def test_posterior_at_first_step_is_the_data():
    s = NoiseSchedule.linear(100)
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    mean, var = s.posterior(s.q_sample(x, 0), x, 0)
    torch.testing.assert_close(mean, x)
    assert bool((var == 0).all())


@pytest.mark.parametrize("t", [0, 10, 999])
def test_q_sample_round_trips(t):
    s = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, generator=g, dtype=torch.float64)
    tt = torch.full((8,), t)
    z = s.q_sample(x, tt, eps)
    torch.testing.assert_close(s.predict_x_from_eps(z, tt, eps), x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.predict_eps_from_x(z, tt, x), eps, rtol=1e-9, atol=1e-9)
    v = s.v_target(x, tt, eps)
    torch.testing.assert_close(s.eps_from_v(z, tt, v), eps)
    torch.testing.assert_close(s.x_from_v(z, tt, v), x)


def test_reverse_log_variance():
    s = NoiseSchedule.linear(10)
    torch.testing.assert_close(s.reverse_log_variance("beta"), torch.log(s.betas))
    post = s.reverse_log_variance("posterior")
    torch.testing.assert_close(post[1:], torch.log(s.posterior_variance[1:]))
    assert post[0] == post[1]  # clipped: the first posterior variance is 0
    with pytest.raises(ValueError, match="'posterior' or 'beta'"):
        s.reverse_log_variance("learned")  # type: ignore[arg-type]


def test_respace_keeps_alpha_bar():
    s = NoiseSchedule.linear(1000)
    steps = [0, 9, 99, 499, 999]
    r = s.respace(steps)
    assert r.T == len(steps)
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[steps], rtol=1e-12, atol=0)


@pytest.mark.parametrize("config", [ScheduleConfig(kind="linear", T=123),
                                    ScheduleConfig(kind="cosine", T=64),
                                    ScheduleConfig(kind="constant", T=7, beta=0.02)])
def test_config_round_trip(config):
    s = NoiseSchedule.from_config(config)
    again = NoiseSchedule.from_config(ScheduleConfig.model_validate_json(config.model_dump_json()))
    assert torch.equal(s.betas, again.betas)
    assert s.config == again.config


@pytest.mark.parametrize(
    "schedule",
    [
        NoiseSchedule.cosine(50, s=0.02),
        NoiseSchedule.cosine(50, max_beta=0.5),
        NoiseSchedule.linear(100).respace([0, 9, 49, 99]),
        NoiseSchedule.cosine(80, s=0.0).respace([0, 10, 20, 79]).respace([0, 2, 3]),
    ],
    ids=["cosine-offset", "cosine-max-beta", "respaced", "respaced-twice"],
)
def test_every_schedule_survives_save_and_load(schedule):
    """Defect: the config of a non-default cosine offset (or of a respaced schedule) described
    another schedule, so saving and loading it changed the betas."""
    assert schedule.config is not None
    again = NoiseSchedule.from_config(ScheduleConfig.model_validate_json(schedule.config.model_dump_json()))
    torch.testing.assert_close(again.betas, schedule.betas, rtol=0, atol=0)
    assert again.config == schedule.config


def test_clear_errors_on_bad_input():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match="non-empty"):
        NoiseSchedule(torch.tensor([]))
    with pytest.raises(ValidationError, match="needs beta"):
        ScheduleConfig(kind="constant", T=10)
    with pytest.raises(ValidationError, match="only used by kind='constant'"):
        ScheduleConfig(kind="linear", beta=0.1)
    with pytest.raises(ValidationError):
        ScheduleConfig(T=0)
    s = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="strictly increasing"):
        s.respace([3, 3, 5])
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        s.respace([0, 10])
