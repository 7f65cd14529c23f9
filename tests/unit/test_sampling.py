"""Samplers against the exact noise predictor of a Gaussian mixture (``diffusion_core.toy``).

Two kinds of checks:

- exact identities (float64, tolerances at rounding level): DDIM with eta=1 *is* ancestral sampling
  with the posterior variance, first-order DPM-Solver++ *is* DDIM, a learned variance at v=+-1 *is*
  the fixed variances, a point mass is followed exactly, classifier-free guidance at s=0/1 *is* the
  unconditional/conditional model, classifier guidance at scale 1 with the exact classifier *is*
  the conditional model for the ODE samplers;
- distribution accuracy: sliced W1 distance of N=20000 samples to an independent true sample,
  compared with the noise floor (the same distance between two true samples, mean of 8 pairs).
  Factors were set from measurements over seeds (``benchmarks/sampler_accuracy.py``), see
  ``ACCURACY`` below; each wrong coefficient we tried fails them by a wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.sampling import (
    METHODS,
    classifier_free_guidance,
    classifier_grad,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmsolver_pp,
    sample_unipc,
    timesteps_for,
)
from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import (
    NULL_LABEL,
    GaussianMixture,
    exact_classifier,
    exact_classifier_grad,
    exact_eps_model,
    example_mixture_2d,
    sliced_wasserstein,
)

N = 20_000
SCHEDULE = NoiseSchedule.linear(1000)
MIXTURE = example_mixture_2d()
MODEL = exact_eps_model(SCHEDULE, MIXTURE)

# (method, steps): allowed multiple of the noise floor. Measured (6 seeds, 3 for ddpm) as max
# distance / mean floor: ddpm-1000 1.12, ddpm-250 2.13, ddim-50 2.47, dpmsolver++-20 1.56; the
# floor itself ranges 0.64-1.73x its mean over 16 pairs (mean + 3 std = 2.1x). Deterministic
# samplers vary little across seeds (their error is bias), so their factor is ~1.4x their worst.
ACCURACY = {
    ("ddpm", 1000): 2.0,
    ("ddpm", 250): 3.0,
    ("ddim", 50): 3.5,
    ("dpmsolver++", 20): 2.5,
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distance(x: torch.Tensor, seed: int, mixture: GaussianMixture = MIXTURE, y=None) -> float:
    """Sliced W1 from samples x to a fresh true sample of the same size."""
    truth = mixture.sample(x.shape[0], _gen(10_000 + seed), y=y)
    return float(sliced_wasserstein(x, truth, p=1))


@pytest.fixture(scope="module")
def noise_floor() -> float:
    pairs = [
        sliced_wasserstein(MIXTURE.sample(N, _gen(s)), MIXTURE.sample(N, _gen(100 + s)), p=1)
        for s in range(8)
    ]
    return float(torch.stack(pairs).mean())


def _delta_model(x0: torch.Tensor):
    """The exact predictor for data that is a single point x0: eps = (z - sqrt(ab) x0)/sqrt(1-ab)."""

    def model(z_t, t):
        return SCHEDULE.predict_eps_from_x(z_t, t, x0.expand_as(z_t))

    return model


# --------------------------------------------------------------------- step selection
@pytest.mark.parametrize(
    "spacing", ["uniform", "logsnr", "logsnr_window", "karras", "trailing", "leading"]
)
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 999, 1000])
def test_timesteps_for(spacing, steps):
    ts = timesteps_for(steps, SCHEDULE, spacing)
    assert ts.dtype == torch.long and ts.shape == (steps,)
    assert bool((ts[1:] > ts[:-1]).all()) and int(ts[0]) >= 0 and int(ts[-1]) <= 999
    if spacing != "leading":
        assert int(ts[-1]) == 999  # start from the noisiest step
    if spacing in ("uniform", "logsnr", "karras") and steps > 1:
        assert int(ts[0]) == 0
    if steps == 1000:
        assert torch.equal(ts, torch.arange(1000))


def test_timesteps_for_known_values():
    assert timesteps_for(5, 1000, "uniform").tolist() == [0, 250, 500, 749, 999]
    assert timesteps_for(4, 1000, "trailing").tolist() == [249, 499, 749, 999]
    assert timesteps_for(4, 1000, "leading").tolist() == [0, 250, 500, 750]
    lam = SCHEDULE.half_log_snr[timesteps_for(10, SCHEDULE, "logsnr")]
    gaps = lam[:-1] - lam[1:]  # evenly spaced in lambda up to integer rounding
    assert float(gaps.max() - gaps.min()) < 0.1 * float(gaps.mean())


# --------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("steps", [1000, 37])
def test_ddim_eta_one_is_ancestral_posterior_sampling(steps):
    """Song et al.: eta=1 gives sigma^2 = the posterior variance of the (respaced) process."""
    z = torch.randn(512, 2, generator=_gen(0), dtype=torch.float64)
    a = sample_ddpm(MODEL, z, SCHEDULE, steps, variance="posterior", generator=_gen(1))
    b = sample_ddim(MODEL, z, SCHEDULE, steps, eta=1.0, generator=_gen(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_first_order_dpmsolver_is_ddim(spacing):
    z = torch.randn(512, 2, generator=_gen(2), dtype=torch.float64)
    a = sample_dpmsolver_pp(MODEL, z, SCHEDULE, 15, spacing=spacing, order=1)
    b = sample_ddim(MODEL, z, SCHEDULE, 15, spacing=spacing, eta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("v, variance", [(1.0, "beta"), (-1.0, "posterior")])
def test_learned_variance_endpoints_are_the_fixed_variances(v, variance):
    """Nichol & Dhariwal: v=+1 -> beta_t, v=-1 -> (clipped) posterior variance."""

    def learned(z_t, t):
        eps = MODEL(z_t, t)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    z = torch.randn(256, 2, generator=_gen(3), dtype=torch.float64)
    a = sample_ddpm(learned, z, SCHEDULE, 40, variance="learned", generator=_gen(4))
    b = sample_ddpm(MODEL, z, SCHEDULE, 40, variance=variance, generator=_gen(4))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # A learned-variance model works unchanged with the ODE samplers (v is dropped).
    torch.testing.assert_close(
        sample_ddim(learned, z, SCHEDULE, 10), sample_ddim(MODEL, z, SCHEDULE, 10)
    )


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmsolver_pp, sample_unipc])
def test_point_mass_follows_the_diffusion_kernel_exactly(sampler):
    """For x = x0, x_hat = x0 at every step, so the ODE path is sqrt(ab) x0 + sqrt(1-ab) eps_T."""
    x0 = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    z = torch.randn(64, 2, generator=_gen(5), dtype=torch.float64)
    ts = timesteps_for(12, SCHEDULE, "uniform")
    x, traj = sampler(_delta_model(x0), z, SCHEDULE, timesteps=ts, return_trajectory=True)
    ab = SCHEDULE.alpha_bar[ts].flip(0)  # trajectory order: t = ts[-1] first
    eps_T = (z - ab[0].sqrt() * x0) / (1 - ab[0]).sqrt()
    expected = ab.sqrt()[:, None, None] * x0 + (1 - ab).sqrt()[:, None, None] * eps_T
    torch.testing.assert_close(traj[:-1], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x, x0.expand_as(x), rtol=0, atol=1e-12)


def test_dpmsolver_second_order_step_matches_lu_et_al():
    """Two steps written out from Lu et al. (2022), Algorithm 2, on very unequal lambda steps.

    The model's data prediction depends on t only, so the expected states are closed-form; with
    r = h_prev / h far from 1 this pins the multistep coefficients (swapping r <-> 1/r, which
    equal-lambda steps cannot detect, fails here).
    """
    ts = [0, 40, 150, 999]

    def x_of(t):
        return torch.sin(t.double() / 97.0)[:, None] * torch.tensor(
            [[1.0, -0.5]], dtype=torch.float64
        )

    def model(z_t, t):
        return SCHEDULE.predict_eps_from_x(z_t, t, x_of(t))

    z = torch.randn(4, 2, generator=_gen(21), dtype=torch.float64)
    _, traj = sample_dpmsolver_pp(model, z, SCHEDULE, timesteps=ts, return_trajectory=True)
    ab = SCHEDULE.alpha_bar
    alpha, sigma, lam = ab.sqrt(), (1 - ab).sqrt(), SCHEDULE.half_log_snr
    x = {t: x_of(torch.full((4,), t)) for t in ts}
    h1 = float(lam[150] - lam[999])
    z1 = sigma[150] / sigma[999] * z - alpha[150] * math.expm1(-h1) * x[999]
    h2 = float(lam[40] - lam[150])
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * x[150] - 1 / (2 * r) * x[999]
    z2 = sigma[40] / sigma[150] * z1 - alpha[40] * math.expm1(-h2) * d
    torch.testing.assert_close(traj[1], z1, rtol=0, atol=1e-10)
    torch.testing.assert_close(traj[2], z2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_point_mass_ends_on_the_point(variance):
    x0 = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    z = torch.randn(64, 2, generator=_gen(6), dtype=torch.float64)
    x = sample_ddpm(_delta_model(x0), z, SCHEDULE, 30, variance=variance, generator=_gen(7))
    torch.testing.assert_close(x, x0.expand_as(x), rtol=0, atol=1e-12)


def test_trajectory_and_callback():
    seen = []
    z = torch.randn(16, 2, generator=_gen(8), dtype=torch.float64)
    x, traj = sample_ddim(
        MODEL, z, SCHEDULE, 8, return_trajectory=True, callback=lambda info: seen.append(info)
    )
    assert traj.shape == (9, 16, 2)
    assert torch.equal(traj[0], z) and torch.equal(traj[-1], x)
    assert [info["i"] for info in seen] == list(range(8))
    assert [info["t"] for info in seen] == timesteps_for(8, SCHEDULE).flip(0).tolist()
    assert torch.equal(seen[-1]["z"], x)


# --------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("method, steps", list(ACCURACY))
def test_matches_data_distribution(method, steps, noise_floor):
    x = sample(
        MODEL, (N, 2), SCHEDULE, method=method, steps=steps, generator=_gen(11), dtype=torch.float64
    )
    distance = _distance(x, seed=11)
    assert distance <= ACCURACY[method, steps] * noise_floor, (
        f"{method} with {steps} steps: sliced W1 {distance:.4f} vs noise floor {noise_floor:.4f}"
    )


def test_dpmsolver_beats_ddim_at_ten_steps():
    z = torch.randn(N, 2, generator=_gen(12), dtype=torch.float64)
    dpm = _distance(sample_dpmsolver_pp(MODEL, z, SCHEDULE, 10), seed=12)
    for spacing in ("uniform", "logsnr"):  # DDIM's default, and DPM-Solver++'s
        ddim = _distance(sample_ddim(MODEL, z, SCHEDULE, 10, spacing=spacing), seed=12)
        assert dpm < 0.7 * ddim, f"dpmsolver++ {dpm:.4f} vs ddim ({spacing}) {ddim:.4f}"


def _gaussian_error(sampler, steps: int, m: float, s: float, **kwargs) -> float:
    """1-D data N(m, s^2): an ODE sampler is an affine map z_T -> A z_T + b, so its output law
    N(b, A^2) is known exactly; returns its W2 distance to the data, free of Monte Carlo noise."""
    model = exact_eps_model(SCHEDULE, GaussianMixture([1.0], [m], [s * s]))
    x = sampler(model, torch.tensor([[0.0], [1.0]], dtype=torch.float64), SCHEDULE, steps, **kwargs)
    b, a = float(x[0]), float(x[1] - x[0])
    return math.hypot(b - m, abs(a) - s)


def test_convergence_orders_on_gaussian_data():
    """DPM-Solver++(2M) is second order, DDIM first order (measured orders 1.97 and 0.99).

    For N(0, 1) data q(z_t) = N(0, 1) at every t, so z_T ~ N(0, I) is exact and the only error is
    the discretisation; the exact ODE flow is the identity.
    """
    dpm = [_gaussian_error(sample_dpmsolver_pp, n, 0.0, 1.0) for n in (20, 40)]
    ddim = [_gaussian_error(sample_ddim, n, 0.0, 1.0, spacing="logsnr") for n in (20, 40)]
    assert math.log2(dpm[0] / dpm[1]) > 1.8, dpm
    assert 0.8 < math.log2(ddim[0] / ddim[1]) < 1.2, ddim
    # Narrow data (std 0.2) at 10 steps: measured 3.7e-3 against 4.7e-2.
    narrow_dpm = _gaussian_error(sample_dpmsolver_pp, 10, 0.5, 0.2)
    narrow_ddim = _gaussian_error(sample_ddim, 10, 0.5, 0.2, spacing="logsnr")
    assert narrow_dpm < narrow_ddim / 5, (narrow_dpm, narrow_ddim)
    assert _gaussian_error(sample_ddim, 1000, 0.5, 0.2) < 2e-3


# --------------------------------------------------------------------- classifier-free guidance
class _Counting:
    """Wraps a model and records the batch sizes and kwargs of its calls."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, z_t, t, **kwargs):
        self.calls.append((z_t.shape[0], kwargs))
        return self.model(z_t, t, **kwargs)


