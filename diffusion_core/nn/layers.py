"""Building blocks of the U-Net of figure 18.9.

Written for speed as well as clarity:
- every residual block's FiLM scale and shift come out of *one* matmul for the whole network
  (:class:`FiLMProjection`), instead of one small matmul (plus a SiLU) per block;
- the FiLM scale is produced as a gain ``1 + scale`` directly (its bias starts at 1), so the
  modulation is one fused ``addcmul``;
- attention uses one fused QKV projection and ``F.scaled_dot_product_attention``; text tokens are
  attended in the same call, their keys/values concatenated to the image's (GLIDE-style);
- no data-dependent Python control flow, no host syncs: the forward compiles to one graph;
- memory-format agnostic: with ``channels_last`` inputs every layer keeps that layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal embedding of a (time or noise-level) scalar, as in figure 12.5 / 18.9.

    ``[cos(t w_0), ..., cos(t w_{d/2-1}), sin(t w_0), ...]`` with ``w_k = max_period^(-k/(d/2))``.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"a sinusoidal embedding needs an even width, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        args = t.to(torch.float32)[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class EmbeddingMLP(nn.Sequential):
    """The shallow network that maps a sinusoidal embedding to the block embedding (fig. 18.9)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))


class FiLMProjection(nn.Module):
    """One linear map from the conditioning embedding to every residual block's (gain, shift).

    Blocks register their width with :meth:`allocate` at construction and read their slice of the
    output with :meth:`ResBlock.forward`'s ``film`` argument (views, no copies).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self._widths: list[int] = []
        self.linear: nn.Linear | None = None

    def allocate(self, channels: int) -> int:
        """Reserve ``2 * channels`` outputs (gain, shift) and return their offset."""
        if self.linear is not None:
            raise RuntimeError("FiLMProjection.allocate after build()")
        offset = 2 * sum(self._widths)
        self._widths.append(channels)
        return offset

    def build(self) -> None:
        self.linear = nn.Linear(self.embed_dim, 2 * sum(self._widths))
        with torch.no_grad():
            # gain = 1 + scale: start the gains' bias at 1 and the shifts' at 0.
            bias = self.linear.bias
            bias.zero_()
            offset = 0
            for c in self._widths:
                bias[offset : offset + c] = 1.0
                offset += 2 * c

    def forward(self, emb: Tensor) -> Tensor:
        assert self.linear is not None, "call build() after the blocks are constructed"
        return self.linear(F.silu(emb))


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class ResBlock(nn.Module):
    """Residual block with FiLM time conditioning (fig. 18.9):

    ``h = conv1(SiLU(GN(x)))``, ``h = conv2(dropout(SiLU(GN(h) * gain + shift)))``,
    ``out = skip(x) + h`` with ``(gain, shift)`` from the time/condition embedding.
    ``conv2`` starts at zero, so every block starts as the identity (or a 1x1 projection).
    """

    def __init__(self, in_ch: int, out_ch: int, film: FiLMProjection, groups: int, dropout: float):
        super().__init__()
        self.out_ch = out_ch
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = _dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.film_offset = film.allocate(out_ch)

    def forward(self, x: Tensor, film: Tensor) -> Tensor:
        c = self.out_ch
        gain = film[:, self.film_offset : self.film_offset + c, None, None]
        shift = film[:, self.film_offset + c : self.film_offset + 2 * c, None, None]
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(torch.addcmul(shift, self.norm2(h), gain))
        h = self.conv2(self.dropout(h))
        # conv2's output is not needed by its backward: add the skip in place.
        return h.add_(self.skip(x))


class Attention(nn.Module):
    """Global self-attention over the pixels (fig. 18.9), optionally also over text tokens.

    Image queries attend to the image's keys/values and, when a ``context`` is given, to the
    projected text-token keys/values concatenated after them; ``context_mask`` ([B, L] bool, True
    = attend) masks padding and dropped conditions. One ``scaled_dot_product_attention`` call.
    """

    def __init__(self, channels: int, head_channels: int, groups: int, context_dim: int | None):
        super().__init__()
        self.heads = channels // head_channels
        self.head_channels = head_channels
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]; a view for channels_last
        q, k, v = (
            self.qkv(tokens)
            .unflatten(-1, (3, self.heads, self.head_channels))
            .permute(2, 0, 3, 1, 4)
        )  # each [B, heads, HW, d]
        mask = None
        if self.context_kv is not None and context is not None:
            ck, cv = (
                self.context_kv(context)
                .unflatten(-1, (2, self.heads, self.head_channels))
                .permute(2, 0, 3, 1, 4)
            )
            k = torch.cat([k, ck], dim=2)
            v = torch.cat([v, cv], dim=2)
            if context_mask is not None:
                mask = torch.cat([context_mask.new_ones(B, H * W), context_mask], dim=1)
                mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, HW, d]
        out = self.proj(out.transpose(1, 2).flatten(2))  # [B, HW, C]
        return x + out.transpose(1, 2).unflatten(2, (H, W))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """A residual block, followed by attention at the levels that have it."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        film: FiLMProjection,
        *,
        groups: int,
        dropout: float,
        attention: bool,
        head_channels: int,
        context_dim: int | None,
    ):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, film, groups, dropout)
        self.attn = Attention(out_ch, head_channels, groups, context_dim) if attention else None

    def forward(
        self, x: Tensor, film: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> Tensor:
        x = self.res(x, film)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x
