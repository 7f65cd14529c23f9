"""A cascade of diffusion models: a base stage, then super-resolution stages (section 18.6.4).

Figure 18.11: the base U-Net generates a small image from the text condition; each later stage
generates an image of twice (or more) the resolution conditioned on the text and on the previous
stage's output, upsampled and concatenated to its input. Noise-conditioning augmentation (Ho et
al., 2022, "Cascaded diffusion models"): the low-resolution conditioning image is diffused to a
level s before the super-resolution network sees it, and s is given to the network (embedded like
the time). Training draws s at random, so the stage learns to correct the artefacts of the stage
below; sampling uses one fixed, configurable s.

Augmentation levels follow the chapter's step numbering: ``s = 0`` is the clean image and
``s >= 1`` is z_s ~ q(z_s|x) (eq. 18.7), i.e. schedule index ``s - 1``. Configs give levels as
fractions of the stage's T.

Layout on disk (no pickle)::

    <dir>/cascade.json                      CascadeConfig (stage configs, text encoder id)
    <dir>/stages/<name>/model.safetensors   weights of each stage's network
    <dir>/stages/<name>/config.json         its UNetConfig (checked against cascade.json)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffusion_core.nn import UNet, UNetConfig, load_network, save_network
from diffusion_core.nn.io import config_diff
from diffusion_core.objectives import model_output_to_eps, sample_timesteps, training_losses
from diffusion_core.sampling import (
    classifier_free_guidance,
    sample_ddim,
    sample_ddpm,
    sample_dpmsolver_pp,
)
from diffusion_core.schedule import NoiseSchedule, ScheduleConfig

Tensor = torch.Tensor

FORMAT_VERSION = 1
CASCADE_JSON = "cascade.json"
TEXT_KEYS = ("text_pooled", "text_tokens", "text_mask")
Sampler = Literal["ddpm", "ddim", "dpmsolver++"]


# ===================================================================== configs
class StageConfig(BaseModel):
    """One stage: its network, its noise schedule and how it is trained and sampled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="unique; a folder name")
    network: UNetConfig
    schedule: ScheduleConfig = ScheduleConfig(kind="cosine", T=1000)
    parameterization: Literal["eps", "x0", "v"] = "eps"
    loss_type: Literal["eps_simple", "elbo_weighted", "mean_matching", "hybrid"] = "eps_simple"
    cond_drop_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="probability of the null condition in training (CFG)"
    )
    aug_max_level: float = Field(
        0.5, ge=0.0, le=1.0, description="training: s ~ U{0..round(aug_max_level*T)}"
    )
    aug_sample_level: float = Field(
        0.1, ge=0.0, le=1.0, description="sampling: s = round(aug_sample_level*T)"
    )

    @property
    def resolution(self) -> int:
        return self.network.image_size

    @property
    def is_super_resolution(self) -> bool:
        return self.network.is_super_resolution

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if (self.loss_type == "hybrid") != self.network.learn_sigma:
            raise ValueError(
                f"stage {self.name!r}: loss_type='hybrid' and network.learn_sigma=True go together"
                f" (got loss_type={self.loss_type!r}, learn_sigma={self.network.learn_sigma})"
            )
        return self


