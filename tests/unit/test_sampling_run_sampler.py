"""``run_sampler``: the one public sampler from given noise, its method dispatch and its checks;
and the update rules of ``diffusion_core.sampling.steps`` against the chapter's identities."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.sampling import (
    DEFAULT_SPACING,
    run_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmsolver_pp,
    sample_unipc,
    timesteps_for,
)
from diffusion_core.sampling.steps import ddim_step, ddpm_step, dpmsolver_pp_step, predict_x
from diffusion_core.sampling.timesteps import respaced
from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import exact_eps_model, example_mixture_2d

SCHEDULE = NoiseSchedule.linear(1000)
MODEL = exact_eps_model(SCHEDULE, example_mixture_2d())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, 2, generator=_gen(seed), dtype=torch.float64)


def _learned(z_t, t):
    eps = MODEL(z_t, t)
    return torch.cat([eps, torch.tanh(z_t)], dim=1)


@pytest.mark.parametrize(
    "method, face, options",
    [
        ("ddpm", sample_ddpm, {}),
        ("ddpm", sample_ddpm, {"variance": "beta"}),
        ("ddim", sample_ddim, {"eta": 0.7}),
        ("dpmsolver++", sample_dpmsolver_pp, {"order": 1}),
        ("dpmsolver++", sample_dpmsolver_pp, {"clip_x": 1.0}),
        ("dpmsolver++", sample_dpmsolver_pp, {"order": 3}),
        ("unipc", sample_unipc, {}),
        ("unipc", sample_unipc, {"order": 3, "spacing": "logsnr"}),
    ],
)
def test_run_sampler_is_the_sample_functions(method, face, options):
    a = run_sampler(MODEL, _z(), SCHEDULE, method=method, steps=12, generator=_gen(1), **options)
    b = face(MODEL, _z(), SCHEDULE, 12, generator=_gen(1), **options)
    assert torch.equal(a, b)


def test_run_sampler_takes_what_a_cascade_stage_passes():
    """Learned variance for ddpm, clipping, a progress bar, model kwargs, a generator everywhere."""
    for method in ("ddpm", "ddim", "dpmsolver++", "unipc"):
        variance = "learned" if method == "ddpm" else "posterior"
        x = run_sampler(
            _learned, _z(), SCHEDULE, method=method, steps=4, variance=variance, clip_x=1.0,
            generator=_gen(2), progress=True,
        )  # fmt: skip
        assert x.shape == (64, 2) and x.abs().max() <= 1.0 + 1e-12
    seen = []

    def model(z_t, t, label):
        seen.append(label)
        return MODEL(z_t, t, y=label)

    run_sampler(model, _z(), SCHEDULE, method="ddim", steps=3, label=1)
    assert seen == [1, 1, 1]


def test_run_sampler_default_steps_and_spacing():
    a = run_sampler(MODEL, _z(), SCHEDULE, method="dpmsolver++", steps=10)
    ts = timesteps_for(10, SCHEDULE, DEFAULT_SPACING["dpmsolver++"])
    assert torch.equal(a, run_sampler(MODEL, _z(), SCHEDULE, method="dpmsolver++", timesteps=ts))
    # steps=None visits all T steps.
    calls = []
    run_sampler(lambda z, t: calls.append(1) or MODEL(z, t), _z(), SCHEDULE, method="ddim")
    assert len(calls) == SCHEDULE.T


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="euler"), r"unknown sampling method 'euler'; choose one of"),
        (dict(method="ddpm", eta=0.5), "eta=0.5 only applies to method='ddim', not method='ddpm'"),
        (dict(method="dpmsolver++", eta=0.5), "eta=0.5 only applies to method='ddim'"),
        (
            dict(method="ddim", variance="learned"),
            "variance='learned' only applies to method='ddpm'",
        ),
        (
            dict(method="ddim", order=1),
            "order=1 only applies to method='dpmsolver\\+\\+' or 'unipc'",
        ),
        (dict(method="dpmsolver++", order=4), "order must be 1, 2 or 3, got 4"),
        (dict(method="unipc", order=0), "order must be 1, 2 or 3, got 0"),
        (dict(method="ddim", spacing="karras", steps=5, timesteps=None), None),
        (dict(method="ddim", steps=0), r"steps must lie in \[1, T=1000\], got 0"),
        (dict(method="ddim", steps=4, timesteps=[0, 9]), "either steps or timesteps"),
        (dict(method="ddim", spacing="cubic"), "unknown spacing 'cubic'"),
        (dict(method="ddpm", classifier_scale=3.0), "classifier_scale=3.0 has no effect"),
    ],
)
def test_run_sampler_checks_its_arguments(kwargs, match):
    if match is None:  # a valid combination, for contrast
        run_sampler(MODEL, _z(), SCHEDULE, **({"steps": 5} | kwargs))
        return
    with pytest.raises(ValueError, match=match):
        run_sampler(MODEL, _z(), SCHEDULE, **({"steps": 5} | kwargs))


# --------------------------------------------------------------------- the update rules
@pytest.fixture(scope="module")
def visit():
    """A visit of index 5 of a 9-step respaced schedule: (schedule, i, z_t, eps, x_hat)."""
    ts, sub = respaced(SCHEDULE, 9, None, "uniform")
    i = 5
    z_t = _z(3)
    eps = MODEL(z_t, torch.full((64,), int(ts[i])))
    x_hat, eps = predict_x(sub, z_t, i, eps, None)
    return sub, i, z_t, eps, x_hat


def test_ddpm_mean_is_the_posterior_mean_at_the_predicted_data(visit):
    """f_t of eq. 18.35 is the mean of q(z_{t-1}|z_t, x) (eq. 18.15) at x = x_hat."""
    sub, i, z_t, eps, x_hat = visit
    mean, var = ddpm_step(sub, i, z_t, eps)
    post_mean, post_var = sub.posterior(z_t, x_hat, i)
    torch.testing.assert_close(mean, post_mean, rtol=0, atol=1e-12)
    assert float(var) == float(post_var[0, 0])
    assert float(ddpm_step(sub, i, z_t, eps, "beta").variance) == float(sub.betas[i])


def test_ddim_at_eta_one_is_the_ancestral_step(visit):
    sub, i, z_t, eps, x_hat = visit
    ddim_mean, ddim_var = ddim_step(sub, i, x_hat, eps, eta=1.0)
    ddpm_mean, ddpm_var = ddpm_step(sub, i, z_t, eps)
    torch.testing.assert_close(ddim_mean, ddpm_mean, rtol=0, atol=1e-12)
    assert abs(ddim_var - float(ddpm_var)) < 1e-15
    assert ddim_step(sub, i, x_hat, eps).variance == 0.0


def test_dpmsolver_first_order_step_is_ddim(visit):
    sub, i, z_t, eps, x_hat = visit
    mean, var = dpmsolver_pp_step(sub, i, z_t, x_hat, x_prev=None)
    torch.testing.assert_close(mean, ddim_step(sub, i, x_hat, eps).mean, rtol=0, atol=1e-12)
    assert var == 0.0
    assert torch.equal(dpmsolver_pp_step(sub, 0, z_t, x_hat, x_prev=x_hat).mean, x_hat)
    # order=1 ignores the previous data prediction; order=2 uses it.
    other = torch.zeros_like(x_hat)
    assert torch.equal(dpmsolver_pp_step(sub, i, z_t, x_hat, other, order=1).mean, mean)
    assert not torch.equal(dpmsolver_pp_step(sub, i, z_t, x_hat, other).mean, mean)
