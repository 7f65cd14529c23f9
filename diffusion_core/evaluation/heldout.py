"""Held-out data: the dataset's evaluation split (images, captions, caption embeddings).

- :func:`read_heldout` reads the first n samples of a dataset's evaluation split (the
  ``eval-*.tar`` shards the ingest holds out by a hash of the key, ``docs/data.md``): images,
  captions and their precomputed caption embeddings. :class:`HeldOutTextEncoder` serves those
  embeddings to a cascade in place of its text encoder (when the encoder is the dataset's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion_core.data.format import DataError, DatasetInfo, verify_shards
from diffusion_core.text import TextEmbeddings, normalize_caption

Tensor = torch.Tensor


@dataclass(frozen=True)
class HeldOut:
    """The first n samples of the evaluation split, in split order."""

    info: DatasetInfo  # the evaluation split's view (``info.split == "eval"``)
    keys: list[str]
    captions: list[str]
    images: Tensor  # uint8 [n, R, R, 3] at the dataset's resolution
    text: dict[str, Tensor]  # text_pooled [n, d], text_tokens [n, T, d], text_mask [n, T]

    def __len__(self) -> int:
        return len(self.keys)


def read_heldout(info: DatasetInfo, n: int, *, verify: bool = True) -> HeldOut:
    """The first ``n`` held-out samples of a dataset (``info`` from ``read_manifest`` /
    ``dataset_info``); raises :class:`DataError` when it has no evaluation split or fewer than
    ``n`` held-out samples. ``verify`` checks the evaluation shards' sha256 first."""
    from diffusion_core.training.reader import ShardReader  # the one shard reader

    split = info.eval_split()
    if split.num_samples < n:
        raise DataError(
            f"dataset {info.path!r} holds {split.num_samples} held-out samples, {n} asked for; "
            "evaluate fewer (--num-samples) or re-ingest with a larger --eval-fraction/--eval-max"
        )
    if verify:
        verify_shards(split)
    reader = ShardReader(split)
    try:
        batch = reader.read_batch(range(n))
    finally:
        reader.close()
    return HeldOut(
        info=split,
        keys=list(batch["key"]),
        captions=list(batch["caption"]),
        images=batch["image"],
        text={k: batch[k] for k in ("text_pooled", "text_tokens", "text_mask")},
    )


class HeldOutTextEncoder:
    """A text encoder that answers from the ingest's precomputed embeddings of known captions.

    ``tokens`` are cut to ``max_tokens`` (the cascade's count): the ingest's encoder computes the
    token states of the whole caption and keeps the first ones, so the first ``max_tokens`` equal
    what the cascade's own encoder would give (to the float16 rounding of the stored states).
    """

    def __init__(self, heldout: HeldOut, *, encoder_id: str, max_tokens: int | None = None):
        pooled, tokens, mask = (
            heldout.text[k] for k in ("text_pooled", "text_tokens", "text_mask")
        )
        t = tokens.shape[1] if max_tokens is None else min(max_tokens, tokens.shape[1])
        self.id, self.dim, self.max_tokens = encoder_id, int(pooled.shape[1]), t
        self._rows = {normalize_caption(c): i for i, c in enumerate(heldout.captions)}
        self._pooled, self._tokens, self._mask = pooled, tokens[:, :t], mask[:, :t]

    def encode(self, captions: Sequence[str], batch_size: int = 8) -> TextEmbeddings:
        rows = []
        for c in captions:
            key = normalize_caption(c)
            if key not in self._rows:
                raise KeyError(f"caption {c!r} is not among the held-out captions")
            rows.append(self._rows[key])
        idx = torch.tensor(rows, dtype=torch.long)
        mask = self._mask[idx]
        return TextEmbeddings(
            self._pooled[idx].float(),
            self._tokens[idx].float() * mask[..., None],
            mask,
            mask.sum(1).long(),
        )

