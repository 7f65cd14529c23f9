"""The chapter's toy figures: the grid computations behind them, and the CLI that draws them."""

import math

import pytest
import torch
from typer.testing import CliRunner

from diffusion_core import figures as F
from diffusion_core.cli import app
from diffusion_core.toy import wasserstein_1d

DZ = float(F.GRID[1] - F.GRID[0])


def test_bayes_posterior_on_grid_matches_eq_18_15():
    schedule = F.toy_schedule()
    x = torch.tensor([-2.1], dtype=torch.float64)
    for t, z in [(1, -2.0), (19, -1.0), (60, 0.5)]:
        post, _, _ = F.posterior_bayes(z, -2.1, t, schedule)
        mean, var = schedule.posterior(torch.tensor([z], dtype=torch.float64), x, t)
        grid_mean = float((F.GRID * post).sum() * DZ)
        grid_var = float(((F.GRID - grid_mean) ** 2 * post).sum() * DZ)
        assert grid_mean == pytest.approx(float(mean), abs=1e-6)
        assert grid_var == pytest.approx(float(var), rel=1e-4)


def test_reverse_conditional_is_normalised_and_matches_tweedie():
    """E[z_{t-1}|z_t] from Bayes on the grid equals the exact-predictor mean of eq. 18.35 only
    approximately (q(z_{t-1}|z_t) is not normal); both must agree to the step size beta."""
    schedule, data = F.toy_schedule(), F.toy_data()
    for t, z in [(19, -1.6), (19, 0.0), (50, 1.0)]:
        post, _, _ = F.reverse_conditional_bayes(z, t, data, schedule)
        assert float(post.sum() * DZ) == pytest.approx(1.0, abs=1e-9)
        grid_mean = float((F.GRID * post).sum() * DZ)
        zt = torch.tensor([[z]], dtype=torch.float64)
        eps = data.eps_star(zt, t, schedule)
        tweedie = float(schedule.reverse_mean_from_eps(zt, t, eps))
        assert grid_mean == pytest.approx(tweedie, abs=F.BETA)


@pytest.fixture(scope="module")
def fitted():
    return F.fit_toy_model(F.toy_data(), F.toy_schedule())


def test_fitted_toy_model_reproduces_the_data_density(fitted):
    """Algorithm 18.1 on the toy: ancestral samples of the fitted model (figures 18.8, 18.10)
    are as close to Pr(x) as another sample of Pr(x) is: W1 within 1.5x the two-sample floor.

    N = 5000, mean over 3 sampling seeds against a floor of 8 true-vs-true pairs. Measured for
    three training seeds: 1.07-1.24x the floor; the exact predictor 1.11x (the chapter's 100
    Gaussian steps of beta = 0.03 have a bias of their own, W1 ~0.017: at N = 10000 the exact
    predictor is at 1.37x, at 20000 ~1.6x, so a larger N measures the process, not the fit).
    Returning the decoder's mean f_1 at the last step (Algorithm 18.2) gives 1.62-1.76x.
    """
    schedule, data, n = F.toy_schedule(), F.toy_data(), 5000

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    def truth(seed):
        return data.sample(n, generator=gen(seed))[:, 0]

    floor = sum(float(wasserstein_1d(truth(s), truth(100 + s), p=1)) for s in range(8)) / 8

    def distance(decoder_noise: bool) -> float:
        w = []
        for seed in range(3):
            paths, _ = F._sample_paths(fitted, schedule, n, gen(seed), "ddpm", F.T, decoder_noise)
            w.append(float(wasserstein_1d(paths[-1, :, 0], truth(1000 + seed), p=1)))
        return sum(w) / len(w)

    fitted_w1, mean_only = distance(True), distance(False)
    assert math.isfinite(fitted_w1)
    assert fitted_w1 <= 1.5 * floor, (fitted_w1, floor)
    assert mean_only > fitted_w1, (mean_only, fitted_w1)  # the cause of the too-sharp peaks
    untrained = float(wasserstein_1d(torch.randn(n, generator=gen(7)), truth(7), p=1))
    assert untrained > 10 * floor


@pytest.mark.slow
def test_cascade_figures_writes_every_figure(tmp_path):
    result = CliRunner().invoke(app, ["figures", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(
        f"fig18_{n}.png"
        for n in [
            "2_forward_process", "3_diffusion_kernel", "4_marginals", "5_reverse_conditional",
            "6_posterior", "7_fitted_model", "8_fitted_samples", "10_samplers",
        ]
    )
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))