class CascadeConfig(BaseModel):
    """The whole cascade: ordered stages (base first) and the text encoder they share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = FORMAT_VERSION
    stages: tuple[StageConfig, ...] = Field(..., min_length=1)
    text_encoder: str | None = Field(
        "all-MiniLM-L6-v2", description="id for diffusion_core.text.load_text_encoder"
    )
    text_max_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> CascadeConfig:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        base = self.stages[0]
        if base.is_super_resolution:
            raise ValueError(
                f"the first stage {base.name!r} must be a base stage (low_res_size=None)"
            )
        for prev, stage in zip(self.stages, self.stages[1:], strict=False):
            if stage.network.low_res_size != prev.resolution:
                raise ValueError(
                    f"stage {stage.name!r} has low_res_size={stage.network.low_res_size} but the "
                    f"stage before it ({prev.name!r}) makes {prev.resolution}-pixel images"
                )
            if stage.network.in_channels != base.network.in_channels:
                raise ValueError("every stage must have the base stage's in_channels")
        dims = {s.network.text_dim for s in self.stages} - {None}
        if len(dims) > 1:
            raise ValueError(f"stages disagree on text_dim: {sorted(dims)}")
        if dims and self.text_encoder is None:
            raise ValueError("stages are text-conditioned (text_dim set) but text_encoder is None")
        return self


# ===================================================================== image helpers
def images_to_model(images: Tensor) -> Tensor:
    """uint8 images [N, H, W, C] (or float [N, C, H, W] in [-1, 1]) → float [N, C, H, W] in [-1, 1]."""
    if images.dtype == torch.uint8:
        if images.ndim != 4:
            raise ValueError(f"uint8 images must be [N, H, W, C], got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1], got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    return images


def model_to_images(x: Tensor) -> Tensor:
    """float [N, C, H, W] in [-1, 1] → uint8 [N, H, W, 3] (grey images repeated to RGB)."""
    out = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous()


def resize(x: Tensor, size: int) -> Tensor:
    """Down-sample [N, C, H, W] to ``size`` pixels by area averaging (exact box filter)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(
            f"images of {tuple(x.shape[-2:])} pixels are smaller than the stage's {size}; "
            "provide images at the cascade's top resolution"
        )
    return F.interpolate(x, size=(size, size), mode="area")


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: Any) -> Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)


def _rand(n: int, generator: torch.Generator | None, device: Any) -> Tensor:
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


# ===================================================================== stage
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
        noise = _randn(low_res.shape, generator, low_res.device)
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
        sampler: Sampler = "ddim",
        steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        clip_x: float | None = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
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
        """
        net_cfg = self.config.network
        device = next(self.network.parameters()).device
        gens = list(generator) if isinstance(generator, Sequence) else [generator]
        if len(gens) not in (1, n):
            raise ValueError(f"got {len(gens)} generators for {n} samples; pass 1 or {n}")

        def randn(shape: tuple[int, ...]) -> Tensor:
            if len(gens) == 1:
                return _randn(shape, gens[0], device)
            return torch.cat([_randn((1, *shape[1:]), g, device) for g in gens])

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
            kwargs["cond_drop"] = torch.zeros(n, dtype=torch.bool, device=device)
            model = classifier_free_guidance(model, float(guidance_scale), {"cond_drop": True})
        C, R = net_cfg.in_channels, self.resolution
        z = randn((n, C, R, R))
        was_training = self.network.training
        self.network.eval()
        try:
            x = _run_sampler(sampler, model, z, self, steps, eta, clip_x, gens[0], progress, kwargs)
        finally:
            self.network.train(was_training)
        return x.clamp(-1.0, 1.0)


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
    noise = _randn(x.shape, generator, device)
    return training_losses(
        net,
        x,
        t,
        stage.schedule,
        loss_type=cfg.loss_type,
        parameterization=cfg.parameterization,
        noise=noise,
        model_kwargs=kwargs,
    )


def training_step(
    stage: Stage,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    *,
    model: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One optimisation step of a stage: losses, backward, gradient clipping, optimizer step.

    Returns detached scalars (``loss``, ``mse``, ``vlb`` for the hybrid loss, ``grad_norm``) as
    tensors, so that no host sync happens unless the caller reads them. ``autocast_dtype`` (e.g.
    ``torch.bfloat16``) runs the forward under ``torch.autocast``.
    """
    net = stage.network if model is None else model
    net.train()
    device = next(stage.network.parameters()).device
    with torch.autocast(
        device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
    ):
        losses = stage_losses(stage, batch, model=net, generator=generator)
    loss = losses["loss"].float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    out = {k: v.detach().float().mean() for k, v in losses.items()}
    if max_grad_norm is not None:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    optimizer.step()
    return out


