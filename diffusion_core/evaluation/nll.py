"""The NLL bound of each cascade stage on held-out images, in bits per dimension.

For a stage at resolution R the data are the held-out images area-downsampled to R² and put back
on the 8-bit grid (the discretised decoder of :mod:`diffusion_core.likelihood` scores 8-bit
values scaled to [-1, 1]). The bound is the negative ELBO of eq. 18.25 with the prior term kept
(:func:`diffusion_core.likelihood.nll_bpd`: every one of the stage's T steps, one z_t per step,
closed-form KLs, eq. 18.27-18.28), of the conditional model (no guidance):

- base stage: -log2 Pr(x | text) per dimension;
- super-resolution stage: -log2 Pr(x | text, low_res) per dimension, the low-resolution image
  being the held-out image downsampled to the stage below's resolution and noise-augmented to
  the stage's *sampling* level (``aug_sample_level``, as :meth:`Stage.sample` conditions it).

The bound of the whole cascade's top image is not the sum (each stage models a different
variable); each stage's number is reported on its own, ``nll_bpd_<stage>``.

Cost: T network evaluations per image and stage (``steps_per_call`` timesteps per call). Each
image draws its noise from its own generator (``seed + i``), so its bound does not depend on the
other images evaluated with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from diffusion_core.cascade import TEXT_KEYS, Stage, images_to_model, resize
from diffusion_core.likelihood import nll_bpd
from diffusion_core.sampling.noise import randn

Tensor = torch.Tensor
ROWS_PER_CALL = 250


def to_8bit_grid(x: Tensor) -> Tensor:
    """Round float images in [-1, 1] to the nearest of the 256 values -1 + 2k/255."""
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def stage_data(images: Tensor, size: int) -> Tensor:
    """uint8 [N, H, W, 3] (H a multiple of ``size``) → float [N, 3, size, size] on the 8-bit grid."""
    return to_8bit_grid(resize(images_to_model(images), size))


def _condition(
    stage: Stage, images: Tensor, cond: Mapping[str, Tensor], generator: torch.Generator
) -> dict[str, Tensor]:
    """The conditioning kwargs of one image (batch of 1), as :meth:`Stage.sample` builds them."""
    net = stage.config.network
    device = next(stage.network.parameters()).device
    kw: dict[str, Tensor] = {}
    if net.text_dim:
        keys = TEXT_KEYS if net.text_cross_attention else ("text_pooled",)
        kw.update({k: cond[k].to(device) for k in keys if k in cond})
    if stage.is_super_resolution:
        low = stage_data(images, net.low_res_size).to(device)  # type: ignore[arg-type]
        s = stage.aug_step(stage.config.aug_sample_level)
        if s > 0:
            noise = randn(tuple(low.shape), generator, device=device)
            low = stage.schedule.q_sample(low, s - 1, noise)
        kw["low_res"] = low
        kw["aug_level"] = torch.full((low.shape[0],), s, dtype=torch.long, device=device)
    return kw


@torch.no_grad()
def stage_nll_bpd(
    stage: Stage,
    images: Tensor,
    cond: Mapping[str, Tensor],
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The bound in bits/dim of each held-out image under one stage, float64 [N] on the CPU.

    ``images``: uint8 [N, H, W, 3] at the cascade's top resolution (or a multiple);
    ``cond``: the text condition of each image (``text_pooled`` [N, d], ``text_tokens``,
    ``text_mask``), as for sampling. Image ``i`` uses the generator seeded ``seed + i``.
    """
    device = next(stage.network.parameters()).device
    x_all = stage_data(images, stage.resolution).to(device)
    var = "learned" if stage.config.network.learn_sigma else "posterior"
    steps_per_call = max(1, min(stage.schedule.T, ROWS_PER_CALL))
    was_training = stage.network.training
    stage.network.eval()
    out = []
    try:
        for i in range(x_all.shape[0]):
            g = torch.Generator(device).manual_seed(seed + i)
            one = {k: v[i : i + 1] for k, v in cond.items()}
            kw = _condition(stage, images[i : i + 1], one, g)
            bpd = nll_bpd(
                stage.network,
                x_all[i : i + 1],
                stage.schedule,
                parameterization=stage.config.parameterization,
                variance=var,
                decoder="discretized",
                model_kwargs=kw,
                steps_per_call=steps_per_call,
                generator=g,
            )
            out.append(bpd.double().cpu())
            if progress is not None:
                progress(i + 1, x_all.shape[0])
    finally:
        stage.network.train(was_training)
    return torch.cat(out)
