"""Reference features of the held-out images, computed once per dataset version and cached.

FID and KID compare a cascade's samples with the held-out images. The held-out side depends only
on the dataset version, the number of images, the cascade's top resolution (images are
area-downsampled to it) and the feature extractor, so it is computed once and kept. The cache
keeps *features*, not FID's (mean, covariance): KID needs the features themselves, and a prefix
of them serves any smaller sample count.

One file per (dataset version, resolution, extractor):
``<cache_dir>/<dataset_version>/inception-<hash of extractor id>-<R>px.npz`` holding
``features`` (float32 [M, 2048]) of the first M held-out images in split order, their ``keys``
and the extractor ``id``. A request for n <= M images reads the first n rows; a request for more
computes the missing rows only and rewrites the file (atomically). The dataset is immutable and
its version names its content, so an entry never goes stale; a file whose keys or extractor do
not match (a damaged or foreign file) is recomputed, never trusted.

Default location: ``$CASCADE_EVAL_CACHE``, else ``$XDG_CACHE_HOME/cascade-diffusion/eval``
(``~/.cache/...``). Never inside the dataset folder, which is immutable.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion_core.storage import write_bytes_atomic

Tensor = torch.Tensor
CACHE_ENV = "CASCADE_EVAL_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cascade-diffusion" / "eval"


def cache_path(
    cache_dir: str | os.PathLike[str], version: str, extractor_id: str, res: int
) -> Path:
    tag = hashlib.sha256(extractor_id.encode()).hexdigest()[:12]
    return Path(cache_dir) / version / f"inception-{tag}-{res}px.npz"


@dataclass(frozen=True)
class ReferenceFeatures:
    features: Tensor  # float32 [n, dim]
    status: str  # "hit", "extended" or "computed"
    computed: int  # rows computed now (0 on a hit)
    seconds: float  # time spent computing them
    path: str


def _load(path: Path, extractor_id: str, keys: Sequence[str]) -> np.ndarray | None:
    """The cached rows whose keys are a prefix of ``keys`` (None if unusable)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["id"]) != extractor_id:
                return None
            cached_keys, feats = list(z["keys"]), z["features"]
    except (OSError, ValueError, KeyError):
        return None
    m = min(len(cached_keys), len(keys))
    if feats.shape[0] != len(cached_keys) or cached_keys[:m] != list(keys[:m]):
        return None
    return feats[:m]


def _save(path: Path, extractor_id: str, keys: Sequence[str], feats: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, id=np.array(extractor_id), keys=np.array(list(keys)), features=feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(str(path), buf.getvalue())


def reference_features(
    images: Tensor,
    keys: Sequence[str],
    *,
    version: str,
    resolution: int,
    extractor: Callable[..., Tensor],
    extractor_id: str,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReferenceFeatures:
    """Features of the held-out ``images`` (uint8 [n, R, R, 3] at ``resolution``, in split order,
    named by ``keys``), from the cache where it has them; the cache is extended with the rest."""
    import time

    if len(keys) != images.shape[0]:
        raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
    path = cache_path(cache_dir or default_cache_dir(), version, extractor_id, resolution)
    cached = _load(path, extractor_id, keys) if path.is_file() else None
    have = 0 if cached is None else cached.shape[0]
    n = len(keys)
    if have >= n:
        assert cached is not None
        return ReferenceFeatures(torch.from_numpy(cached[:n].copy()), "hit", 0, 0.0, str(path))
    t = time.perf_counter()

    def shifted(done: int, total: int) -> None:
        if progress is not None:
            progress(have + done, n)

    new = extractor(images[have:], progress=shifted).numpy().astype(np.float32)
    seconds = time.perf_counter() - t
    feats = new if cached is None else np.concatenate([cached, new])
    _save(path, extractor_id, keys, feats)
    status = "computed" if have == 0 else "extended"
    return ReferenceFeatures(torch.from_numpy(feats), status, n - have, seconds, str(path))