def test_cfg_is_one_batched_call_and_interpolates_exactly():
    counting = _Counting(MODEL)
    z = torch.randn(32, 2, generator=_gen(13))
    t = torch.full((32,), 400)
    y = torch.full((32,), 2)
    for scale in (0.0, 1.0, 3.0):
        counting.calls.clear()
        out = classifier_free_guidance(counting, scale, {"y": NULL_LABEL})(z, t, y=y)
        assert len(counting.calls) == 1
        batch, kwargs = counting.calls[0]
        assert batch == 64
        assert kwargs["y"].tolist() == [2] * 32 + [NULL_LABEL] * 32
        both = MODEL(torch.cat([z, z]), torch.cat([t, t]), y=kwargs["y"])
        eps_c, eps_u = both[:32], both[32:]
        if scale == 0.0:
            assert torch.equal(out, eps_u)
        elif scale == 1.0:
            assert torch.equal(out, eps_c)
        else:
            torch.testing.assert_close(out, eps_u + scale * (eps_c - eps_u))
    # ... and the batched halves are the separate unconditional / conditional evaluations.
    torch.testing.assert_close(eps_u, MODEL(z, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_c, MODEL(z, t, y=2), rtol=0, atol=1e-6)


def test_cfg_kwargs_concatenation_rules():
    def model(z_t, t, y, low_res, flag):
        assert flag == "keep"
        assert torch.equal(low_res[:4], low_res[4:])  # un-nulled tensors repeat in both halves
        return z_t * 0 + y[:, None].float()

    low = torch.randn(4, 2)
    guided = classifier_free_guidance(model, 1.0, {"y": torch.tensor([-1])})  # batch-1 null
    out = guided(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), y=3, low_res=low, flag="keep")
    assert torch.equal(out, torch.full((4, 2), 3.0))
    with pytest.raises(ValueError, match="no conditional value"):
        classifier_free_guidance(MODEL, 2.0, {"y": -1})(torch.zeros(4, 2), torch.zeros(4).long())
    with pytest.raises(ValueError, match="batch size"):
        guided(
            torch.zeros(4, 2),
            torch.zeros(4).long(),
            y=torch.ones(3).long(),
            low_res=low,
            flag="keep",
        )
    with pytest.raises(ValueError, match="null_kwargs"):
        classifier_free_guidance(MODEL, 2.0, {})


