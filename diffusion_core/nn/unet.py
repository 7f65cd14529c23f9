"""The denoising U-Net of figure 18.9 and the noisy-image classifier of eq. 18.40.

``UNet(config)(z_t, t, **conditioning) -> eps_hat`` (or 2C channels with a learned variance).
Conditioning (sections 18.6.3-18.6.4), all optional keyword tensors:

- ``label`` [B] long: class labels; ``-1`` is the null class.
- ``text_pooled`` [B, D], ``text_tokens`` [B, L, D], ``text_mask`` [B, L] bool: a sentence
  encoder's output. The pooled embedding is added to the time embedding; the tokens are attended by
  every attention layer. A row whose mask is all False (the encoder's empty caption) is the null
  condition.
- ``cond_drop`` [B] bool: replace the condition (label and text) by the learned null embedding;
  training sets it with probability p (classifier-free guidance), sampling sets it for the
  unconditional half.
- ``low_res`` [B, C, h, w] and ``aug_level`` [B]: super-resolution stages; the low-resolution image
  (already noise-augmented) is upsampled and concatenated to z_t, and its augmentation level is
  embedded like the time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_core.nn.config import BackboneConfig, ClassifierConfig, UNetConfig
from diffusion_core.nn.layers import (
    Block,
    Downsample,
    EmbeddingMLP,
    FiLMProjection,
    SinusoidalEmbedding,
    Upsample,
)


class DownLevel(nn.Module):
    def __init__(self, blocks: list[Block], down: Downsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.down = down


class UpLevel(nn.Module):
    def __init__(self, blocks: list[Block], up: Upsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.up = up


class Encoder(nn.Module):
    """The downsampling half of the U-Net and its middle block (shared with the classifier).

    Returns the middle features and the skip connections (every block's and downsampler's output,
    after the input convolution), in the order the decoder pops them.
    """

    def __init__(
        self, cfg: BackboneConfig, in_channels: int, film: FiLMProjection, context_dim: int | None
    ):
        super().__init__()
        widths, g = cfg.widths, cfg.norm_groups
        common = dict(groups=g, dropout=cfg.dropout, head_channels=cfg.head_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.skip_channels = [widths[0]]
        ch = widths[0]
        levels = []
        for i, (w, depth) in enumerate(zip(widths, cfg.depths, strict=True)):
            attn = cfg.attention_at(i)
            blocks = []
            for _ in range(depth):
                blocks.append(Block(ch, w, film, attention=attn, context_dim=context_dim, **common))
                ch = w
                self.skip_channels.append(ch)
            down = None
            if i < cfg.levels - 1:
                down = Downsample(ch)
                self.skip_channels.append(ch)
            levels.append(DownLevel(blocks, down))
        self.levels = nn.ModuleList(levels)
        self.mid1 = Block(
            ch, ch, film, attention=cfg.mid_attention, context_dim=context_dim, **common
        )
        self.mid2 = Block(ch, ch, film, attention=False, context_dim=None, **common)
        self.out_channels = ch

    def forward(
        self, x: Tensor, film: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> tuple[Tensor, list[Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for level in self.levels:
            for block in level.blocks:
                h = block(h, film, context, context_mask)
                skips.append(h)
            if level.down is not None:
                h = level.down(h)
                skips.append(h)
        h = self.mid1(h, film, context, context_mask)
        h = self.mid2(h, film, None, None)
        return h, skips


class UNet(nn.Module):
    """Noise predictor g[z_t, t, c] (figure 18.9, section 18.6.1); see the module docstring."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = UNetConfig.model_validate(config)
        E, widths, g = cfg.time_embed_dim, cfg.widths, cfg.norm_groups
        self.time_embed = SinusoidalEmbedding(cfg.base_channels)
        self.time_mlp = EmbeddingMLP(cfg.base_channels, E)
        self.aug_mlp = EmbeddingMLP(cfg.base_channels, E) if cfg.is_super_resolution else None
        # Class labels: index num_classes is the learned null class.
        self.label_embed = nn.Embedding(cfg.num_classes + 1, E) if cfg.num_classes else None
        context_dim = None
        if cfg.text_dim:
            D = cfg.text_dim
            self.text_pooled_proj = nn.Linear(D, E)
            # The learned null condition, in the encoder's space (pooled and one token).
            self.null_text_pooled = nn.Parameter(torch.randn(D) / D**0.5)
            if cfg.text_cross_attention:
                self.null_text_token = nn.Parameter(torch.randn(1, 1, D) / D**0.5)
                self.context_norm = nn.LayerNorm(D)
                context_dim = D
        self.film = FiLMProjection(E)
        in_ch = cfg.in_channels * (2 if cfg.is_super_resolution else 1)
        self.encoder = Encoder(cfg, in_ch, self.film, context_dim)
        skip = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        common = dict(groups=g, dropout=cfg.dropout, head_channels=cfg.head_channels)
        levels = []
        for i in reversed(range(cfg.levels)):
            w, attn = widths[i], cfg.attention_at(i)
            blocks = []
            for _ in range(cfg.depths[i] + 1):
                blocks.append(
                    Block(
                        ch + skip.pop(),
                        w,
                        film=self.film,
                        attention=attn,
                        context_dim=context_dim,
                        **common,
                    )
                )
                ch = w
            levels.append(UpLevel(blocks, Upsample(ch) if i > 0 else None))
        self.decoder = nn.ModuleList(levels)
        self.film.build()
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.output_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # ------------------------------------------------------------------ conditioning
    def _null_rows(self, cond_drop: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if cond_drop is None:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        if cond_drop.shape != (batch,):
            raise ValueError(f"cond_drop must have shape [{batch}], got {tuple(cond_drop.shape)}")
        return cond_drop.to(device=device, dtype=torch.bool)

    def _embed(
        self,
        t: Tensor,
        batch: int,
        drop: Tensor,
        label: Tensor | None,
        text_pooled: Tensor | None,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        aug_level: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        cfg = self.config
        emb = self.time_mlp(self.time_embed(t.expand(batch) if t.ndim == 0 else t))
        if self.aug_mlp is not None:
            if aug_level is None:
                aug_level = torch.zeros(batch, device=emb.device)
            emb = emb + self.aug_mlp(self.time_embed(aug_level))
        if self.label_embed is not None:
            null = torch.full((batch,), cfg.num_classes, dtype=torch.long, device=emb.device)
            if label is None:
                idx = null
            else:
                label = label.to(emb.device).long()
                idx = torch.where(drop | (label < 0), null, label)
            emb = emb + self.label_embed(idx)
        context = context_mask = None
        if cfg.text_dim:
            # Rows without a caption (mask all False, or no tokens and a zero pooled vector) are null.
            if text_mask is not None:
                drop = drop | ~text_mask.any(dim=1)
            elif text_pooled is not None:
                drop = drop | (text_pooled == 0).all(dim=1)
            else:
                drop = torch.ones_like(drop)
            null_pooled = self.null_text_pooled.to(emb.dtype).expand(batch, -1)
            pooled = (
                null_pooled
                if text_pooled is None
                else torch.where(drop[:, None], null_pooled, text_pooled.to(emb.dtype))
            )
            emb = emb + self.text_pooled_proj(pooled)
            if cfg.text_cross_attention:
                null_token = self.null_text_token.to(emb.dtype).expand(batch, -1, -1)
                if text_tokens is None:
                    context = null_token
                else:
                    context = torch.cat([null_token, text_tokens.to(emb.dtype)], dim=1)
                    keep = ~drop[:, None]
                    if text_mask is not None:
                        keep = keep & text_mask.to(torch.bool)
                    else:
                        keep = keep.expand(batch, text_tokens.shape[1])
                    context_mask = torch.cat([keep.new_ones(batch, 1), keep], dim=1)
                context = self.context_norm(context)
        return emb, context, context_mask

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        z_t: Tensor,
        t: Tensor,
        *,
        label: Tensor | None = None,
        text_pooled: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        low_res: Tensor | None = None,
        aug_level: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        B = z_t.shape[0]
        if z_t.ndim != 4 or z_t.shape[1] != cfg.in_channels:
            raise ValueError(f"z_t must be [B, {cfg.in_channels}, H, W], got {tuple(z_t.shape)}")
        x = z_t
        if cfg.is_super_resolution:
            if low_res is None:
                raise ValueError(
                    "this is a super-resolution U-Net: pass low_res=[B, C, h, w] (noise-augmented)"
                    " and aug_level=[B]"
                )
            up = F.interpolate(
                low_res.to(z_t.dtype), size=z_t.shape[-2:], mode="bilinear", align_corners=False
            )
            x = torch.cat([z_t, up], dim=1)
        drop = self._null_rows(cond_drop, B, z_t.device)
        emb, context, context_mask = self._embed(
            t, B, drop, label, text_pooled, text_tokens, text_mask, aug_level
        )
        film = self.film(emb)
        h, skips = self.encoder(x, film, context, context_mask)
        for level in self.decoder:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), film, context, context_mask)
            if level.up is not None:
                h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class NoisyClassifier(nn.Module):
    """Classifier Pr(c|z_t) on noisy images for classifier guidance (eq. 18.40).

    The U-Net's downsampling half and middle block (time-conditioned like the U-Net, shared
    across timesteps), then GroupNorm, SiLU, a spatial mean and a linear head to class logits.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = cfg = ClassifierConfig.model_validate(config)
        E = cfg.time_embed_dim
        self.time_embed = SinusoidalEmbedding(cfg.base_channels)
        self.time_mlp = EmbeddingMLP(cfg.base_channels, E)
        self.film = FiLMProjection(E)
        self.encoder = Encoder(cfg, cfg.in_channels, self.film, None)
        self.film.build()
        ch = self.encoder.out_channels
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.head = nn.Linear(ch, cfg.num_classes)

    def forward(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Class logits [B, num_classes]."""
        t = t.expand(z_t.shape[0]) if t.ndim == 0 else t
        film = self.film(self.time_mlp(self.time_embed(t)))
        h, _ = self.encoder(z_t, film, None, None)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))

    def log_prob_grad(self, z_t: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """d log Pr(c|z_t) / d z_t, the guidance direction of eq. 18.40 (same shape as z_t)."""
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            log_probs = torch.log_softmax(self(z, t).float(), dim=-1)
            selected = log_probs.gather(1, label.long().view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(selected, z)
        return grad
