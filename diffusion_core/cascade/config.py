"""Stage and cascade configs (section 18.6.4): what each level of the cascade is, serialisable.

Augmentation levels follow the chapter's step numbering: ``s = 0`` is the clean image and
``s >= 1`` is z_s ~ q(z_s|x) (eq. 18.7), i.e. schedule index ``s - 1``. Configs give levels as
fractions of the stage's T.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffusion_core.nn import UNetConfig
from diffusion_core.schedule import ScheduleConfig

FORMAT_VERSION = 1
CASCADE_JSON = "cascade.json"
TEXT_KEYS = ("text_pooled", "text_tokens", "text_mask")
Sampler = Literal["ddpm", "ddim", "dpmsolver++", "unipc"]
# The default sampler of every entry point (Stage/Cascade.sample, `cascade sample`, the registry
# model, evaluation): UniPC at 10 network calls per stage matched DDIM-50's KID and faithfulness on
# the demo cascade at a fifth of the calls (docs/training.md, "Sampler and steps").
DEFAULT_SAMPLER: Sampler = "unipc"
DEFAULT_STEPS = 10


class StageConfig(BaseModel):
    """One stage: its network, its noise schedule and how it is trained and sampled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="unique; a folder name")
    network: UNetConfig
    schedule: ScheduleConfig = ScheduleConfig(kind="cosine", T=1000)
    parameterization: Literal["eps", "x0", "v"] = "eps"
    loss_type: Literal["eps_simple", "elbo_weighted", "mean_matching", "hybrid"] = "eps_simple"
    snr_gamma: float | None = Field(
        None, gt=0.0, description="min-SNR-gamma loss weighting (eps_simple only); None: off"
    )
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
        if self.snr_gamma is not None and self.loss_type != "eps_simple":
            raise ValueError(
                f"stage {self.name!r}: snr_gamma weights loss_type='eps_simple' only "
                f"(got loss_type={self.loss_type!r}); unset snr_gamma or change the loss"
            )
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
