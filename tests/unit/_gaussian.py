"""Closed forms for Gaussian data x ~ Norm[m, diag(s^2)] under the diffusion of eq. 18.7.

For Gaussian data every distribution of the forward process is Gaussian, so the exact noise
predictor, the marginals q(z_t) and the expected ELBO of the exact model are all closed form:
the tests compare the library's Monte Carlo estimates against them.
"""

from __future__ import annotations

import math

import torch

from diffusion_core.schedule import NoiseSchedule, extract

Tensor = torch.Tensor


class GaussianData:
    """x ~ Norm[mean, diag(std^2)] in D dimensions (float64)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.std = torch.tensor(std, dtype=torch.float64)
        self.var = self.std**2

    @property
    def D(self) -> int:
        return self.mean.numel()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        return self.mean + self.std * z

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log Pr(x) in nats, shape [n]."""
        return (
            -0.5 * (math.log(2 * math.pi) + torch.log(self.var) + (x - self.mean) ** 2 / self.var)
        ).sum(dim=1)

    def expected_nll(self) -> float:
        """E_x[-log Pr(x)] = sum_d 0.5 log(2 pi e s_d^2), nats per example."""
        return float((0.5 * torch.log(2 * math.pi * math.e * self.var)).sum())

    # ------------------------------------------------------------------ forward process
    def _ab(self, schedule: NoiseSchedule, t: Tensor | int, like: Tensor) -> Tensor:
        return extract(schedule.alpha_bar, t, like)

    def marginal_var(self, ab: Tensor) -> Tensor:
        """Var q(z_t) = alpha_bar s^2 + 1 - alpha_bar (per dimension)."""
        return ab * self.var + 1.0 - ab

    def eps_model(self, schedule: NoiseSchedule):
        """The exact predictor E[eps|z_t] = -sqrt(1-alpha_bar) grad log q(z_t)."""

        def model(z_t: Tensor, t: Tensor) -> Tensor:
            ab = self._ab(schedule, t, z_t)
            score = -(z_t - ab.sqrt() * self.mean) / self.marginal_var(ab)
            return -(1.0 - ab).sqrt() * score

        return model

    def expected_eps_mse(self, schedule: NoiseSchedule, t: int) -> float:
        """E||eps - E[eps|z_t]||^2 / D = mean_d alpha_bar s^2 / (alpha_bar s^2 + 1 - alpha_bar)."""
        ab = schedule.alpha_bar[t]
        return float((ab * self.var / self.marginal_var(ab)).mean())

    def posterior_x_var(self, ab: Tensor) -> Tensor:
        """Var(x|z_t) = s^2 (1 - alpha_bar) / (alpha_bar s^2 + 1 - alpha_bar)."""
        return self.var * (1.0 - ab) / self.marginal_var(ab)

    # ------------------------------------------------------------------ the exact model's ELBO
    def expected_neg_elbo_terms(self, schedule: NoiseSchedule, variance: str) -> dict[str, Tensor]:
        """E_x E_q [each term of -ELBO] of the exact eps model, nats per example.

        Decoder (index 0, Gaussian, eq. 18.26): 0.5 log(2 pi sigma^2) + Var(x|z_1)/(2 sigma^2).
        KL (index t >= 1): the model mean is E[mu_q|z_t], so mu_q - f = coef_x (x - E[x|z_t]) and
        E KL = 0.5 (v_q/sigma^2 - 1 + log sigma^2 - log v_q + coef_x^2 Var(x|z_t)/sigma^2).
        Prior: 0.5 ((1-ab_T) + ab_T (m^2 + s^2) - 1 - log(1-ab_T)).
        """
        ab = schedule.alpha_bar[:, None]  # [T, 1] against [D]
        sigma2 = torch.exp(schedule.reverse_log_variance(variance))[:, None]
        vq = schedule.posterior_variance[:, None]
        cx = schedule.posterior_mean_coef_x[:, None]
        vx = self.posterior_x_var(ab)  # [T, D]
        kl = 0.5 * (vq / sigma2 - 1.0 + torch.log(sigma2) - torch.log(vq.clamp(min=1e-300)))
        kl = kl + 0.5 * cx**2 * vx / sigma2
        decoder = 0.5 * torch.log(2 * math.pi * sigma2[0]) + vx[0] / (2 * sigma2[0])
        terms = torch.cat([decoder[None], kl[1:]]).sum(dim=1)  # [T]
        abT = schedule.alpha_bar[-1]
        prior = 0.5 * ((1 - abT) + abT * (self.mean**2 + self.var) - 1 - torch.log(1 - abT))
        return {"terms": terms, "prior": prior.sum(), "total": terms.sum() + prior.sum()}
