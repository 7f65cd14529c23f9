"""The higher-order solvers (DPM-Solver++(3M), UniPC) and the step placements made for them.

- exactness: when the data prediction x(lambda) is a polynomial in lambda the diffusion ODE has a
  closed-form solution (the integral of e^lambda times a polynomial), and a solver of order p is
  exact for polynomials of degree p-1. One step of each rule, fed the exact state and history, is
  compared with that closed form: this pins every coefficient (a swapped r0/r1 or a wrong phi
  fails by orders of magnitude);
- identities: UniPC's predictor of order 2 *is* DPM-Solver++(2M);
- convergence order on Gaussian data (exact, no Monte Carlo);
- step placement: endpoints and spacing against independently computed values;
- the 10-call target: sliced W1 to the exact Gaussian mixture within a measured multiple of the
  noise floor, on the linear and the cosine schedule, with the model calls counted.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.sampling import (
    DEFAULT_SPACING,
    run_sampler,
    sample,
    sample_ddim,
    sample_dpmsolver_pp,
    sample_unipc,
    timesteps_for,
)
from diffusion_core.sampling.steps import dpmsolver_pp_step, unipc_update
from diffusion_core.sampling.timesteps import KARRAS_RHO, KARRAS_SIGMA_MAX, LOGSNR_WINDOW
from diffusion_core.schedule import NoiseSchedule
from diffusion_core.toy import (
    GaussianMixture,
    exact_eps_model,
    example_mixture_2d,
    sliced_wasserstein,
)

LINEAR = NoiseSchedule.linear(1000)
COSINE = NoiseSchedule.cosine(1000)
MIXTURE = example_mixture_2d()
N = 20_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------- closed-form ODE solution
A, B, C = (torch.tensor(v, dtype=torch.float64) for v in ([0.3, -0.7], [0.2, 0.5], [-0.05, 0.08]))


def _x_of(lam: float) -> torch.Tensor:
    """A data prediction quadratic in lambda, the same for every state."""
    return (A + B * lam + C * lam**2)[None]


def _primitive(lam: float) -> torch.Tensor:
    """int e^u (a + b u + c u^2) du = e^u (a + b (u - 1) + c (u^2 - 2u + 2))."""
    return math.exp(lam) * (A + B * (lam - 1) + C * (lam**2 - 2 * lam + 2))[None]


def _exact_states(schedule: NoiseSchedule, ts: list[int], z_T: torch.Tensor) -> dict:
    """z(lambda) = sigma/sigma_T z_T + sigma int_{lambda_T}^{lambda} e^u x(u) du at each index.

    The ODE of the data-prediction form, dz/dlambda = ... (Lu et al., 2022b, eq. 9), solved
    exactly for the quadratic x(lambda); ``ts`` are indices of ``schedule``, the last the start.
    """
    lam, sigma = schedule.half_log_snr, schedule.sqrt_one_minus_alpha_bar
    start = ts[-1]
    out = {}
    for t in ts:
        integral = _primitive(float(lam[t])) - _primitive(float(lam[start]))
        out[t] = float(sigma[t] / sigma[start]) * z_T + float(sigma[t]) * integral
    return out


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_3m_step_is_exact_for_quadratic_data_predictions(schedule):
    """DPM-Solver++(3M) integrates x(lambda) of degree 2 exactly, on unequal lambda steps."""
    ts = [40, 150, 420, 999]  # indices i-1, i, i+1, i+2 of a respacing: very unequal lambda gaps
    sub = schedule.respace(ts)
    z_T = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    exact = _exact_states(schedule, ts, z_T)
    lam = schedule.half_log_snr
    x = {t: _x_of(float(lam[t])) for t in ts}
    step = dpmsolver_pp_step(sub, 2, exact[420], x[420], x[999], order=3, x_prev2=None)
    second_order_error = float((step.mean - exact[150]).abs().max())
    step = dpmsolver_pp_step(sub, 1, exact[150], x[150], x[420], order=3, x_prev2=x[999])
    torch.testing.assert_close(step.mean, exact[40], rtol=0, atol=1e-9)
    assert second_order_error > 1e-4  # 2M (no x_prev2) is not exact here: the test can fail


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_unipc_predictor_3_and_corrector_2_are_exact_for_quadratics(schedule):
    """UniP-3 (two earlier predictions) and UniC-2 (one earlier + the new one) have order 3."""
    ts = [40, 150, 420, 999]
    sub = schedule.respace(ts)
    z_T = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    exact = _exact_states(schedule, ts, z_T)
    lam = schedule.half_log_snr
    x = {t: _x_of(float(lam[t])) for t in ts}
    predicted = unipc_update(sub, 1, exact[150], x[150], (x[420], x[999]))
    torch.testing.assert_close(predicted, exact[40], rtol=0, atol=1e-9)
    corrected = unipc_update(sub, 1, exact[150], x[150], (x[420],), x_new=x[40])
    torch.testing.assert_close(corrected, exact[40], rtol=0, atol=1e-9)
    lower = unipc_update(sub, 1, exact[150], x[150], (x[420],))  # UniP-2: order 2 only
    assert float((lower - exact[40]).abs().max()) > 1e-4


def test_unipc_predictor_2_is_dpmsolver_2m():
    sub = LINEAR.respace([3, 60, 300, 999])
    z, x0, x1 = (torch.randn(16, 2, generator=_gen(k), dtype=torch.float64) for k in range(3))
    for i in (1, 2):
        torch.testing.assert_close(
            unipc_update(sub, i, z, x0, (x1,)),
            dpmsolver_pp_step(sub, i, z, x0, x1, order=2).mean,
            rtol=0,
            atol=1e-13,
        )


# --------------------------------------------------------------------- convergence order
def _gaussian_error(sampler, steps: int, **kwargs) -> float:
    """N(0, 1) data: every q(z_t) is N(0, 1), so the exact ODE flow to step 0 is the identity and
    the last step's x_hat = E[x|z_0] = sqrt(alpha_bar_0) z_0. An ODE sampler is an affine map
    z_T -> a z_T + b: its distance to that exact answer, free of Monte Carlo noise."""
    model = exact_eps_model(LINEAR, GaussianMixture([1.0], [0.0], [1.0]))
    x = sampler(model, torch.tensor([[0.0], [1.0]], dtype=torch.float64), LINEAR, steps, **kwargs)
    b, a = float(x[0]), float(x[1] - x[0])
    return math.hypot(b, a - math.sqrt(float(LINEAR.alpha_bar[0])))


@pytest.mark.parametrize(
    "sampler, options, low, high",
    [
        # Measured 20 -> 40 -> 80 steps: 4.3, 4.5 (third order; this problem's third-order error
        # term is small); 2M would give 2.0.
        (sample_dpmsolver_pp, {"order": 3}, 2.7, 5.0),
        (sample_unipc, {"order": 2}, 2.6, 3.6),  # UniP-2 with UniC-2: order 3 (3.0, 2.97)
        (sample_unipc, {"order": 1}, 1.7, 2.4),  # DDIM with UniC-1: order 2 (2.0, 2.0)
    ],
)
def test_convergence_orders(sampler, options, low, high):
    """log2 of the error ratio when doubling the steps (equal lambda steps)."""
    errors = [_gaussian_error(sampler, n, spacing="logsnr", **options) for n in (20, 40, 80)]
    orders = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    assert all(low < order < high for order in orders), (errors, orders)


# --------------------------------------------------------------------- step placement
@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_logsnr_window_spacing(schedule, steps):
    """T-1 first, then steps-1 lambdas evenly spaced from 3 down to -2, up to integer rounding."""
    ts = timesteps_for(steps, schedule, "logsnr_window")
    assert ts.shape == (steps,) and bool((ts[1:] > ts[:-1]).all()) and int(ts[-1]) == 999
    lam = schedule.half_log_snr.tolist()
    lo, hi = LOGSNR_WINDOW
    for k, t in enumerate(ts[:-1].tolist()):
        target = hi + (lo - hi) * k / (steps - 2)
        # Rounding to the nearest integer step: within half the lambda gap there.
        gap = max(abs(lam[t] - lam[min(t + 1, 999)]), abs(lam[t] - lam[max(t - 1, 0)]))
        assert abs(lam[t] - target) <= 0.5 * gap + 1e-12, (k, t, lam[t], target)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_karras_spacing(schedule):
    """Karras et al. eq. 5 in sigma/alpha from step 0 to min(80, sigma_max), then T-1."""
    steps = 10
    ts = timesteps_for(steps, schedule, "karras").tolist()
    ab = schedule.alpha_bar.tolist()
    noise = [math.sqrt((1 - a) / a) for a in ab]  # sigma/alpha, increasing
    s_min, s_max = noise[0], min(KARRAS_SIGMA_MAX, noise[-1])
    assert ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    for i, t in enumerate(ts[:-1]):
        frac = i / (steps - 1)
        target = (s_min ** (1 / KARRAS_RHO) + frac * (s_max ** (1 / KARRAS_RHO) - s_min ** (1 / KARRAS_RHO))) ** KARRAS_RHO  # fmt: skip
        neighbours = [noise[max(t - 1, 0)], noise[t], noise[min(t + 1, 999)]]
        assert min(neighbours) <= target * 1.0000001 and target <= max(neighbours) * 1.0000001


# --------------------------------------------------------------------- the 10-call target
class _Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, z_t, t, **kwargs):
        self.calls += 1
        return self.model(z_t, t, **kwargs)


def _floor(seeds: int = 8) -> float:
    pairs = [
        sliced_wasserstein(MIXTURE.sample(N, _gen(s)), MIXTURE.sample(N, _gen(100 + s)), p=1)
        for s in range(seeds)
    ]
    return float(torch.stack(pairs).mean())


@pytest.fixture(scope="module")
def noise_floor() -> float:
    return _floor()


# Measured (benchmarks/sampler_accuracy.py, mean of 3 seeds, seed std ~0.3x): unipc with
# logsnr_window at 10 calls is at 0.97x (linear) and 0.99x (cosine) the floor; the target of
# issue 13 is 3x; DPM-Solver++(2M) with its default logsnr spacing is at 5.4x and 10x.
TEN_CALL_FACTOR = 2.0


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_ten_calls_reach_the_noise_floor(schedule, noise_floor):
    model = _Counted(exact_eps_model(schedule, MIXTURE))
    x = sample(model, (N, 2), schedule, method="unipc", steps=10, generator=_gen(21),
               dtype=torch.float64)  # fmt: skip
    assert model.calls == 10
    distance = float(sliced_wasserstein(x, MIXTURE.sample(N, _gen(10_021)), p=1))
    assert distance <= TEN_CALL_FACTOR * noise_floor, (distance, noise_floor)
    # The same calls with DPM-Solver++(2M) at its default spacing: far from the floor.
    z = torch.randn(N, 2, generator=_gen(22), dtype=torch.float64)
    base = sample_dpmsolver_pp(exact_eps_model(schedule, MIXTURE), z, schedule, 10)
    assert float(sliced_wasserstein(base, MIXTURE.sample(N, _gen(10_022)), p=1)) > 3 * noise_floor


def test_unipc_is_selectable_by_name_and_deterministic():
    assert DEFAULT_SPACING["unipc"] == "logsnr_window"
    z = torch.randn(64, 2, generator=_gen(23), dtype=torch.float64)
    model = exact_eps_model(LINEAR, MIXTURE)
    a = run_sampler(model, z, LINEAR, method="unipc", steps=7)
    torch.testing.assert_close(a, sample_unipc(model, z, LINEAR, 7), rtol=0, atol=0)
    ts = timesteps_for(7, LINEAR, "logsnr_window")
    torch.testing.assert_close(a, sample_unipc(model, z, LINEAR, timesteps=ts), rtol=0, atol=0)
    # order=1 without the corrector would be DDIM; with it, it is not.
    assert not torch.allclose(sample_unipc(model, z, LINEAR, 7, order=1),
                              sample_ddim(model, z, LINEAR, timesteps=ts))  # fmt: skip
