"""The dataset format in one place (``docs/data.md``): names, the manifest schema, its writer, its reader.

A dataset is a folder of webdataset shards: the training split (``shard-NNNNNN.tar``) and the
held-out evaluation split (``eval-NNNNNN.tar``, chosen by :func:`in_eval_split`), plus
``rejected.jsonl`` and ``manifest.json``. The manifest is written last and atomically: a folder is a complete dataset
iff it has one, and from then on the folder is immutable (the ingest refuses to write into it
without ``overwrite``). ``dataset_version`` is the sha256 of the manifest's canonical content
(everything but ``sources``), so it names the content, not where the input lay.

Writers: the ingest (:func:`build_manifest`, :func:`write_manifest`). Readers: training and
evaluation (:func:`read_manifest` → :class:`DatasetInfo`, :func:`check_dataset_for_stage`,
:func:`verify_shards`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from diffusion_core.data.tario import HashingReader, split_member_name
from diffusion_core.storage import filesystem, join, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
EVAL_SHARD_PATTERN = "eval-%06d.tar"
EVAL_SHARD_RE = re.compile(r"^eval-(\d{6})\.tar$")
SPLIT_RULE = "sha256(key)[:8] as a big-endian integer < eval_fraction * 2**64, first eval_max"
# every sample's members, in the order they are written
MEMBERS = ("png", "txt", "json", "emb.npy", "tok.npy")


class DataError(ValueError):
    """A dataset that cannot be used (trained on, evaluated): what is wrong and what to do."""


# ============================================================================ the split


def split_hash(key: str) -> int:
    """The key's position in the split order: the first 8 bytes of sha256(key), an integer in
    [0, 2**64). A pure function of the key, so a sample keeps its split when data are added."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Whether a sample's key falls below the evaluation threshold (before the cap ``eval_max``,
    which the ingest applies in input order: ``docs/data.md``, "The evaluation split")."""
    return split_hash(key) < int(eval_fraction * 2**64)


# ============================================================================ writing


def dataset_version(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest's content (without ``sources``)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def build_manifest(
    *,
    resolution: int,
    text_encoder: dict[str, Any],
    validation: dict[str, Any],
    shard_size: int,
    shards: list[dict[str, Any]],
    counts: dict[str, Any],
    rejected_sha256: str,
    sources: list[str],
    eval_shards: list[dict[str, Any]] | None = None,
    split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a finished ingest. ``shards`` (the training split) and ``eval_shards``
    (the evaluation split): ``{name, samples, sha256, bytes}`` each; ``counts``: ``{read,
    accepted, rejected, rejected_by_reason}``; ``split``: ``{rule, eval_fraction, eval_max,
    train, eval}`` (``accepted = train + eval``)."""
    content = {
        "schema_version": SCHEMA_VERSION,
        "format": {
            "shard_pattern": SHARD_PATTERN,
            "eval_shard_pattern": EVAL_SHARD_PATTERN,
            "members": list(MEMBERS),
            "image": {"format": "png", "mode": "RGB", "resolution": resolution},
            "emb.npy": {"dtype": "float32", "shape": "[dim]"},
            "tok.npy": {"dtype": "float16", "shape": "[max_tokens, dim]"},
        },
        "resolution": resolution,
        "text_encoder": text_encoder,
        "validation": validation,
        "shard_size": shard_size,
        "shards": shards,
        "eval_shards": list(eval_shards or []),
        "split": split or {},
        "counts": counts,
        "rejected_file": {"name": REJECTED, "sha256": rejected_sha256},
    }
    return {"dataset_version": dataset_version(content), **content, "sources": list(sources)}


def write_manifest(out: str, manifest: dict[str, Any]) -> str:
    """Write ``out/manifest.json`` atomically (the last file of a dataset); return its path."""
    path = join(out, MANIFEST)
    write_json_atomic(path, manifest)
    return path


# ============================================================================ reading


