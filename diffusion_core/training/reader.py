"""The training data reader: step-addressable batches from the ingest's webdataset shards.

Why not a streaming reader (Ray Data ``read_webdataset`` → ``get_dataset_shard`` or webdataset's
shard splitter)? Resuming must give the same result as an uninterrupted run, so the batch of
every step has to be a pure function of ``(seed, step, rank)``. Ray Data's ``streaming_split``
hands blocks to whichever worker asks first, and a shard splitter with a shuffle buffer can only
be resumed by replaying the stream from the start. Both also cost CPU that, on a small machine,
the training step needs more.

So the shards are *indexed* instead: every tar member's byte range is read once from the tar
headers (no pixel is decoded), and a sample is then one seek + read per member. The order is an
epoch-wise permutation of all samples, seeded by ``(seed, epoch)``; global step ``s`` takes
positions ``[(s-1)·G, s·G)`` of the concatenated epochs (``G`` = global batch) and rank ``r``
takes its contiguous ``G/W`` slice of those. Each sample is seen exactly once per epoch across
the ranks, any step can be read directly (a resume skips nothing and reads nothing twice), and a
background thread decodes a few batches ahead of the step.

Samples: ``<key>.png`` (RGB at the dataset's resolution), ``<key>.txt`` (caption), ``<key>.json``
(with ``caption_tokens``, the caption's token count), ``<key>.emb.npy`` (pooled embedding,
float32 [dim]) and ``<key>.tok.npy`` (token states, float16 [max_tokens, dim], zero-padded).
"""

from __future__ import annotations

import io
import json
import queue
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_core.data.format import DataError, DatasetInfo
from diffusion_core.data.tario import split_member_name
from diffusion_core.storage import join, open_file

REQUIRED_MEMBERS = ("png", "emb.npy", "tok.npy", "json")


# ============================================================================ index and reading
@dataclass(frozen=True)
class _Sample:
    shard: int
    key: str
    members: dict[str, tuple[int, int]]  # ext -> (offset, size)


def index_shard(path: str, shard: int) -> list[_Sample]:
    """Byte ranges of every sample's members in one (uncompressed) webdataset tar."""
    samples: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    with open_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            samples.setdefault(key, {})[ext] = (info.offset_data, info.size)
    out = []
    for key, members in samples.items():
        missing = [m for m in REQUIRED_MEMBERS if m not in members]
        if missing:
            raise DataError(f"sample {key!r} in {path} lacks members {missing}")
        out.append(_Sample(shard, key, members))
    return out


class ShardReader:
    """Random access to the samples of a dataset's shards (one per worker process)."""

    def __init__(self, info: DatasetInfo, max_open: int = 16):
        self.info = info
        self.paths = [join(info.path, name) for name, _ in info.shards]
        self.samples: list[_Sample] = []
        for i, (p, (name, count)) in enumerate(zip(self.paths, info.shards, strict=True)):
            found = index_shard(p, i)
            if len(found) != count:
                raise DataError(
                    f"shard {name} holds {len(found)} samples but the manifest says {count}: "
                    "the dataset changed since it was ingested; re-run the ingest"
                )
            self.samples.extend(found)
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _file(self, shard: int) -> Any:
        f = self._files.get(shard)
        if f is None:
            f = open_file(self.paths[shard])
            self._files[shard] = f
            while len(self._files) > self._max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def read_raw(self, index: int) -> tuple[str, dict[str, bytes]]:
        s = self.samples[index]
        with self._lock:
            f = self._file(s.shard)
            out = {}
            for ext, (offset, size) in s.members.items():
                f.seek(offset)
                out[ext] = f.read(size)
        return s.key, out

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Decode and collate samples: the batch dict of :func:`diffusion_core.cascade.stage_losses`."""
        images, pooled, tokens, masks, keys, captions = [], [], [], [], [], []
        for i in indices:
            key, raw = self.read_raw(int(i))
            with Image.open(io.BytesIO(raw["png"])) as im:
                images.append(np.asarray(im.convert("RGB")))
            pooled.append(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False))
            tok = np.load(io.BytesIO(raw["tok.npy"]), allow_pickle=False)
            meta = json.loads(raw["json"])
            n = meta.get("caption_tokens")
            mask = np.zeros(tok.shape[0], bool)
            if n is None:  # fall back on the zero padding
                mask[:] = np.abs(tok).sum(-1) > 0
            else:
                mask[: min(int(n), tok.shape[0])] = True
            tokens.append(tok)
            masks.append(mask)
            keys.append(key)
            captions.append(raw["txt"].decode("utf-8") if "txt" in raw else meta.get("caption", ""))
        return {
            "image": torch.from_numpy(np.stack(images)),
            "text_pooled": torch.from_numpy(np.stack(pooled).astype(np.float32)),
            "text_tokens": torch.from_numpy(np.stack(tokens).astype(np.float32)),
            "text_mask": torch.from_numpy(np.stack(masks)),
            "key": keys,
            "caption": captions,
        }


# ============================================================================ the order
class StepSampler:
    """Which samples step ``s`` (1-based) gives rank ``r``: a pure function of (seed, s, r)."""

    def __init__(self, num_samples: int, global_batch: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} not divisible by {world_size} workers")
        self.n = num_samples
        self.global_batch = global_batch
        self.world_size = world_size
        self.per_rank = global_batch // world_size
        self.seed = seed
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perms[epoch] = p
            while len(self._perms) > 3:
                self._perms.popitem(last=False)
        return p

    def indices(self, step: int, rank: int) -> np.ndarray:
        if step < 1 or not 0 <= rank < self.world_size:
            raise ValueError(
                f"step must be >= 1 and rank in [0, {self.world_size}): {step}, {rank}"
            )
        start = (step - 1) * self.global_batch + rank * self.per_rank
        pos = np.arange(start, start + self.per_rank)
        epochs, offsets = np.divmod(pos, self.n)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def epoch_of(self, step: int) -> float:
        return (step * self.global_batch) / self.n


def iter_batches(
    reader: ShardReader,
    sampler: StepSampler,
    *,
    rank: int,
    first_step: int,
    last_step: int,
    prefetch: int = 4,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(step, batch)`` for steps ``first_step..last_step``, decoded ``prefetch`` steps ahead by a
    background thread (errors in it are raised here)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for step in range(first_step, last_step + 1):
                batch = reader.read_batch(sampler.indices(step, rank))
                while not stop.is_set():
                    try:
                        q.put((step, batch), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