def test_cfg_learned_variance_guides_only_the_noise():
    def learned(z_t, t, y):
        eps = MODEL(z_t, t, y=y)
        return torch.cat([eps, (y[:, None] == NULL_LABEL).to(eps.dtype).expand_as(eps)], dim=1)

    z = torch.randn(8, 2, generator=_gen(14), dtype=torch.float64)
    t = torch.full((8,), 300)
    out = classifier_free_guidance(learned, 2.0, {"y": NULL_LABEL})(z, t, y=1)
    eps_u, eps_c = MODEL(z, t), MODEL(z, t, y=1)
    torch.testing.assert_close(out[:, :2], eps_u + 2.0 * (eps_c - eps_u))
    assert torch.equal(out[:, 2:], torch.zeros(8, 2, dtype=torch.float64))  # v of the cond branch


def test_cfg_scale_one_samples_the_conditional_model():
    guided = classifier_free_guidance(MODEL, 1.0, {"y": NULL_LABEL})
    kw = dict(method="ddpm", steps=50, dtype=torch.float64)
    a = sample(guided, (256, 2), SCHEDULE, generator=_gen(15), y=1, **kw)
    b = sample(MODEL, (256, 2), SCHEDULE, generator=_gen(15), y=1, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# --------------------------------------------------------------------- classifier guidance
def test_classifier_grad_by_autograd_matches_closed_form():
    z = torch.randn(64, 2, generator=_gen(16), dtype=torch.float64)
    grad_fn = classifier_grad(exact_classifier(SCHEDULE, MIXTURE), 2)
    for step in (10, 300, 900):
        t = torch.full((64,), step)
        expected = MIXTURE.classifier_log_prob_grad(z, t, SCHEDULE, 2)
        torch.testing.assert_close(grad_fn(z, t), expected)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmsolver_pp, sample_unipc])
