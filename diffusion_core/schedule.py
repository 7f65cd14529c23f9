"""Noise schedules and the closed-form quantities of the forward (diffusion) process.

Chapter 18 of Prince, *Understanding Deep Learning*, sections 18.2 and 18.4.

Notation. The chapter writes alpha_t for the cumulative product prod_s (1 - beta_s); we call it
``alpha_bar`` (as Ho et al. do) and keep ``alphas = 1 - betas`` for the per-step factor.
Timesteps are integers ``t in {0, ..., T-1}``; array index ``t`` holds the chapter's step ``t+1``,
so ``alpha_bar[0] = 1 - beta_1`` and the "previous" step of index 0 is the data itself
(``alpha_bar_prev[0] = 1``).

Every quantity is a float64 tensor computed once in the constructor; methods gather the entries for
a batch of timesteps and cast to the dtype of the data they are applied to.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

Tensor = torch.Tensor


class ScheduleConfig(BaseModel):
    """Serialisable description of a :class:`NoiseSchedule` (a config that crosses boundaries)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "cosine", "constant"] = "linear"
    T: int = Field(1000, ge=1, description="steps of the process (before any respacing)")
    beta: float | None = Field(None, gt=0.0, lt=1.0, description="only for kind='constant'")
    cosine_s: float | None = Field(
        None, ge=0.0, description="kind='cosine': the offset s (None: 0.008, Nichol & Dhariwal)"
    )
    max_beta: float | None = Field(
        None, gt=0.0, lt=1.0, description="kind='cosine': the clip of beta_t (None: 0.999)"
    )
    timesteps: tuple[int, ...] | None = Field(
        None, description="a respaced schedule: the steps of the T-step process it keeps (18.6.2)"
    )

    @model_validator(mode="after")
    def _fields_of_their_kind(self) -> ScheduleConfig:
        if self.kind == "constant" and self.beta is None:
            raise ValueError("a 'constant' schedule needs beta (e.g. beta=0.01)")
        if self.kind != "constant" and self.beta is not None:
            raise ValueError(f"beta is only used by kind='constant', not kind={self.kind!r}")
        if self.kind != "cosine" and (self.cosine_s, self.max_beta) != (None, None):
            raise ValueError(f"cosine_s and max_beta are only used by kind='cosine', not {self.kind!r}")
        if self.timesteps is not None:
            ts = self.timesteps
            if not ts or any(b <= a for a, b in zip(ts, ts[1:], strict=False)):
                raise ValueError(f"timesteps must be strictly increasing, got {list(ts)}")
            if ts[0] < 0 or ts[-1] >= self.T:
                raise ValueError(f"timesteps must lie in [0, T-1={self.T - 1}], got {list(ts)}")
        return self


