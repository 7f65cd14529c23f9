"""The training losses of a cascade stage on a batch (Algorithm 18.1, with condition dropout and
noise-conditioning augmentation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion_core.cascade.config import TEXT_KEYS
from diffusion_core.cascade.images import images_to_model, resize
from diffusion_core.cascade.stage import Stage
from diffusion_core.objectives import sample_timesteps, training_losses
from diffusion_core.sampling.noise import randn

Tensor = torch.Tensor


def _rand(n: int, generator: torch.Generator | None, device: Any) -> Tensor:
    """U[0, 1) draws on the generator's device, moved to ``device`` (as sampling's ``randn``)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _condition_kwargs(stage: Stage, batch: Mapping[str, Any], device: Any) -> dict[str, Tensor]:
    """The conditioning tensors of a batch that the stage's network takes."""
    cfg, kw = stage.config.network, {}
    if cfg.num_classes and batch.get("label") is not None:
        kw["label"] = torch.as_tensor(batch["label"], device=device).long()
    if cfg.text_dim:
        for key in TEXT_KEYS:
            if batch.get(key) is not None:
                kw[key] = torch.as_tensor(batch[key], device=device)
        if "text_pooled" in kw and cfg.text_cross_attention and "text_tokens" not in kw:
            raise ValueError(
                f"stage {stage.name!r} attends to text tokens (text_cross_attention=True) but the "
                "batch has text_pooled without text_tokens; add per-token embeddings to the data "
                "or set text_cross_attention=False"
            )
    return kw


def stage_losses(
    stage: Stage,
    batch: Mapping[str, Any],
    *,
    model: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-example training losses [B] of one stage on a batch (Algorithm 18.1).

    ``batch``: ``image`` (uint8 [B, H, W, C] or float [B, C, H, W] in [-1, 1], at least the
    stage's resolution; area-downsampled to it), optional ``label`` [B] and ``text_pooled`` /
    ``text_tokens`` / ``text_mask``. Condition dropout with ``cond_drop_prob`` (the learned null
    embedding replaces the condition), and for super-resolution stages the low-resolution image
    (downsampled from ``image``) noise-augmented to a random level. ``model`` overrides the
    stage's network (e.g. its DistributedDataParallel wrapper); ``generator`` makes the draws
    reproducible. Losses from :func:`diffusion_core.objectives.training_losses`.
    """
    cfg = stage.config
    net = stage.network if model is None else model
    device = next(stage.network.parameters()).device
    images = images_to_model(torch.as_tensor(batch["image"]).to(device))
    x = resize(images, stage.resolution)
    B = x.shape[0]
    kwargs: dict[str, Tensor] = _condition_kwargs(stage, batch, device)
    if cfg.cond_drop_prob > 0:
        kwargs["cond_drop"] = _rand(B, generator, device) < cfg.cond_drop_prob
    if stage.is_super_resolution:
        low = resize(images, cfg.network.low_res_size)  # type: ignore[arg-type]
        s_max = stage.aug_step(cfg.aug_max_level)
        s = torch.randint(0, s_max + 1, (B,), generator=generator).to(device)
        kwargs["low_res"] = stage.augment_low_res(low, s, generator)
        kwargs["aug_level"] = s
    t = sample_timesteps(B, stage.schedule.T, generator).to(device)
    noise = randn(x.shape, generator, device=device)
    return training_losses(
        net,
        x,
        t,
        stage.schedule,
        loss_type=cfg.loss_type,
        parameterization=cfg.parameterization,
        noise=noise,
        model_kwargs=kwargs,
        snr_gamma=cfg.snr_gamma,
    )