def test_classifier_guidance_at_scale_one_is_the_conditional_model(sampler):
    """Noise form: eps - sqrt(1-ab) grad log p(y|z) = -sqrt(1-ab) grad log q(z|y) = eps*(z|y)."""
    z = torch.randn(512, 2, generator=_gen(17), dtype=torch.float64)
    guidance = exact_classifier_grad(SCHEDULE, MIXTURE, 2)
    a = sampler(MODEL, z, SCHEDULE, 20, grad_log_prob=guidance, classifier_scale=1.0)
    b = sampler(MODEL, z, SCHEDULE, 20, y=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_ancestral_classifier_guidance_pulls_samples_to_the_class():
    """eq. 18.40: the fraction of samples of class 2 (prior weight 0.2) grows with the scale."""
    n, target = 4000, 2
    guidance = exact_classifier_grad(SCHEDULE, MIXTURE, target)
    fractions = []
    for scale in (0.0, 0.3, 1.0, 3.0):
        x = sample(
            MODEL,
            (n, 2),
            SCHEDULE,
            method="ddpm",
            steps=200,
            generator=_gen(18),
            dtype=torch.float64,
            grad_log_prob=guidance,
            classifier_scale=scale,
        )
        label = MIXTURE.class_log_posterior(x).argmax(dim=1)
        fractions.append(float((label == target).double().mean()))
    assert abs(fractions[0] - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)
    assert fractions[0] < fractions[1] < fractions[2] <= fractions[3]
    assert fractions[2] > 0.97  # scale 1 with the exact classifier ~ samples q(x | y)


# --------------------------------------------------------------------- determinism and errors
@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.5), ("dpmsolver++", 0.0)])
def test_deterministic_given_a_generator(method, eta):
    kw = dict(method=method, steps=20, eta=eta)
    a = sample(MODEL, (128, 2), SCHEDULE, generator=_gen(19), **kw)
    b = sample(MODEL, (128, 2), SCHEDULE, generator=_gen(19), **kw)
    c = sample(MODEL, (128, 2), SCHEDULE, generator=_gen(20), **kw)
    assert a.dtype == torch.float32 and a.shape == (128, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_model_receives_long_timesteps_and_kwargs():
    seen = []

    def model(z_t, t, y=None):
        seen.append((t.dtype, tuple(t.shape), y))
        return MODEL(z_t, t, y=y)

    sample(model, (8, 2), SCHEDULE, method="ddim", steps=3, y=1)
    assert seen == [(torch.long, (8,), 1)] * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(method="euler"),
            r"unknown sampling method 'euler'.*'ddpm', 'ddim', 'dpmsolver\+\+', 'unipc'",
        ),
        (dict(steps=1001), r"steps must lie in \[1, T=1000\], got 1001"),
        (dict(steps=0), r"steps must lie in \[1, T=1000\]"),
        (dict(steps=2.5), "steps must be an int"),
        (dict(method="ddim", eta=1.5), r"eta must lie in \[0, 1\]"),
        (dict(method="ddim", eta=-0.1), r"eta must lie in \[0, 1\]"),
        (dict(eta=0.5), "eta=0.5 only applies to method='ddim'"),
        (dict(variance="beta", method="ddim"), "only applies to method='ddpm'"),
        (dict(variance="fixed"), "unknown variance 'fixed'"),
        (dict(variance="learned"), "variance='learned' needs a model"),
        (dict(spacing="quadratic"), "unknown spacing 'quadratic'"),
        (dict(classifier_scale=2.0), "classifier_scale=2.0 has no effect"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(method="ddpm", steps=10) | kwargs
    with pytest.raises(ValueError, match=match):
        sample(MODEL, (4, 2), SCHEDULE, **args)


def test_bad_model_output_and_timesteps():
    with pytest.raises(ValueError, match="model output has shape"):
        sample(lambda z, t: z[:, :1], (4, 2), SCHEDULE, method="ddim", steps=5)
    z = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        sample_ddim(MODEL, z, SCHEDULE, timesteps=[0, 500, 400])
    with pytest.raises(ValueError, match="either steps or timesteps"):
        sample_ddim(MODEL, z, SCHEDULE, 5, timesteps=[0, 500])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        sample_dpmsolver_pp(MODEL, z, SCHEDULE, 5, order=4)
    assert set(METHODS) == {"ddpm", "ddim", "dpmsolver++", "unipc"}