# ===================================================================== cascade
class Cascade:
    """Ordered stages (base, then super-resolution) sharing one text encoder."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        text_encoder: str | None = "all-MiniLM-L6-v2",
        text_max_tokens: int | None = None,
    ):
        self.stages = list(stages)
        self._config = CascadeConfig(
            stages=tuple(s.config for s in self.stages),
            text_encoder=text_encoder,
            text_max_tokens=text_max_tokens,
        )
        self._encoder: Any = None

    @classmethod
    def from_config(cls, config: CascadeConfig | Mapping[str, Any]) -> Cascade:
        """A cascade with freshly initialised networks."""
        config = CascadeConfig.model_validate(config)
        return cls(
            [Stage(s) for s in config.stages],
            text_encoder=config.text_encoder,
            text_max_tokens=config.text_max_tokens,
        )

    @property
    def config(self) -> CascadeConfig:
        return self._config

    @property
    def resolution(self) -> int:
        return self.stages[-1].resolution

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].network.parameters()).device

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, key: int | str) -> Stage:
        if isinstance(key, int):
            return self.stages[key]
        for s in self.stages:
            if s.name == key:
                return s
        raise KeyError(f"no stage named {key!r}; stages are {[s.name for s in self.stages]}")

    def __repr__(self) -> str:
        chain = " → ".join(f"{s.name}:{s.resolution}px" for s in self.stages)
        return f"Cascade({chain}, text_encoder={self.config.text_encoder!r})"

    def to(self, device: torch.device | str) -> Cascade:
        for s in self.stages:
            s.network.to(device)
        return self

    # ------------------------------------------------------------------ text
    @property
    def is_text_conditioned(self) -> bool:
        return any(s.config.network.text_dim for s in self.stages)

    @property
    def text_encoder(self) -> Any:
        """The text encoder (loaded on first use from ``config.text_encoder``)."""
        if self._encoder is None and self.config.text_encoder is not None:
            from diffusion_core.text import load_text_encoder

            kw = (
                {}
                if self.config.text_max_tokens is None
                else {"max_tokens": self.config.text_max_tokens}
            )
            self.set_text_encoder(load_text_encoder(self.config.text_encoder, **kw))
        return self._encoder

    def set_text_encoder(self, encoder: Any) -> None:
        """Use an already loaded encoder (``.dim``, ``.encode(list[str])``)."""
        dims = {s.config.network.text_dim for s in self.stages} - {None}
        if dims and encoder.dim not in dims:
            raise ValueError(f"text encoder has dim {encoder.dim}, the stages expect {dims.pop()}")
        self._encoder = encoder

    def encode_prompts(self, prompts: Sequence[str], device: Any = None) -> dict[str, Tensor]:
        """``text_pooled``, ``text_tokens``, ``text_mask`` for the prompts ("" is the null condition)."""
        if not self.is_text_conditioned:
            return {}
        enc = self.text_encoder.encode(list(prompts))
        device = self.device if device is None else device
        return {
            key: torch.as_tensor(getattr(enc, key.removeprefix("text_"))).to(device)
            for key in TEXT_KEYS
        }

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int] = 0,
        guidance_scale: float | Sequence[float] = 3.0,
        sampler: Sampler = "ddim",
        steps: int | Sequence[int] = 50,
        eta: float = 0.0,
        clip_x: float | None = 1.0,
        labels: Tensor | Sequence[int] | None = None,
        return_all_stages: bool = False,
        progress: bool = False,
    ) -> Tensor | list[Tensor]:
        """Generate one image per prompt through every stage; uint8 [N, H, W, 3].

        - ``seed``: one int for the whole batch, or one per prompt. Per-prompt seeds draw each
          image's initial noise and augmentation noise from its own generator, so with a
          deterministic sampler (``ddim`` with ``eta=0``, ``dpmsolver++``) an image depends only
          on its prompt and seed, not on the rest of the batch (up to float rounding).
        - ``guidance_scale``: classifier-free guidance weight s (one, or one per stage):
          eps = eps_null + s (eps_cond - eps_null); 1 is the plain conditional model (one forward
          per step), 0 the unconditional one.
        - ``sampler``/``steps``/``eta``: the samplers of :mod:`diffusion_core.sampling`
          (``steps`` one, or one per stage).
        - ``clip_x``: clamp each step's data prediction to [-clip_x, clip_x] (images live in
          [-1, 1]; without it an eps-predictor's x-estimate at the noisiest steps, divided by a
          tiny sqrt(alpha_bar), can throw the trajectory off). ``None`` disables it.
        - ``labels``: class labels for class-conditional stages (-1 = none).
        - ``return_all_stages``: return every stage's images (a list, base first).
        """
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts is empty: give one prompt per image ('' for unconditional)")
        scales = self._per_stage(guidance_scale, "guidance_scale")
        step_counts = self._per_stage(steps, "steps")
        device = self.device
        seeds = [seed] * n if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        if isinstance(seed, int):
            gens: list[torch.Generator] = [torch.Generator(device).manual_seed(seed)]
        else:
            gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        cond: dict[str, Tensor] = self.encode_prompts(prompts, device)
        if labels is not None:
            cond["label"] = torch.as_tensor(labels, device=device).long()
        outputs: list[Tensor] = []
        low: Tensor | None = None
        for stage, scale, n_steps in zip(self.stages, scales, step_counts, strict=True):
            low = stage.sample(
                cond,
                n,
                low_res=low,
                sampler=sampler,
                steps=n_steps,
                guidance_scale=scale,
                eta=eta,
                clip_x=clip_x,
                generator=gens if len(gens) > 1 else gens[0],
                progress=progress,
            )
            outputs.append(low)
        images = [model_to_images(x) for x in outputs]
        return images if return_all_stages else images[-1]

    def _per_stage(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, Sequence):
            return [value] * len(self.stages)
        if len(value) != len(self.stages):
            raise ValueError(
                f"{name} takes one value or one per stage ({len(self.stages)}), got {list(value)}"
            )
        return list(value)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``cascade.json`` and every stage's safetensors + config into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            save_network(stage.network, directory / "stages" / stage.name)
        text = json.dumps(self.config.model_dump(mode="json"), indent=2, sort_keys=True)
        (directory / CASCADE_JSON).write_text(text + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> Cascade:
        """Load a cascade written by :meth:`save` (no pickle); configs are cross-checked."""
        directory = Path(directory)
        path = directory / CASCADE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no {CASCADE_JSON} in {directory}: not a saved cascade")
        config = CascadeConfig.model_validate_json(path.read_text())
        stages = []
        for sc in config.stages:
            net = load_network(
                directory / "stages" / sc.name, expected_config=sc.network, device=device
            )
            stages.append(Stage(sc, network=net))  # type: ignore[arg-type]
        return cls(stages, text_encoder=config.text_encoder, text_max_tokens=config.text_max_tokens)


def _run_sampler(
    sampler: str,
    model: Any,
    z: Tensor,
    stage: Stage,
    steps: int,
    eta: float,
    clip_x: float | None,
    generator: torch.Generator | None,
    progress: bool,
    kwargs: dict[str, Tensor],
) -> Tensor:
    common = dict(steps=steps, clip_x=clip_x, progress=progress, **kwargs)
    if sampler == "ddim":
        return sample_ddim(model, z, stage.schedule, eta=eta, generator=generator, **common)
    if eta != 0.0:
        raise ValueError(f"eta={eta} only applies to sampler='ddim', not {sampler!r}")
    if sampler == "ddpm":
        variance = "learned" if stage.config.network.learn_sigma else "posterior"
        return sample_ddpm(
            model, z, stage.schedule, variance=variance, generator=generator, **common
        )
    if sampler == "dpmsolver++":
        return sample_dpmsolver_pp(model, z, stage.schedule, **common)
    raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm', 'ddim' or 'dpmsolver++'")
