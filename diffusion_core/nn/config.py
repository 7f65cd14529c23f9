"""Serialisable configs of the networks (pydantic, frozen, ``extra="forbid"``).

A config fully determines a network's architecture: the same config builds the same parameter
names and shapes, so a config saved as JSON beside a safetensors file is all that loading needs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BackboneConfig(BaseModel):
    """The shared encoder of figure 18.9: resolution levels, widths, depths, attention.

    Level ``i`` works at ``image_size / 2**i`` pixels with ``base_channels * channel_mult[i]``
    channels and ``num_res_blocks[i]`` residual blocks; a self-attention layer follows every
    residual block of a level whose resolution is in ``attention_resolutions``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=1, description="side of the (square) input image in pixels")
    in_channels: int = Field(3, ge=1, description="channels of z_t (3 for RGB)")
    base_channels: int = Field(64, ge=1, description="width of the first level")
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1)
    num_res_blocks: int | tuple[int, ...] = Field(
        2, description="blocks per level (one or per level)"
    )
    attention_resolutions: tuple[int, ...] = Field(
        (16,), description="pixel sizes with self-attention"
    )
    mid_attention: bool = Field(True, description="self-attention in the middle block")
    head_channels: int = Field(32, ge=1, description="channels per attention head")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (must divide every width)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    time_embed_mult: int = Field(4, ge=1, description="time-embedding width / base_channels")

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def depths(self) -> tuple[int, ...]:
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * self.levels
        return self.num_res_blocks

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(self.levels))

    @property
    def time_embed_dim(self) -> int:
        return self.base_channels * self.time_embed_mult

    def attention_at(self, level: int) -> bool:
        return self.resolutions[level] in self.attention_resolutions

    @model_validator(mode="after")
    def _check_shapes(self) -> BackboneConfig:
        if self.image_size % 2 ** (self.levels - 1):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(levels-1)="
                f"{2 ** (self.levels - 1)} for channel_mult={self.channel_mult}"
            )
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {self.channel_mult}")
        depths = self.num_res_blocks
        if isinstance(depths, tuple) and len(depths) != self.levels:
            raise ValueError(
                f"num_res_blocks has {len(depths)} entries but channel_mult has {self.levels} levels"
            )
        if any(d < 1 for d in self.depths):
            raise ValueError(f"num_res_blocks must be >= 1 per level, got {self.num_res_blocks}")
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} are not resolutions of this network; "
                f"choose from {self.resolutions}"
            )
        for w in self.widths:
            if w % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every width; widths={self.widths}"
                )
        attn_widths = [w for i, w in enumerate(self.widths) if self.attention_at(i)]
        if self.mid_attention:
            attn_widths.append(self.widths[-1])
        for w in attn_widths:
            if w % self.head_channels:
                raise ValueError(
                    f"head_channels={self.head_channels} must divide the width {w} of every "
                    f"attention layer; widths={self.widths}"
                )
        return self


class UNetConfig(BackboneConfig):
    """The denoising U-Net g[z_t, t; c] (figure 18.9) with its conditioning inputs.

    - ``learn_sigma``: output ``2 * out_channels`` (epsilon and the variance interpolation v of
      Nichol & Dhariwal, section 18.6.4).
    - ``num_classes``: class-label conditioning; a learned null class for classifier-free guidance.
    - ``text_dim``: text conditioning by a sentence encoder of that width: the pooled embedding is
      added to the time embedding, the token embeddings are attended by every attention layer.
    - ``low_res_size``: a super-resolution stage conditioned on a ``low_res_size``-pixel image
      (upsampled and concatenated to z_t) and on its noise-augmentation level.
    """

    out_channels: int | None = Field(None, ge=1, description="defaults to in_channels")
    learn_sigma: bool = False
    num_classes: int | None = Field(None, ge=1)
    text_dim: int | None = Field(None, ge=1)
    text_cross_attention: bool = Field(True, description="attend to text tokens (needs text_dim)")
    low_res_size: int | None = Field(None, ge=1)

    @property
    def eps_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def output_channels(self) -> int:
        return self.eps_channels * (2 if self.learn_sigma else 1)

    @property
    def is_super_resolution(self) -> bool:
        return self.low_res_size is not None

    @model_validator(mode="after")
    def _check_conditioning(self) -> UNetConfig:
        if self.low_res_size is not None and self.low_res_size >= self.image_size:
            raise ValueError(
                f"low_res_size={self.low_res_size} must be smaller than image_size={self.image_size}"
            )
        return self


class ClassifierConfig(BackboneConfig):
    """The noisy-image classifier Pr(c|z_t) of classifier guidance (eq. 18.40): the U-Net's
    downsampling half with a mean-pooling head over ``num_classes`` classes."""

    num_classes: int = Field(..., ge=2)


NetworkKind = Literal["unet", "classifier"]
