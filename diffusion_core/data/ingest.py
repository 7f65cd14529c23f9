"""The ingest job: raw image/caption inputs → validated, versioned webdataset shards (``docs/data.md``).

Stages (each a pure function over a pyarrow table, so the Ray Data job and the single-process
loop run the very same code):

1. :func:`read_stage`: one read unit (a tar, or a chunk of files / manifest rows) → raw rows.
2. :func:`process_stage`: caption checks and normalisation, image validation, decode, RGB,
   centre-crop, resize, PNG encode. Bad inputs become rows with a reason.
   (1 and 2 run together, one Ray task per unit; a streaming repartition then slices each unit's
   output into ``batch_size``-row blocks.)
3. :class:`EmbedStage`: caption embeddings with the text encoder (a Ray actor pool).
4. :class:`DatasetWriter` (driver): duplicate keys, the evaluation split (a hash of the key, then
   a cap in input order), shard membership in input order, atomic shard writes (``shard-*.tar``
   for training, ``eval-*.tar`` for evaluation), ``rejected.jsonl`` and ``manifest.json`` (the
   format: :mod:`diffusion_core.data.format`).

Every input file is read through :mod:`diffusion_core.data.safety` (no symlink followed, no path
outside its source, a size cap checked before reading), in the Ray tasks and the local loop alike.

Determinism: units are sorted, rows keep input order (Ray Data ``preserve_order``), and every
per-row result depends on that row alone (the text encoder is batch-invariant), so the same input
gives byte-identical shards, whatever the parallelism, and the same dataset version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffusion_core.data.format import (
    EVAL_SHARD_PATTERN,
    EVAL_SHARD_RE,
    MANIFEST,
    REJECTED,
    SHARD_PATTERN,
    SHARD_RE,
    SPLIT_RULE,
    DataError,
    build_manifest,
    dataset_info,
    in_eval_split,
    load_manifest,
    verify_shards,
    write_manifest,
)
from diffusion_core.data.images import ImageLimits, Rejected, decode_resize, encode_png
from diffusion_core.data.reasons import Reason
from diffusion_core.data.safety import DEFAULT_MAX_FILE_BYTES, ReadPolicy
from diffusion_core.data.sources import SourceError, plan, read_unit
from diffusion_core.data.tario import DeterministicTarWriter
from diffusion_core.errors import JobError
from diffusion_core.ray_env import ensure_ray, worker_env_vars
from diffusion_core.ray_jobs import submission_address
from diffusion_core.storage import (
    PARTIAL_SUFFIX,
    AtomicFile,
    absolute,
    exists,
    filesystem,
    is_uri,
    join,
    listdir,
    makedirs,
    redact,
    remove,
    size,
    storage_env,
)
from diffusion_core.text import normalize_caption

ROWS_PER_BLOCK = 64

RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("image", pa.binary()),
        ("image_name", pa.string()),
        ("caption", pa.binary()),
        ("meta", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
PROCESSED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("png", pa.binary()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("png", pa.binary()),
        ("txt", pa.binary()),
        ("json", pa.binary()),
        ("emb", pa.binary()),
        ("tok", pa.binary()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("encoder_id", pa.string()),
    ]
)


class IngestError(JobError):
    """The ingest could not complete: a bad source, an unwritable output, a failed job
    (``transient``: see :class:`~diffusion_core.errors.JobError`)."""


class IngestConfig(BaseModel):
    """Everything that decides the output of an ingest run (a Prefect/CLI boundary object)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="Raw inputs: paths or fsspec URLs.")
    out: str = Field(description="Output folder (local or a mounted shared filesystem).")
    resolution: int = Field(64, ge=8, le=4096, description="Side of the square output images.")
    shard_size: int = Field(1000, ge=1, description="Samples per output shard.")
    min_size: int = Field(32, ge=1, description="Reject images whose shorter side is smaller.")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Refuse images above this many pixels before decoding."
    )
    max_file_bytes: int = Field(
        DEFAULT_MAX_FILE_BYTES,
        ge=1,
        description="Refuse any input file or tar member larger than this, before reading it.",
    )
    allow_roots: list[str] = Field(
        default_factory=list,
        description="Folders (or URL prefixes) that manifest paths may point into, besides the "
        "manifest's own folder.",
    )
    allow_remote: bool = Field(False, description="Let manifests name fsspec URLs (s3://, ...).")
    overwrite: bool = Field(
        False, description="Replace a complete dataset already in `out` (it is immutable else)."
    )
    text_encoder: str = Field("all-MiniLM-L6-v2", description="Registered text encoder name.")
    max_tokens: int = Field(32, ge=1, le=512, description="Token states kept per caption.")
    eval_fraction: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Share of samples held out for evaluation, by a hash of the sample key "
        "(0 disables the split).",
    )
    eval_max: int = Field(
        1000,
        ge=0,
        description="Cap on the evaluation split: the first this many held-out samples in input "
        "order; the rest of those the hash selects stay in training.",
    )
    batch_size: int = Field(
        256, ge=1, description="Rows per block/batch reaching the text-encoder actors."
    )
    reader_cpus: float = Field(0.5, gt=0, description="CPUs per read/decode task.")
    num_encoders: int = Field(2, ge=1, description="Size of the text-encoder actor pool.")
    encoder_cpus: float = Field(
        0.5, gt=0, description="CPUs per encoder actor (fractional: whole-CPU actors hang on 2 cores, docs/data.md)."
    )

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        v = v.removeprefix("file://")
        if is_uri(v) and not v.startswith(("s3://", "s3a://")):
            raise ValueError(
                f"out={v!r}: shards are written to a local or mounted folder or an s3:// prefix"
            )
        return v.rstrip("/") if is_uri(v) else v

    @field_validator("allow_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[str]) -> list[str]:
        # Made absolute here, on the driver: Ray workers run in another working directory.
        out = []
        for r in roots:
            if not r:
                raise ValueError("allow_roots: an empty path would allow the working directory")
            local = r.startswith("file://") or "://" not in r
            out.append(os.path.abspath(r.removeprefix("file://")) if local else r)
        return out

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(min_size=self.min_size, max_pixels=self.max_pixels)

    @property
    def policy(self) -> ReadPolicy:
        return ReadPolicy(
            max_file_bytes=self.max_file_bytes,
            allow_roots=tuple(self.allow_roots),
            allow_remote=self.allow_remote,
        )


@dataclass
class IngestProgress:
    read: int = 0
    accepted: int = 0  # = train + eval
    rejected: int = 0
    shards: int = 0  # training shards written
    train: int = 0
    eval: int = 0
    eval_shards: int = 0


@dataclass(frozen=True)
class IngestResult:
    out: str
    manifest_path: str
    dataset_version: str
    read: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards: list[dict[str, Any]]
    seconds: float
    train: int = 0
    eval: int = 0
    eval_shards: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------ stages


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def read_stage(batch: pa.Table, policy: ReadPolicy) -> Iterator[pa.Table]:
    """Read units (one JSON string per row in ``unit``) into blocks of raw rows."""
    for unit_json in batch.column("unit").to_pylist():
        buf: list[dict[str, Any]] = []
        for r in read_unit(json.loads(unit_json), policy):
            d = asdict(r)
            d["meta"] = json.dumps(d["meta"], sort_keys=True)
            d["reason"] = str(r.reason) if r.reason is not None else None
            buf.append(d)
            if len(buf) >= ROWS_PER_BLOCK:
                yield _rows_to_table(buf, RAW_SCHEMA)
                buf = []
        if buf:
            yield _rows_to_table(buf, RAW_SCHEMA)


def check_caption(raw: bytes | None) -> str:
    """The normalised caption, or :class:`Rejected`."""
    if raw is None:
        raise Rejected(Reason.MISSING_CAPTION, "no caption (.txt sidecar, member or column)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(Reason.CAPTION_NOT_UTF8, str(e)) from None
    caption = normalize_caption(text)
    if not caption:
        raise Rejected(Reason.EMPTY_CAPTION, f"{len(raw)} bytes of whitespace")
    return caption


def process_one(row: dict[str, Any], resolution: int, limits: ImageLimits) -> dict[str, Any]:
    out = {k: row[k] for k in ("key", "source", "meta", "reason", "detail")}
    out["png"] = out["caption"] = None
    if row["reason"] is not None:
        return out
    try:
        if row["image"] is None:
            raise Rejected(Reason.MISSING_IMAGE, "no image for this key")
        caption = check_caption(row["caption"])
        try:
            img, (w, h) = decode_resize(row["image"], resolution, limits)
        except Rejected:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt image
            raise Rejected(Reason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    except Rejected as r:
        out["reason"], out["detail"] = str(r.reason), r.detail
        return out
    meta = json.loads(row["meta"])
    meta.update(original_width=w, original_height=h, source=row["source"], source_kind=row["kind"])
    out.update(png=encode_png(img), caption=caption, meta=json.dumps(meta, sort_keys=True))
    return out


def process_stage(batch: pa.Table, resolution: int, limits: ImageLimits) -> pa.Table:
    """Validate, decode and resize one batch of raw rows."""
    rows = [process_one(r, resolution, limits) for r in batch.to_pylist()]
    return _rows_to_table(rows, PROCESSED_SCHEMA)


def read_process_stage(
    batch: pa.Table, resolution: int, limits: ImageLimits, policy: ReadPolicy
) -> Iterator[pa.Table]:
    """Stages 1 and 2 in one task per read unit (one tar, or one chunk of files/rows)."""
    for raw in read_stage(batch, policy):
        yield process_stage(raw, resolution, limits)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class EmbedStage:
    """Caption embeddings (a stateful Ray Data actor; also called directly by the local loop)."""

    def __init__(self, encoder: str, max_tokens: int, single_thread: bool = True) -> None:
        import torch

        from diffusion_core.text import load_text_encoder

        if single_thread:
            torch.set_num_threads(1)
        self.encoder = load_text_encoder(encoder, max_tokens=max_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ok = [i for i, r in enumerate(rows) if r["reason"] is None]
        emb = self.encoder.encode([rows[i]["caption"] for i in ok]) if ok else None
        out = []
        for r in rows:
            out.append(
                {
                    "key": r["key"],
                    "source": r["source"],
                    "reason": r["reason"],
                    "detail": r["detail"],
                    "encoder_id": self.encoder.id,
                }
            )
        for j, i in enumerate(ok):
            assert emb is not None
            meta = json.loads(rows[i]["meta"])
            meta.update(key=rows[i]["key"], caption_tokens=int(emb.lengths[j]))
            out[i].update(
                png=rows[i]["png"],
                txt=rows[i]["caption"].encode("utf-8"),
                json=json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                emb=_npy(emb.pooled[j].numpy().astype(np.float32)),
                tok=_npy(emb.tokens[j].numpy().astype(np.float16)),
            )
        return _rows_to_table(out, SAMPLE_SCHEMA)


# ------------------------------------------------------------------------------------ writer


def refuse_existing_dataset(cfg: IngestConfig) -> None:
    """A folder with a manifest is a finished dataset, and immutable: training runs and model
    versions name it by its version. Refuse to write into it unless ``cfg.overwrite``.

    Returning the existing dataset when the new run would reproduce it is not done: its version
    hashes the output bytes (embeddings, PNGs), which only the whole run can tell, and a cheap
    guess (file sizes and mtimes, config) would silently keep a stale dataset after a code or
    data change. A nightly job ingests into a new folder (or passes ``overwrite``).
    """
    if cfg.overwrite or not _present(join(cfg.out, MANIFEST)):
        return
    try:
        version = str(load_manifest(cfg.out).get("dataset_version"))
        what = f"dataset {version}"
    except DataError as e:
        what = f"a {MANIFEST} that cannot be read ({e})"
    raise IngestError(
        f"--out {cfg.out!r} already holds {what}: a dataset folder is immutable once its "
        f"{MANIFEST} is written. Ingest into a new folder, or pass --overwrite "
        "(IngestConfig.overwrite=True) to replace it",
        transient=False,
    )


def _present(path: str) -> bool:
    # locally, a dangling symlink counts too (it would be replaced, not followed)
    return exists(path) if is_uri(path) else os.path.lexists(path)


class _SplitShards:
    """The shards of one split: the next ``shard_size`` samples go into the next shard."""

    def __init__(self, out: str, pattern: str, shard_size: int) -> None:
        self.out, self.pattern, self.shard_size = out, pattern, shard_size
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self._shard: DeterministicTarWriter | None = None

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._shard is None:
            name = self.pattern % len(self.shards)
            self._shard = DeterministicTarWriter(join(self.out, name))
        self._shard.add_sample(key, members)
        self.samples += 1
        if self._shard.count >= self.shard_size:
            self.close()

    def close(self) -> None:
        if self._shard is None:
            return
        w, self._shard = self._shard, None
        sha = w.close()
        self.shards.append(
            {
                "name": w.path.rsplit("/", 1)[-1],
                "samples": w.count,
                "sha256": sha,
                "bytes": size(w.path),
            }
        )

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


class DatasetWriter:
    """Consumes sample rows in input order; writes shards, ``rejected.jsonl``, ``manifest.json``.

    Each accepted sample goes to the evaluation split when its key hashes below
    ``eval_fraction`` (:func:`~diffusion_core.data.format.in_eval_split`) and fewer than
    ``eval_max`` samples are held out yet, else to the training split; each split has its own
    shards (``eval-*.tar``, ``shard-*.tar``), so the training reader sees only its split.

    The manifest is written last, atomically: a folder is a complete dataset iff it has one.
    Starting a run removes any partial file an interrupted run left (and, with ``overwrite``,
    the old manifest first, so that the folder is never a complete dataset half rewritten).
    """

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        makedirs(self.out)
        self._clean_start()
        self.progress = IngestProgress()
        self.by_reason: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.train = _SplitShards(self.out, SHARD_PATTERN, cfg.shard_size)
        self.eval = _SplitShards(self.out, EVAL_SHARD_PATTERN, cfg.shard_size)
        self.encoder_id: str | None = None
        self._rej = AtomicFile(join(self.out, REJECTED))
        self._rej_hash = hashlib.sha256()

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The training split's shards written so far."""
        return self.train.shards

    def _clean_start(self) -> None:
        refuse_existing_dataset(self.cfg)  # again: another run may have finished meanwhile
        manifest = join(self.out, MANIFEST)
        if _present(manifest):
            remove(manifest)
        for name in listdir(self.out):  # (an object store never holds a partial object)
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                remove(join(self.out, name))

    def _reject(self, source: str, reason: str, detail: str) -> None:
        line = json.dumps(
            {"source": source, "reason": reason, "detail": detail},
            sort_keys=True,
            ensure_ascii=False,
        )
        b = (line + "\n").encode("utf-8", errors="backslashreplace")
        self._rej.write(b)
        self._rej_hash.update(b)
        self.by_reason[reason] += 1
        self.progress.rejected += 1

    def consume(self, table: pa.Table) -> None:
        for r in table.to_pylist():
            self.progress.read += 1
            key = r["key"]
            if key:
                if key in self.seen:
                    self._reject(r["source"], Reason.DUPLICATE_KEY, f"key {key!r} seen before")
                    continue
                self.seen.add(key)
            if r["reason"] is not None:
                self._reject(r["source"], r["reason"], r["detail"] or "")
                continue
            self.encoder_id = r["encoder_id"]
            self._add(r)

    def _held_out(self, key: str) -> bool:
        cfg = self.cfg
        return self.eval.samples < cfg.eval_max and in_eval_split(key, cfg.eval_fraction)

    def _add(self, r: dict[str, Any]) -> None:
        split = self.eval if self._held_out(r["key"]) else self.train
        split.add(
            r["key"],
            [
                ("png", r["png"]),
                ("txt", r["txt"]),
                ("json", r["json"]),
                ("emb.npy", r["emb"]),
                ("tok.npy", r["tok"]),
            ],
        )
        p = self.progress
        p.accepted += 1
        p.train, p.eval = self.train.samples, self.eval.samples
        p.shards, p.eval_shards = len(self.train.shards), len(self.eval.shards)

    def abort(self) -> None:
        self.train.abort()
        self.eval.abort()
        self._rej.abort()

    def finish(self) -> dict[str, Any]:
        self.train.close()
        self.eval.close()
        self.progress.shards = len(self.train.shards)
        self.progress.eval_shards = len(self.eval.shards)
        self._rej.commit()
        # shards left by an earlier run that produced more of them
        for p in listdir(self.out):
            for pattern, split in ((SHARD_RE, self.train), (EVAL_SHARD_RE, self.eval)):
                m = pattern.match(p)
                if m and int(m.group(1)) >= len(split.shards):
                    remove(join(self.out, p))
        return self._write_manifest()

    def _write_manifest(self) -> dict[str, Any]:
        cfg = self.cfg
        p = self.progress
        if p.read != p.accepted + p.rejected:  # pragma: no cover - an invariant
            raise IngestError(f"read {p.read} != accepted {p.accepted} + rejected {p.rejected}")
        if p.accepted != p.train + p.eval:  # pragma: no cover - an invariant
            raise IngestError(f"accepted {p.accepted} != train {p.train} + eval {p.eval}")
        manifest = build_manifest(
            resolution=cfg.resolution,
            text_encoder={
                "name": cfg.text_encoder,
                "id": self.encoder_id,
                "max_tokens": cfg.max_tokens,
            },
            validation={
                "min_size": cfg.min_size,
                "max_pixels": cfg.max_pixels,
                "max_file_bytes": cfg.max_file_bytes,
            },
            shard_size=cfg.shard_size,
            shards=self.train.shards,
            eval_shards=self.eval.shards,
            split={
                "rule": SPLIT_RULE,
                "eval_fraction": cfg.eval_fraction,
                "eval_max": cfg.eval_max,
                "train": p.train,
                "eval": p.eval,
            },
            counts={
                "read": p.read,
                "accepted": p.accepted,
                "rejected": p.rejected,
                "rejected_by_reason": dict(sorted(self.by_reason.items())),
            },
            rejected_sha256=self._rej_hash.hexdigest(),
            sources=cfg.sources,
        )
        write_manifest(self.out, manifest)
        return manifest


# ------------------------------------------------------------------------------------ runners


def _check_out(cfg: IngestConfig) -> None:
    out = cfg.out if is_uri(cfg.out) else os.path.realpath(cfg.out)
    for s in cfg.sources:
        if is_uri(s) != is_uri(out):
            continue
        src = s.rstrip("/") if is_uri(s) else os.path.realpath(s.removeprefix("file://"))
        if out == src or out.startswith(src.rstrip("/") + "/"):
            raise IngestError(
                f"--out {cfg.out!r} is inside the source {s!r}: a re-run would read its own "
                "shards; choose an output folder outside the sources"
            )


def _iter_local(units: list[dict[str, Any]], cfg: IngestConfig, single_thread: bool):
    embed = EmbedStage(cfg.text_encoder, cfg.max_tokens, single_thread=single_thread)
    for u in units:
        unit_table = pa.table({"unit": [json.dumps(u, sort_keys=True)]})
        for processed in read_process_stage(unit_table, cfg.resolution, cfg.limits, cfg.policy):
            yield embed(processed)


def _remote_source_env(cfg: IngestConfig) -> dict[str, Any]:
    """Read tasks of object-store sources get this process's endpoint, and its credentials where
    they do not inherit them (:func:`diffusion_core.ray_env.worker_env_vars`: a Ray started
    before they were set, a driver attached from outside the cluster)."""
    if not any(is_uri(s) for s in cfg.sources):
        return {}
    env = worker_env_vars(storage_env())
    return {"runtime_env": {"env_vars": env}} if env else {}


def _iter_ray(units: list[dict[str, Any]], cfg: IngestConfig) -> Iterator[pa.Table]:
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.from_items(
            [{"unit": json.dumps(u, sort_keys=True)} for u in units],
            override_num_blocks=len(units),
        )
        # One task per unit (batch_size=1: a unit is one row), fractional CPUs so that reads
        # run beside the encoder actors on a 2-core machine.
        ds = ds.map_batches(
            read_process_stage,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=cfg.reader_cpus,
            fn_kwargs={"resolution": cfg.resolution, "limits": cfg.limits, "policy": cfg.policy},
            **_remote_source_env(cfg),
        )
        # A unit (say a 10k-sample tar) comes out as one big block; slice it, streaming, so that
        # every encoder actor gets work and memory stays bounded.
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
        ds = ds.map_batches(
            EmbedStage,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            # fixed size: every actor loads its model at the start, in parallel with the reads
            compute=ActorPoolStrategy(size=cfg.num_encoders),
            num_cpus=cfg.encoder_cpus,
            fn_constructor_kwargs={"encoder": cfg.text_encoder, "max_tokens": cfg.max_tokens},
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def ingest(
    cfg: IngestConfig,
    *,
    progress: Callable[[IngestProgress], None] | None = None,
    engine: str = "ray",
    single_thread: bool = True,
) -> IngestResult:
    """Run the ingest. ``engine="ray"`` (the Ray Data job) or ``"local"`` (one process, the same
    stages in a loop; for benchmarks and debugging). Raises :class:`IngestError` on failure;
    bad inputs are not failures, they are counted and listed in ``rejected.jsonl``.

    With ``RAY_ADDRESS=http://...`` (a Ray Jobs API) and ``engine="ray"``, the ingest is
    submitted as a Ray job that runs this function on the cluster (:mod:`diffusion_core.
    ray_jobs`; local paths must be on a filesystem the cluster shares) and its result returned;
    ``progress`` gets the job's progress."""
    import time

    if engine == "ray" and submission_address():
        return _submit(cfg, progress)
    t0 = time.perf_counter()
    _check_out(cfg)
    refuse_existing_dataset(cfg)  # before any work: cheap, and the most likely mistake
    try:
        units = plan(cfg.sources)
    except SourceError as e:
        raise IngestError(str(e)) from e
    if engine == "ray":
        ensure_ray()
        batches: Iterable[pa.Table] = _iter_ray(units, cfg)
    elif engine == "local":
        batches = _iter_local(units, cfg, single_thread)
    else:
        raise ValueError(f"engine must be 'ray' or 'local', got {engine!r}")
    try:
        writer = DatasetWriter(cfg)
    except OSError as e:
        raise IngestError(f"cannot write to --out {cfg.out!r}: {e}") from e
    try:
        for table in batches:
            writer.consume(table)
            if progress is not None:
                progress(writer.progress)
        manifest = writer.finish()
    except BaseException as e:
        writer.abort()
        if isinstance(e, IngestError | KeyboardInterrupt):
            raise
        if isinstance(e, Exception):
            raise IngestError(f"ingest failed: {type(e).__name__}: {e}", transient=True) from e
        raise
    counts = manifest["counts"]
    return IngestResult(
        out=cfg.out,
        manifest_path=join(cfg.out, MANIFEST),
        dataset_version=manifest["dataset_version"],
        read=counts["read"],
        accepted=counts["accepted"],
        rejected=counts["rejected"],
        rejected_by_reason=counts["rejected_by_reason"],
        shards=manifest["shards"],
        seconds=time.perf_counter() - t0,
        train=manifest["split"]["train"],
        eval=manifest["split"]["eval"],
        eval_shards=manifest["eval_shards"],
    )


def _for_cluster(cfg: IngestConfig) -> IngestConfig:
    """The config with local paths made absolute (the job runs in another directory); a URL
    with credentials in it is refused (the request is job metadata, shown by the dashboard)."""
    for s in cfg.sources:
        if redact(s) != s:
            raise IngestError(
                f"source {redact(s)!r}: put credentials in the cluster's environment, not the URL"
            )
    return cfg.model_copy(
        update={"sources": [absolute(s) for s in cfg.sources], "out": absolute(cfg.out)}
    )


def _submit(cfg: IngestConfig, progress: Callable[[IngestProgress], None] | None) -> IngestResult:
    """Run the ingest as a Ray job at ``$RAY_ADDRESS`` (see :func:`ingest`)."""
    from diffusion_core.ray_jobs import submit_kind

    cfg = _for_cluster(cfg)
    result = submit_kind(
        "ingest",
        {"config": cfg.model_dump(mode="json")},
        name=os.path.basename(cfg.out.rstrip("/")) or "dataset",
        tracking_uri=None,
        error=IngestError,
        on_progress=None if progress is None else (lambda e: progress(IngestProgress(**e))),
    )
    return IngestResult(**result)


def run_job(request: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The ingest job on the cluster (``python -m diffusion_core.ray_jobs ingest ...``)."""
    cfg = IngestConfig.model_validate(request["config"])
    return asdict(ingest(cfg, progress=lambda p: emit(asdict(p))))


def verify(out: str) -> dict[str, Any]:
    """Check a dataset folder against its manifest (:func:`~diffusion_core.data.format.
    verify_shards`, also for a dataset with no accepted sample); return the manifest."""
    try:
        manifest = load_manifest(out)
        verify_shards(dataset_info(out, manifest))
    except DataError as e:
        raise IngestError(str(e)) from e
    return manifest


# Options that do not change a dataset's content (where it goes, how fast it is made).
_NOT_CONTENT = {"out", "overwrite", "batch_size", "reader_cpus", "num_encoders", "encoder_cpus"}


def input_fingerprint(cfg: IngestConfig) -> str:
    """sha256 of everything an ingest's output is a function of: the options that decide the
    content and every source file (its path inside the source, size and sha256).

    Cheap next to an ingest (one read of the raw bytes, no decoding, no text encoder), so a
    scheduled pipeline can name a dataset folder by its inputs and skip the ingest when nothing
    changed (``flows/retrain.py``). The dataset version itself (a hash of the output) can only be
    known by ingesting.
    """
    h = hashlib.sha256()
    options = cfg.model_dump(mode="json", exclude=_NOT_CONTENT | {"sources"})
    h.update(json.dumps(options, sort_keys=True).encode())
    for src in cfg.sources:
        fs, root = filesystem(src)
        if not fs.exists(root):
            raise IngestError(f"source {src!r} does not exist")
        files = sorted(fs.find(root)) if fs.isdir(root) else [root]
        h.update(f"source\t{len(files)}\n".encode())
        for path in files:
            rel = path[len(root) :].lstrip("/") or os.path.basename(path)
            digest = hashlib.sha256()
            with fs.open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            h.update(f"{rel}\t{fs.size(path)}\t{digest.hexdigest()}\n".encode())
    return h.hexdigest()
