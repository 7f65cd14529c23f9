"""Training losses (eqs. 18.28-18.39, Algorithm 18.1; Nichol & Dhariwal's hybrid) checked exactly.

Identities between losses are checked in float64 to 1e-10 relative (they are algebra, not
approximations); Monte Carlo expectations to 5 standard errors with fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.likelihood import LOG2, gaussian_log_likelihood, normal_kl, vlb_term_bpd
from diffusion_core.objectives import (
    LossType,
    Parameterization,
    elbo_eps_weight,
    eps_model,
    min_snr_weight,
    model_output_to_eps,
    model_output_to_x0,
    sample_timesteps,
    training_losses,
)
from diffusion_core.reverse import learned_log_variance
from diffusion_core.schedule import NoiseSchedule
from tests.unit._gaussian import GaussianData

F64 = torch.float64
B, D = 64, 3
SCHEDULE = NoiseSchedule.linear(1000)
DATA = GaussianData([0.3, -0.5, 0.1], [0.5, 0.8, 0.3])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int = 0):
    g = _gen(seed)
    x = DATA.sample(B, g)
    noise = torch.randn(B, D, generator=g, dtype=F64)
    t = torch.cat([torch.tensor([0, 1, 999]), sample_timesteps(B - 3, SCHEDULE.T, g)])
    return x, t, noise


class Net(torch.nn.Module):
    """A tiny network with separate heads for the prediction and the variance interpolant."""

    def __init__(self, learned_variance: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.mean_head = torch.nn.Linear(D + 1, D, dtype=F64)
        self.var_head = torch.nn.Linear(D + 1, D, dtype=F64) if learned_variance else None

    def forward(self, z_t, t):
        h = torch.cat([z_t, (t.to(F64) / 1000.0)[:, None]], dim=1)
        out = self.mean_head(h)
        if self.var_head is None:
            return out
        return torch.cat([out, torch.tanh(self.var_head(h))], dim=1)


# --------------------------------------------------------------------------- basics
def test_sample_timesteps_is_uniform_and_seeded():
    T, n = 10, 100_000
    t = sample_timesteps(n, T, _gen(1))
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    counts = torch.bincount(t, minlength=T).to(F64)
    se = math.sqrt(n * (1 / T) * (1 - 1 / T))  # binomial standard error of each count
    assert bool(((counts - n / T).abs() < 5 * se).all())
    assert torch.equal(sample_timesteps(7, T, _gen(3)), sample_timesteps(7, T, _gen(3)))


@pytest.mark.parametrize("loss_type", list(LossType))
@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_losses_are_per_example(loss_type, parameterization):
    x, t, noise = _batch()
    net = Net(learned_variance=loss_type is LossType.HYBRID)
    out = training_losses(net, x, t, SCHEDULE, loss_type=loss_type, parameterization=parameterization,
                          noise=noise, decoder="gaussian")
    assert out["loss"].shape == (B,) and out["mse"].shape == (B,)
    assert torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()  # differentiable end to end
    assert net.mean_head.weight.grad is not None


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("loss_type", ["eps_simple", "elbo_weighted", "mean_matching"])
def test_losses_vanish_for_the_true_target(parameterization, loss_type):
    x, t, noise = _batch(1)
    truth = {"eps": noise, "x0": x, "v": SCHEDULE.v_target(x, t, noise)}[parameterization]
    out = training_losses(lambda z, tt: truth, x, t, SCHEDULE, loss_type=loss_type,
                          parameterization=parameterization, noise=noise)
    assert out["loss"].abs().max().item() < 1e-12


@pytest.mark.parametrize("t", [0, 50, 400, 999])
def test_exact_eps_predictor_reaches_the_irreducible_loss(t):
    """E||eps - E[eps|z_t]||^2 / D = mean_d alpha_bar s^2 / (alpha_bar s^2 + 1 - alpha_bar)."""
    n = 100_000
    g = _gen(t)
    x = DATA.sample(n, g)
    tt = torch.full((n,), t)
    out = training_losses(DATA.eps_model(SCHEDULE), x, tt, SCHEDULE,
                          noise=torch.randn(n, D, generator=g, dtype=F64))
    loss = out["loss"]
    se = loss.std().item() / math.sqrt(n)
    assert abs(loss.mean().item() - DATA.expected_eps_mse(SCHEDULE, t)) < 5 * se


# --------------------------------------------------------------------------- the ELBO's weights
@pytest.mark.parametrize("sigma", ["posterior", "beta"])
def test_elbo_weighted_is_eps_simple_times_the_eq_18_38_weight(sigma):
    x, t, noise = _batch(2)
    net = Net()
    simple = training_losses(net, x, t, SCHEDULE, noise=noise)["loss"]
    weighted = training_losses(net, x, t, SCHEDULE, loss_type="elbo_weighted", noise=noise,
                               sigma=sigma)["loss"]
    beta, ab = SCHEDULE.betas, SCHEDULE.alpha_bar
    if sigma == "beta":
        sigma2 = beta
    else:  # beta_t (1 - ab_{t-1}) / (1 - ab_t), with the first step's 0 replaced by the second's
        ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
        sigma2 = beta * (1 - ab_prev) / (1 - ab)
        sigma2[0] = sigma2[1]
    weight = beta**2 / ((1 - ab) * (1 - beta) * 2 * sigma2)
    torch.testing.assert_close(elbo_eps_weight(SCHEDULE, sigma), weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted, weight[t] * simple, rtol=1e-10, atol=0)


def test_min_snr_weights_by_hand():
    # linear schedule, T = 1000: alpha_bar_t = prod_{s<=t} (1 - beta_s), beta from 1e-4 to 0.02
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    ab = torch.cumprod(1 - betas, 0)
    for t in (0, 10, 250, 999):
        snr = float(ab[t] / (1 - ab[t]))
        w = {"eps": min(snr, 5.0) / snr, "v": min(snr, 5.0) / (snr + 1), "x0": min(snr, 5.0)}
        for p, want in w.items():
            assert math.isclose(float(min_snr_weight(SCHEDULE, 5.0, p)[t]), want, rel_tol=1e-12)
    # at t = 0 the SNR is ~1e4: eps-prediction's weight is gamma / SNR, far below 1
    assert float(min_snr_weight(SCHEDULE, 5.0, "eps")[0]) < 1e-3
    assert float(min_snr_weight(SCHEDULE, 5.0, "eps")[999]) == 1.0  # SNR < gamma: unweighted


@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_min_snr_loss_is_the_clipped_snr_times_the_x_error(parameterization):
    # every parameterisation's weighted loss is min(SNR, gamma) ||x_hat - x||^2 (Hang et al.)
    x, t, noise = _batch(5)
    net = Net()
    out = training_losses(net, x, t, SCHEDULE, parameterization=parameterization, noise=noise,
                          snr_gamma=5.0)
    z_t = SCHEDULE.q_sample(x, t, noise)
    x_hat = model_output_to_x0(net(z_t, t), z_t, t, SCHEDULE, parameterization)
    want = SCHEDULE.snr[t].clamp(max=5.0) * ((x_hat - x) ** 2).mean(dim=1)
    torch.testing.assert_close(out["loss"], want, rtol=1e-8, atol=1e-12)
    plain = training_losses(net, x, t, SCHEDULE, parameterization=parameterization, noise=noise)
    torch.testing.assert_close(out["mse"], plain["mse"])
    with pytest.raises(ValueError, match="eps_simple loss only"):
        training_losses(net, x, t, SCHEDULE, loss_type="elbo_weighted", snr_gamma=5.0)


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("sigma", ["posterior", "beta"])
def test_mean_matching_equals_elbo_weighted(parameterization, sigma):
    """Eq. 18.29 (posterior mean vs f_t) = eq. 18.38 (noise error), the algebra of section 18.5."""
    x, t, noise = _batch(3)
    kw = {"parameterization": parameterization, "noise": noise, "sigma": sigma}
    mm = training_losses(Net(), x, t, SCHEDULE, loss_type="mean_matching", **kw)["loss"]
    ew = training_losses(Net(), x, t, SCHEDULE, loss_type="elbo_weighted", **kw)["loss"]
    torch.testing.assert_close(mm, ew, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", ["posterior", "beta"])
def test_mean_matching_is_the_kl_term_up_to_its_constant(sigma):
    """Eq. 18.28: KL(q(z_{t-1}|z_t,x) || Norm[f_t, sigma^2]) = ||mu_q - f_t||^2/(2 sigma^2) + C,
    C = the KL at f_t = mu_q; at the first step (eq. 18.26) -log Norm[x; f_1, sigma_1^2] with
    C = 0.5 log(2 pi sigma_1^2). Per dimension, in nats."""
    x, t, noise = _batch(4)
    net = Net()
    mm = training_losses(net, x, t, SCHEDULE, loss_type="mean_matching", noise=noise, sigma=sigma)["loss"]

    z_t = SCHEDULE.q_sample(x, t, noise)
    f = SCHEDULE.reverse_mean_from_eps(z_t, t, net(z_t, t))
    logvar = SCHEDULE.reverse_log_variance(sigma)[t][:, None].expand_as(f)
    mu_q, _ = SCHEDULE.posterior(z_t, x, t)
    kl = vlb_term_bpd(x, z_t, t, SCHEDULE, f, logvar, decoder="gaussian") * LOG2
    const = vlb_term_bpd(x, z_t, t, SCHEDULE, mu_q, logvar, decoder="gaussian") * LOG2
    first = t == 0
    torch.testing.assert_close(mm[~first], (kl - const)[~first], rtol=1e-9, atol=1e-12)
    # at t = 0 mu_q = x, so const is the decoder's -log density at its mode
    const0 = 0.5 * (math.log(2 * math.pi) + logvar[first, 0])
    torch.testing.assert_close(const[first], const0)
    torch.testing.assert_close(mm[first], (kl - const)[first], rtol=1e-9, atol=1e-12)
    # and the KL itself is eq. 18.47 with the posterior's variance
    kl_direct = normal_kl(mu_q, SCHEDULE.posterior_log_variance_clipped[t][:, None], f, logvar).mean(1)
    torch.testing.assert_close(kl[~first], kl_direct[~first])
    nll = -gaussian_log_likelihood(x, f, logvar).mean(1)
    torch.testing.assert_close(kl[first], nll[first])


# --------------------------------------------------------------------------- learned variance
def test_hybrid_vlb_trains_only_the_variance():
    """The VLB term has a stopped-gradient mean; the simple term does not see the variance."""
    x, t, noise = _batch(5)
    net = Net(learned_variance=True)
    out = training_losses(net, x, t, SCHEDULE, loss_type="hybrid", noise=noise, decoder="gaussian")
    mean_params = list(net.mean_head.parameters())
    var_params = list(net.var_head.parameters())
    grads = torch.autograd.grad(out["vlb"].sum(), mean_params + var_params, allow_unused=True,
                                retain_graph=True)
    assert all(gr is None or gr.abs().max() == 0 for gr in grads[: len(mean_params)])
    assert all(gr is not None and gr.abs().max() > 0 for gr in grads[len(mean_params):])
    grads = torch.autograd.grad(out["mse"].sum(), var_params, allow_unused=True, retain_graph=True)
    assert all(gr is None or gr.abs().max() == 0 for gr in grads)
    # the total trains both heads
    grads = torch.autograd.grad(out["loss"].sum(), mean_params + var_params)
    assert all(gr.abs().max() > 0 for gr in grads)


def test_hybrid_is_simple_plus_lambda_T_vlb():
    x, t, noise = _batch(6)
    net = Net(learned_variance=True)
    out = training_losses(net, x, t, SCHEDULE, loss_type="hybrid", noise=noise, decoder="gaussian",
                          vlb_weight=0.01)
    z_t = SCHEDULE.q_sample(x, t, noise)
    eps_hat, v = net(z_t, t).chunk(2, dim=1)
    torch.testing.assert_close(out["mse"], ((eps_hat - noise) ** 2).mean(1))
    mean = SCHEDULE.reverse_mean_from_eps(z_t, t, eps_hat)
    vlb = vlb_term_bpd(x, z_t, t, SCHEDULE, mean, learned_log_variance(v, t, SCHEDULE),
                       decoder="gaussian")
    torch.testing.assert_close(out["vlb"], vlb)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.01 * SCHEDULE.T * vlb)


def test_hybrid_on_images_splits_channels():
    g = _gen(7)
    x = torch.randint(0, 256, (4, 3, 4, 4), generator=g).to(F64) / 127.5 - 1
    conv = torch.nn.Conv2d(3, 6, 1, dtype=F64)

    def model(z, t):
        h = conv(z)
        return torch.cat([h[:, :3], torch.tanh(h[:, 3:])], dim=1)

    t = torch.tensor([0, 3, 500, 999])
    out = training_losses(model, x, t, SCHEDULE, loss_type="hybrid")  # discretized decoder
    assert out["loss"].shape == (4,) and torch.isfinite(out["loss"]).all()
    assert bool((out["vlb"] >= 0).all())
    with pytest.raises(ValueError, match="2C channels"):
        training_losses(lambda z, tt: z, x, t, SCHEDULE, loss_type="hybrid")


# --------------------------------------------------------------------------- parameterisations
@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_model_output_round_trips(t):
    x, _, noise = _batch(8)
    tt = torch.full((B,), t)
    z_t = SCHEDULE.q_sample(x, tt, noise)
    for p, output in (("eps", noise), ("x0", x), ("v", SCHEDULE.v_target(x, tt, noise))):
        torch.testing.assert_close(model_output_to_eps(output, z_t, tt, SCHEDULE, p), noise,
                                   rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(model_output_to_x0(output, z_t, tt, SCHEDULE, p), x,
                                   rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_eps_model_wraps_any_parameterisation(parameterization):
    eps = DATA.eps_model(SCHEDULE)

    def net(z, t):  # the exact model, expressed in another parameterisation
        e = eps(z, t)
        x0 = SCHEDULE.predict_x_from_eps(z, t, e)
        return x0 if parameterization == "x0" else SCHEDULE.v_target(x0, t, e)

    x, t, noise = _batch(9)
    z = SCHEDULE.q_sample(x, t, noise)
    torch.testing.assert_close(eps_model(net, SCHEDULE, parameterization)(z, t), eps(z, t))
    learned = eps_model(lambda z, t: torch.cat([net(z, t), torch.zeros_like(z)], 1), SCHEDULE,
                        parameterization, learned_variance=True)
    torch.testing.assert_close(learned(z, t), eps(z, t))
    assert eps_model(eps, SCHEDULE, "eps") is eps


def test_clear_errors():
    x, t, noise = _batch(10)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        training_losses(Net(), x, t, SCHEDULE, loss_type="l1")
    with pytest.raises(ValueError, match="parameterization must be one of"):
        training_losses(Net(), x, t, SCHEDULE, parameterization="score")
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        training_losses(Net(), x, t[:3], SCHEDULE)
    with pytest.raises(ValueError, match="one value per data value"):
        training_losses(Net(learned_variance=True), x, t, SCHEDULE)
    with pytest.raises(ValueError, match="'posterior' or 'beta'"):
        training_losses(Net(), x, t, SCHEDULE, loss_type="elbo_weighted", sigma="large")
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        training_losses(Net(learned_variance=True), 3 * x, t, SCHEDULE, loss_type="hybrid")
