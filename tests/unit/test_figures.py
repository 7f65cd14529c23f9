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


def test_fitted_toy_model_learns_the_data_density():
    """Algorithm 18.1 on the toy: ancestral samples of the fitted model are close to Pr(x)."""
    schedule, data = F.toy_schedule(), F.toy_data()
    model = F.fit_toy_model(data, schedule)
    g = torch.Generator().manual_seed(1)
    paths, _ = F._sample_paths(model, schedule, 20000, g, "ddpm", F.T)
    reference = data.sample(20000, generator=g)[:, 0]
    fitted = wasserstein_1d(paths[-1, :, 0], reference)
    untrained = wasserstein_1d(torch.randn(20000, generator=g), reference)
    assert math.isfinite(float(fitted))
    # Measured over three seeds: 0.061-0.067 fitted, 0.023-0.051 between two sample sets of
    # Pr(x), about 0.6 for N(0, 1).
    assert float(fitted) < 0.1 < float(untrained)


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