def extract(values: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """``values[t]`` shaped ``[B, 1, 1, ...]`` to broadcast against ``like`` (in ``like``'s dtype).

    ``t`` is an int (same step for the whole batch) or a LongTensor of shape [B].
    """
    if isinstance(t, int):
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape((1,) * like.ndim)
    t = t.to(values.device).long()
    out = values[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(t.shape + (1,) * (like.ndim - t.ndim))


class NoiseSchedule:
    """The variance schedule beta_1..beta_T and everything derived from it.

    Construct with :meth:`linear`, :meth:`cosine`, :meth:`constant`, or from explicit ``betas``.
    """

    def __init__(self, betas: Tensor, config: ScheduleConfig | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence with every value in (0, 1)")
        self.config = config
        self.betas = betas
        self.alphas = 1.0 - betas
        # alpha_t of the chapter, eqs. 18.6-18.8: the cumulative signal fraction.
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        # Posterior q(z_{t-1} | z_t, x), eq. 18.15: variance and the two mean coefficients.
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        self.posterior_mean_coef_z = (
            (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        )
        self.posterior_mean_coef_x = self.alpha_bar_prev.sqrt() * betas / (1.0 - self.alpha_bar)
        # The variance is 0 at the first step; clip its log there (as Nichol & Dhariwal do).
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([pv[1:2] if len(pv) > 1 else betas[:1], pv[1:]])
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def linear(cls, T: int = 1000) -> NoiseSchedule:
        """Ho et al.'s linear betas from 1e-4 to 0.02 at T=1000, scaled by 1000/T otherwise."""
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        return cls(betas.clamp(max=0.999), ScheduleConfig(kind="linear", T=T))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=1e-8, max=max_beta)
        config = ScheduleConfig(
            kind="cosine",
            T=T,
            cosine_s=None if s == 0.008 else s,
            max_beta=None if max_beta == 0.999 else max_beta,
        )
        return cls(betas, config)

    @classmethod
    def constant(cls, beta: float, T: int) -> NoiseSchedule:
        """The chapter's toy schedule: the same beta at every step (figures 18.2-18.8)."""
        betas = torch.full((T,), float(beta), dtype=torch.float64)
        return cls(betas, ScheduleConfig(kind="constant", T=T, beta=beta))

    @classmethod
    def from_config(cls, config: ScheduleConfig | dict) -> NoiseSchedule:
        """The schedule a config describes (``schedule.config`` round-trips through JSON)."""
        config = ScheduleConfig.model_validate(config)
        if config.kind == "linear":
            base = cls.linear(config.T)
        elif config.kind == "cosine":
            base = cls.cosine(
                config.T,
                s=0.008 if config.cosine_s is None else config.cosine_s,
                max_beta=0.999 if config.max_beta is None else config.max_beta,
            )
        else:
            base = cls.constant(config.beta, config.T)  # type: ignore[arg-type]
        return base if config.timesteps is None else base.respace(list(config.timesteps))

    # ----------------------------------------------------------------- properties
    @property
    def T(self) -> int:
        return self.betas.numel()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of q(z_t|x) (eq. 18.8)."""
        return self.alpha_bar / (1.0 - self.alpha_bar)

    @property
    def half_log_snr(self) -> Tensor:
        """lambda_t = log(sqrt(alpha_bar) / sqrt(1-alpha_bar)), the time variable of DPM-Solver (Lu et al.)."""
        return 0.5 * (torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar))

    def __repr__(self) -> str:
        kind = self.config.kind if self.config else "custom"
        return f"NoiseSchedule({kind}, T={self.T})"

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """Sample the diffusion kernel q(z_t|x): z_t = sqrt(alpha_bar) x + sqrt(1-alpha_bar) eps (eq. 18.7)."""
        if noise is None:
            noise = torch.randn_like(x)
        return (
            extract(self.sqrt_alpha_bar, t, x) * x
            + extract(self.sqrt_one_minus_alpha_bar, t, x) * noise
        )

    def q_mean_variance(self, x: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean and variance of the diffusion kernel q(z_t|x) (eq. 18.8)."""
        return extract(self.sqrt_alpha_bar, t, x) * x, extract(1.0 - self.alpha_bar, t, x)

    def q_step(self, z_prev: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """One forward step z_t = sqrt(1-beta_t) z_{t-1} + sqrt(beta_t) eps_t (eq. 18.1)."""
        if noise is None:
            noise = torch.randn_like(z_prev)
        return extract(self.alphas.sqrt(), t, z_prev) * z_prev + extract(
            self.betas.sqrt(), t, z_prev
        ) * noise

    def posterior(self, z_t: Tensor, x: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z_{t-1}|z_t, x) (eq. 18.15).

        mean = (1-alpha_bar_{t-1}) sqrt(1-beta_t)/(1-alpha_bar_t) z_t
             + sqrt(alpha_bar_{t-1}) beta_t/(1-alpha_bar_t) x,
        variance = beta_t (1-alpha_bar_{t-1})/(1-alpha_bar_t).
        At index 0 (the chapter's step 1) the variance is 0 and the mean is x.
        """
        mean = extract(self.posterior_mean_coef_z, t, z_t) * z_t + extract(
            self.posterior_mean_coef_x, t, z_t
        ) * x
        return mean, extract(self.posterior_variance, t, z_t).expand_as(mean)

    # ----------------------------------------------------------------- reparameterisations
    def predict_x_from_eps(self, z_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """Invert eq. 18.7 for x given the noise."""
        return (z_t - extract(self.sqrt_one_minus_alpha_bar, t, z_t) * eps) / extract(
            self.sqrt_alpha_bar, t, z_t
        )

    def predict_eps_from_x(self, z_t: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
        """Invert eq. 18.7 for the noise given x."""
        return (z_t - extract(self.sqrt_alpha_bar, t, z_t) * x) / extract(
            self.sqrt_one_minus_alpha_bar, t, z_t
        )

    def v_target(self, x: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """Velocity v = sqrt(alpha_bar) eps - sqrt(1-alpha_bar) x (Salimans & Ho, 2022)."""
        return extract(self.sqrt_alpha_bar, t, x) * noise - extract(
            self.sqrt_one_minus_alpha_bar, t, x
        ) * x

    def eps_from_v(self, z_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """eps = sqrt(alpha_bar) v + sqrt(1-alpha_bar) z_t."""
        return extract(self.sqrt_alpha_bar, t, z_t) * v + extract(
            self.sqrt_one_minus_alpha_bar, t, z_t
        ) * z_t

    def x_from_v(self, z_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x = sqrt(alpha_bar) z_t - sqrt(1-alpha_bar) v (invert the velocity for the data)."""
        return extract(self.sqrt_alpha_bar, t, z_t) * z_t - extract(
            self.sqrt_one_minus_alpha_bar, t, z_t
        ) * v

    def reverse_mean_from_eps(self, z_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """Decoder mean f_t[z_t] from a noise estimate g_t (eq. 18.35):

        f_t = z_t / sqrt(1-beta_t) - beta_t / (sqrt(1-alpha_bar_t) sqrt(1-beta_t)) g_t.
        """
        return (
            z_t - extract(self.betas / self.sqrt_one_minus_alpha_bar, t, z_t) * eps
        ) / extract(self.alphas.sqrt(), t, z_t)

    # ----------------------------------------------------------------- reverse process
    def reverse_log_variance(self, kind: Literal["posterior", "beta"] = "posterior") -> Tensor:
        """log sigma_t^2 of a fixed-variance decoder p(z_{t-1}|z_t) = Norm[f_t, sigma_t^2 I] (eq. 18.16).

        ``"posterior"``: sigma_t^2 = beta_t (1-alpha_bar_{t-1})/(1-alpha_bar_t), the variance of
        q(z_{t-1}|z_t, x) (eq. 18.15), optimal when x is a single point; it is 0 at the first step,
        so index 0 takes the value of index 1 (``posterior_log_variance_clipped``).
        ``"beta"``: sigma_t^2 = beta_t, optimal when x ~ Norm[0, I] (Ho et al., 2020).
        """
        if kind == "posterior":
            return self.posterior_log_variance_clipped
        if kind == "beta":
            return torch.log(self.betas)
        raise ValueError(f"kind must be 'posterior' or 'beta', got {kind!r}")

    # ----------------------------------------------------------------- sub-sequences
    def respace(self, timesteps: Tensor | list[int]) -> NoiseSchedule:
        """The schedule of an increasing sub-sequence of steps with the same alpha_bar there.

        Used for accelerated ancestral sampling (18.6.2): beta'_i = 1 - alpha_bar[t_i]/alpha_bar[t_{i-1}].
        """
        ts = torch.as_tensor(timesteps, dtype=torch.long)
        if ts.ndim != 1 or ts.numel() == 0 or bool((ts[1:] <= ts[:-1]).any()):
            raise ValueError(f"timesteps must be strictly increasing, got {ts.tolist()}")
        if int(ts[0]) < 0 or int(ts[-1]) >= self.T:
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}], got {ts.tolist()}")
        ab = self.alpha_bar[ts]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        config = None
        if self.config is not None:  # steps of the original process (respacing composes)
            kept = ts if self.config.timesteps is None else torch.tensor(self.config.timesteps)[ts]
            config = self.config.model_copy(update={"timesteps": tuple(int(t) for t in kept)})
        return NoiseSchedule(1.0 - ab / ab_prev, config)