@dataclass(frozen=True)
class DatasetInfo:
    """What a job needs to know of a dataset, from its ``manifest.json``.

    ``shards`` are the shards of one split, ``split``: the training split as read by
    :func:`read_manifest` (what training reads, unchanged by the evaluation split), or the
    evaluation split in the view :meth:`eval_split` returns (what evaluation reads). The
    ``eval_*`` fields list the evaluation shards of the dataset as a whole.
    """

    path: str
    version: str
    resolution: int
    text_encoder_name: str | None
    text_encoder_id: str | None
    max_tokens: int | None
    shards: tuple[tuple[str, int], ...]  # (file name, sample count)
    shard_sha256: tuple[str | None, ...] = ()  # per shard, as the manifest records it
    shard_bytes: tuple[int | None, ...] = ()
    eval_shards: tuple[tuple[str, int], ...] = ()
    eval_shard_sha256: tuple[str | None, ...] = ()
    eval_shard_bytes: tuple[int | None, ...] = ()
    eval_fraction: float | None = None  # None: ingested before the split existed
    eval_max: int | None = None
    split: str = "train"

    @property
    def num_samples(self) -> int:
        """Samples in ``shards`` (the training split, or the evaluation split of the view)."""
        return sum(n for _, n in self.shards)

    @property
    def num_eval_samples(self) -> int:
        return sum(n for _, n in self.eval_shards)

    def eval_split(self) -> DatasetInfo:
        """The evaluation split as a dataset of its own: ``shards`` are the ``eval-*.tar``
        shards, so any reader of :attr:`shards` reads the held-out samples only."""
        if self.split == "eval":
            return self
        if not self.eval_shards:
            why = (
                "it was ingested before datasets had one"
                if self.eval_fraction is None
                else f"--eval-fraction {self.eval_fraction} selected no sample"
            )
            raise DataError(
                f"dataset {self.path!r} has no evaluation split ({why}); re-ingest it with "
                "`cascade ingest ... --eval-fraction F` (default 0.02)"
            )
        return DatasetInfo(
            path=self.path,
            version=self.version,
            resolution=self.resolution,
            text_encoder_name=self.text_encoder_name,
            text_encoder_id=self.text_encoder_id,
            max_tokens=self.max_tokens,
            shards=self.eval_shards,
            shard_sha256=self.eval_shard_sha256,
            shard_bytes=self.eval_shard_bytes,
            eval_fraction=self.eval_fraction,
            eval_max=self.eval_max,
            split="eval",
        )


