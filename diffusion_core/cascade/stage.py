"""One level of the cascade: a network, its noise schedule, noise-conditioning augmentation and
sampling (section 18.6.4).

Noise-conditioning augmentation (Ho et al., 2022, "Cascaded diffusion models"): the
low-resolution conditioning image is diffused to a level s before the super-resolution network
sees it, and s is given to the network (embedded like the time). Training draws s at random, so
the stage learns to correct the artefacts of the stage below; sampling uses one fixed,
configurable s. Levels use the chapter's step numbering (``s = 0``: clean; see ``config.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_core.cascade.config import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    TEXT_KEYS,
    Sampler,
    StageConfig,
)
from diffusion_core.nn import UNet
from diffusion_core.nn.io import config_diff
from diffusion_core.objectives import model_output_to_eps
from diffusion_core.sampling import METHODS, classifier_free_guidance, run_sampler
from diffusion_core.sampling.noise import randn as draw_randn
from diffusion_core.schedule import NoiseSchedule

Tensor = torch.Tensor


class Stage:
    """A network, its noise schedule and its config (one level of the cascade)."""

    def __init__(self, config: StageConfig | Mapping[str, Any], network: UNet | None = None):
        self.config = StageConfig.model_validate(config)
        if network is not None:
            diff = config_diff(network.config, self.config.network)
            if diff:
                raise ValueError(f"network does not match stage {self.config.name!r}: {diff}")
        self.network = network if network is not None else UNet(self.config.network)
        self.schedule = NoiseSchedule.from_config(self.config.schedule)

    def __repr__(self) -> str:
        kind = "super-resolution" if self.is_super_resolution else "base"
        return f"Stage({self.name!r}, {kind}, {self.resolution}px, {self.schedule!r})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def is_super_resolution(self) -> bool:
        return self.config.is_super_resolution

    # ------------------------------------------------------------------ augmentation
    def aug_step(self, level: float) -> int:
        """The augmentation step s (0 = clean) for a level given as a fraction of T."""
        return round(level * self.schedule.T)

    def augment_low_res(
        self, low_res: Tensor, s: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Noise-conditioning augmentation: z_s ~ q(z_s|low_res) (eq. 18.7); s = 0 keeps it clean.

        ``s`` is a LongTensor [N] of steps in {0, ..., T} (the chapter's numbering).
        """
        noise = draw_randn(low_res.shape, generator, device=low_res.device)
        index = (s - 1).clamp(min=0)
        noisy = self.schedule.q_sample(low_res, index, noise)
        return torch.where((s > 0).view(-1, 1, 1, 1), noisy, low_res)

    # ------------------------------------------------------------------ the eps callable
    def eps_model(self, network: torch.nn.Module | None = None):
        """The network as ``model(z_t, t, **kw) -> eps`` (``[eps, v]`` with a learned variance)."""
        net = self.network if network is None else network
        p, learn_sigma, schedule = (
            self.config.parameterization,
            self.config.network.learn_sigma,
            self.schedule,
        )
        if p == "eps":
            return net

        def eps_fn(z_t: Tensor, t: Tensor, **kw: Any) -> Tensor:
            out = net(z_t, t, **kw)
            if not learn_sigma:
                return model_output_to_eps(out, z_t, t, schedule, p)
            pred, v = out.chunk(2, dim=1)
            return torch.cat([model_output_to_eps(pred, z_t, t, schedule, p), v], dim=1)

        return eps_fn

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        cond: Mapping[str, Tensor],
        n: int,
        *,
        low_res: Tensor | None = None,
        sampler: Sampler = DEFAULT_SAMPLER,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        clip_x: float | None = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        null_cond: Mapping[str, Tensor] | None = None,
        progress: bool = False,
    ) -> Tensor:
        """``n`` samples of this stage, float [n, C, R, R] in [-1, 1].

        ``cond``: conditioning tensors (``label``, ``text_pooled``, ``text_tokens``,
        ``text_mask``; those the network does not take are ignored). ``low_res``: the clean
        image of the stage below (super-resolution stages), noise-augmented here to the fixed
        level ``aug_sample_level``. ``guidance_scale``: classifier-free guidance weight (1 = the
        conditional model alone). ``generator``: one, or one per sample (then each sample's
        initial and augmentation noise come from its own generator; a stochastic sampler's
        per-step noise from the first). Draw order: augmentation noise, then z_T.
        ``null_cond``: the text condition of guidance's unconditional branch (a negative
        prompt's embeddings); default the learned null condition.
        """
        if sampler not in METHODS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(METHODS)}")
        net_cfg = self.config.network
        device = next(self.network.parameters()).device
        gens = list(generator) if isinstance(generator, Sequence) else [generator]
        if len(gens) not in (1, n):
            raise ValueError(f"got {len(gens)} generators for {n} samples; pass 1 or {n}")

        def randn(shape: tuple[int, ...]) -> Tensor:
            if len(gens) == 1:
                return draw_randn(shape, gens[0], device=device)
            return torch.cat([draw_randn((1, *shape[1:]), g, device=device) for g in gens])

        kwargs: dict[str, Tensor] = {}
        if net_cfg.num_classes and "label" in cond:
            kwargs["label"] = cond["label"].to(device)
        if net_cfg.text_dim:
            keys = TEXT_KEYS if net_cfg.text_cross_attention else ("text_pooled",)
            kwargs.update({k: cond[k].to(device) for k in keys if k in cond})
        if self.is_super_resolution:
            if low_res is None:
                raise ValueError(f"stage {self.name!r} is a super-resolution stage: pass low_res")
            low_res = low_res.to(device)
            s = self.aug_step(self.config.aug_sample_level)
            noise = randn(tuple(low_res.shape))
            kwargs["low_res"] = self.schedule.q_sample(low_res, s - 1, noise) if s > 0 else low_res
            kwargs["aug_level"] = torch.full((n,), s, dtype=torch.long, device=device)
        model = self.eps_model()
        if (net_cfg.num_classes or net_cfg.text_dim) and float(guidance_scale) != 1.0:
            if null_cond is not None and net_cfg.text_dim:  # eps_neg + s (eps_cond - eps_neg)
                null = {k: null_cond[k].to(device) for k in kwargs if k in TEXT_KEYS}
            else:
                kwargs["cond_drop"] = torch.zeros(n, dtype=torch.bool, device=device)
                null = {"cond_drop": True}
            model = classifier_free_guidance(model, float(guidance_scale), null)
        C, R = net_cfg.in_channels, self.resolution
        z = randn((n, C, R, R))
        was_training = self.network.training
        self.network.eval()
        try:
            x = run_sampler(
                model,
                z,
                self.schedule,
                method=sampler,
                steps=steps,
                eta=eta,
                variance="learned" if sampler == "ddpm" and net_cfg.learn_sigma else "posterior",
                clip_x=clip_x,
                generator=gens[0],
                progress=progress,
                **kwargs,
            )
        finally:
            self.network.train(was_training)
        return x.clamp(-1.0, 1.0)