def load_manifest(path: str) -> dict[str, Any]:
    """The raw ``<path>/manifest.json`` (local path or fsspec URL), or :class:`DataError`."""
    path = str(path)
    fs, root = filesystem(path)
    if not fs.exists(root):
        raise DataError(
            f"data folder {path!r} does not exist; run `cascade ingest SOURCE --out {path}` first"
        )
    mpath = join(root, MANIFEST)
    if not fs.exists(mpath):
        raise DataError(
            f"{path!r} has no {MANIFEST}: not a complete dataset (an ingest that did not finish,"
            " or not an ingest output); run `cascade ingest` into it"
        )
    try:
        with fs.open(mpath, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DataError(f"{mpath} cannot be read as JSON: {e}") from e
    if not isinstance(m, dict):
        raise DataError(f"{mpath} holds a JSON {type(m).__name__}, not a dataset manifest")
    return m


def dataset_info(path: str, m: dict[str, Any]) -> DatasetInfo:
    """Parse a loaded manifest (see :func:`load_manifest`) into a :class:`DatasetInfo`."""
    mpath = join(str(path), MANIFEST)
    schema = m.get("schema_version", SCHEMA_VERSION)
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise DataError(
            f"{mpath} has schema_version {schema!r}; this reader knows up to {SCHEMA_VERSION}: "
            "upgrade cascade-diffusion"
        )
    try:
        enc = m.get("text_encoder") or {}
        if isinstance(enc, str):
            enc = {"name": enc, "id": enc}
        shards = m["shards"]
        eval_shards = m.get("eval_shards") or []
        split = m.get("split") or {}
        return DatasetInfo(
            path=str(path),
            version=str(m["dataset_version"]),
            resolution=int(m["resolution"]),
            text_encoder_name=enc.get("name"),
            text_encoder_id=enc.get("id"),
            max_tokens=enc.get("max_tokens"),
            shards=tuple((str(s["name"]), int(s["samples"])) for s in shards),
            shard_sha256=tuple(s.get("sha256") for s in shards),
            shard_bytes=tuple(s.get("bytes") for s in shards),
            eval_shards=tuple((str(s["name"]), int(s["samples"])) for s in eval_shards),
            eval_shard_sha256=tuple(s.get("sha256") for s in eval_shards),
            eval_shard_bytes=tuple(s.get("bytes") for s in eval_shards),
            eval_fraction=None if "eval_fraction" not in split else float(split["eval_fraction"]),
            eval_max=None if split.get("eval_max") is None else int(split["eval_max"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{mpath} is not a dataset manifest this reader understands: {e!r}") from e


def read_manifest(path: str) -> DatasetInfo:
    """Read and check ``<path>/manifest.json`` (local path or fsspec URL): the training split
    (``info.eval_split()`` is the evaluation split)."""
    info = dataset_info(path, load_manifest(path))
    if info.num_samples == 0:
        if info.num_eval_samples:
            raise DataError(
                f"dataset {info.path!r} holds no training samples: all "
                f"{info.num_eval_samples} accepted samples are in the evaluation split; "
                "re-ingest with a smaller --eval-fraction or --eval-max"
            )
        raise DataError(f"dataset {info.path!r} holds no samples (all inputs were rejected?)")
    return info


def check_dataset_for_stage(
    info: DatasetInfo, *, stage: str, resolution: int, text_encoder: str | None, text: bool
) -> None:
    """Fail clearly when a stage cannot train on this dataset (before any worker starts)."""
    if info.resolution < resolution:
        raise DataError(
            f"resolution mismatch: stage {stage!r} trains at {resolution}px but the dataset "
            f"{info.path!r} holds {info.resolution}px images; ingest with --resolution "
            f"{resolution} (the cascade's top resolution) or more"
        )
    if info.resolution % resolution:
        raise DataError(
            f"resolution mismatch: the dataset's {info.resolution}px is not a multiple of stage "
            f"{stage!r}'s {resolution}px (images are area-downsampled by an integer factor)"
        )
    if text and text_encoder is not None:
        # exact: "all-MiniLM-L6-v2" must not accept the embeddings of "all-MiniLM-L6-v2-ft"
        names = {info.text_encoder_name, info.text_encoder_id} - {None}
        if text_encoder not in names:
            raise DataError(
                f"text encoder mismatch: the cascade uses {text_encoder!r} but the dataset's "
                f"embeddings come from {sorted(names)}; re-ingest with that encoder or change "
                "cascade.text_encoder"
            )


def _hash_and_count(fs: Any, path: str) -> tuple[str, int | None]:
    """One pass over a shard: its sha256 and its number of samples (None: not a readable tar)."""
    with fs.open(path, "rb") as f:
        reader = HashingReader(f)
        keys: set[str] = set()
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for m in tf:
                    if m.isfile():
                        keys.add(split_member_name(m.name)[0])
            count: int | None = len(keys)
        except (tarfile.TarError, EOFError, ValueError):
            count = None
        reader.drain()  # the end-of-archive blocks, or the rest after a damaged header
    return reader.hexdigest(), count


def verify_shards(info: DatasetInfo) -> None:
    """Check every shard of both splits against the manifest (size, sha256, sample count);
    raise :class:`DataError` naming the first shard that differs. Reads every shard once."""
    fs, root = filesystem(info.path)
    entries = []
    for shards, shas, sizes in (
        (info.shards, info.shard_sha256, info.shard_bytes),
        (info.eval_shards, info.eval_shard_sha256, info.eval_shard_bytes),
    ):
        n = len(shards)
        entries += zip(shards, shas or (None,) * n, sizes or (None,) * n, strict=True)
    fix = "the dataset changed after it was ingested (or is damaged); re-run the ingest"
    for (name, samples), want, size in entries:
        if not want:
            raise DataError(f"the manifest of {info.path!r} records no sha256 for shard {name}")
        path = join(root, name)
        if not fs.exists(path):
            raise DataError(f"shard {name} of dataset {info.path!r} is missing: {fix}")
        got_size = fs.size(path)
        if size is not None and got_size != size:
            raise DataError(
                f"shard {name} of dataset {info.path!r} has {got_size} bytes, the manifest says "
                f"{size}: {fix}"
            )
        got, count = _hash_and_count(fs, path)
        if got != want:
            raise DataError(
                f"shard {name} of dataset {info.path!r} has sha256 {got}, the manifest says "
                f"{want}: {fix}"
            )
        if count != samples:
            raise DataError(
                f"shard {name} of dataset {info.path!r} holds {count} samples, the manifest says "
                f"{samples}: the manifest was edited; re-run the ingest"
            )
