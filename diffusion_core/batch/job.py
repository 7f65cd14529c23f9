"""The batch-sampling job: prompt files → one image per prompt (or K), as a Ray Data job.

1. **Pin the model** (:func:`~diffusion_core.batch.model.resolve_model`): an alias is resolved to
   a version once; a missing prompts file, an unknown model or an unreachable registry fail here,
   before any actor starts.
2. **Plan** (Ray tasks, one per prompts file, :mod:`~diffusion_core.batch.prompts`): rows are
   validated; the driver drops duplicate ids (the first wins), numbers the images in file and
   line order (the plan index), writes ``rejected.jsonl`` and the plan (``.plan/plan-NNNNN
   .parquet``: index, id, prompt, negative prompt, seed per image), streamed.
3. **Sample** (plan files → ``repartition`` into blocks of ``batch_size`` rows, so that every
   actor gets work → ``map_batches(CascadeSampler, ActorPoolStrategy)``): each actor loads the
   cascade once and writes one PNG per image atomically, skipping images that exist (a resumed
   job): ``images/<id>.png``, or ``.staging/<id>.png`` with ``--format webdataset``, where the
   driver packs every complete shard (:mod:`~diffusion_core.batch.shards`).
4. **Record**: ``manifest.parquet`` (index, id, prompt, seed, model, sampler settings, file,
   member, sha256, seconds), ``summary.json`` (counts, model, images/s), ``contact_sheet.png``.

The output is a local folder or an fsspec URI (:mod:`~diffusion_core.batch.output`).
Resume: everything is a pure function of the job's arguments, so a job killed at any point and
run again with the same arguments skips the images (and shards) already written and does the
rest; run again once complete, it does nothing and says so. An output holding another job is
refused. Ray Data's (beta) ``checkpoint_config`` is not used: its filter actor reserves a whole
CPU and deadlocked on 2 CPUs here, and idempotent per-image files need no extra state
(``docs/batch.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_core.batch.config import BatchConfig
from diffusion_core.batch.model import ModelError, ResolvedModel, resolve_model
from diffusion_core.batch.output import Output, worker_env
from diffusion_core.batch.prompts import PromptRow, derive_seed, read_prompt_file
from diffusion_core.batch.reasons import PromptReason
from diffusion_core.batch.shards import (
    STAGING_DIR,
    existing_shards,
    shard_pngs,
    shard_rows,
    shard_sizes,
    write_shard,
)
from diffusion_core.batch.worker import RESULT_SCHEMA, CascadeSampler
from diffusion_core.errors import JobError
from diffusion_core.storage import (
    absolute,
    exists,
    is_uri,
    open_file,
    read_json,
    redact,
    strip_credentials,
    write_json_atomic,
)

JOB_JSON = "job.json"
SUMMARY_JSON = "summary.json"
MANIFEST = "manifest.parquet"
REJECTED = "rejected.jsonl"
CONTACT_SHEET = "contact_sheet.png"
PLAN_DIR = ".plan"
PLAN_ROWS = 4096
PLAN_SCHEMA = pa.schema(
    [
        ("index", pa.uint64()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.uint64()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        *RESULT_SCHEMA,
        ("member", pa.string()),  # the PNG's member in a webdataset shard ("" for png)
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("model_uri", pa.string()),
        ("sampler", pa.string()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
    ]
)


class BatchError(JobError):
    """The job cannot run (bad prompts files, model, output folder) or failed
    (``transient``: see :class:`~diffusion_core.errors.JobError`)."""


@dataclass
class BatchResult:
    out: str
    model: dict[str, Any]
    read: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    images: int
    written: int
    resumed: int
    images_per_s: float
    seconds: float
    nothing_to_do: bool = False


def _sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_file(uri) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def job_identity(cfg: BatchConfig, model: ResolvedModel) -> dict[str, Any]:
    """What the output's images are a function of (``job.json``): the pinned model, the prompts
    files' contents, and the settings (and, for webdataset, how images are cut into shards)."""
    identity = {
        "model": model.uri,
        "prompts": {p: _sha256(p) for p in cfg.prompts},
        "images_per_prompt": cfg.images_per_prompt,
        "seed": cfg.seed,
        "settings": cfg.settings.model_dump(mode="json"),
        "format": cfg.format,
    }
    if cfg.format == "webdataset":
        identity["shard_size"] = cfg.shard_size
    return identity


def _model_root(cfg: BatchConfig, output: Output) -> str:
    """Where a registry model is downloaded: beside the images, or (an object-store output) a
    local cache the actors can load from."""
    if not output.remote:
        return os.path.join(cfg.out, ".model")
    return os.path.join(tempfile.gettempdir(), "cascade-batch-models")


def run_batch(
    cfg: BatchConfig, *, progress: Callable[[str, int, int | None], None] | None = None
) -> BatchResult:
    """Run the job (see the module docstring). ``progress(stage, done, total)`` is called as it
    goes. Raises :class:`BatchError`; bad prompt rows are not errors (``rejected.jsonl``).

    With ``RAY_ADDRESS=http://...`` (a Ray Jobs API) the job is submitted there and runs this
    function on the cluster (:mod:`diffusion_core.ray_jobs`; local paths must be on a filesystem
    the cluster shares); its result is returned and ``progress`` gets the job's progress."""
    from diffusion_core.ray_jobs import submission_address

    if submission_address():
        return _submit(cfg, progress)
    t0 = time.perf_counter()
    for f in cfg.prompts:
        if not exists(f):
            raise BatchError(f"prompts file {f!r} does not exist")
    stems = Counter(f.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for f in cfg.prompts)
    same = sorted(s for s, n in stems.items() if n > 1)
    if same:
        raise BatchError(
            f"several prompts files are named {same}: rows without ids are named after their file "
            "(<name>-<line>), so rename one of them or give every row an id"
        )
    output = Output(cfg.out)
    try:
        output.makedirs()
        held = read_json(output.uri(JOB_JSON)) if output.exists(JOB_JSON) else None
    except OSError as e:  # an unreachable bucket, wrong credentials, a read-only folder
        raise BatchError(f"cannot use the output {redact(cfg.out)}: {type(e).__name__}: {e}") from None
    try:
        model = resolve_model(cfg.model, _model_root(cfg, output), cfg.tracking_uri)
    except ModelError as e:
        raise BatchError(str(e)) from None
    identity = job_identity(cfg, model)
    if held is not None:
        if held != identity:
            raise BatchError(
                f"{cfg.out} holds the output of another job (model {held.get('model')}, format "
                f"{held.get('format')}, settings {held.get('settings')}); choose another --out"
            )
        done = _completed(output)
        if done is not None:
            return done
    write_json_atomic(output.uri(JOB_JSON), identity)

    from diffusion_core.ray_env import ensure_ray, worker_env_vars

    ensure_ray()
    env = worker_env_vars(worker_env(cfg.out))  # credentials only where not inherited
    remote_args = {"runtime_env": {"env_vars": env}} if env else {}
    done_shards = existing_shards(output) if cfg.format == "webdataset" else set()
    plan = _plan(cfg, output, progress, remote_args, done_shards)
    if plan["accepted"] == 0:
        raise BatchError(
            f"no prompt to sample: all {plan['read']} rows were rejected "
            f"({dict(plan['by_reason'])}); see {output.uri(REJECTED)}"
        )
    t_sample = time.perf_counter()
    counts, first = _sample(cfg, output, model, plan, done_shards, progress, remote_args)
    sample_s = time.perf_counter() - t_sample
    if cfg.contact_sheet:
        _contact_sheet(output, first)
    result = BatchResult(
        out=cfg.out,
        model=model.model_dump(mode="json", exclude={"local_dir"}),
        read=plan["read"],
        accepted=plan["accepted"],
        rejected=plan["read"] - plan["accepted"],
        rejected_by_reason=dict(sorted(plan["by_reason"].items())),
        images=plan["images"],
        written=counts["written"],
        resumed=counts["resumed"],
        images_per_s=counts["written"] / sample_s if counts["written"] else 0.0,
        seconds=time.perf_counter() - t0,
    )
    if result.written + result.resumed != result.images:
        raise BatchError(
            f"counts do not add up: {result.written} written + {result.resumed} found "
            f"!= {result.images} planned"
        )
    write_json_atomic(output.uri(SUMMARY_JSON), {**asdict(result), "complete": True})
    output.remove_tree(PLAN_DIR)
    output.remove_tree(STAGING_DIR)
    return result


def _submit(
    cfg: BatchConfig, progress: Callable[[str, int, int | None], None] | None
) -> BatchResult:
    """Run the job as a Ray job at ``$RAY_ADDRESS`` (see :func:`run_batch`). The request is job
    metadata (the dashboard shows it): the registry URI goes without credentials, which the
    cluster's environment provides (``MLFLOW_TRACKING_USERNAME/PASSWORD``)."""
    from diffusion_core.ray_jobs import submit_kind

    tracking_uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    local_model = not (cfg.model.startswith("models:") or is_uri(cfg.model))
    update: dict[str, Any] = {
        "tracking_uri": strip_credentials(cfg.tracking_uri)[0] if cfg.tracking_uri else None
    }
    if local_model:
        update["model"] = absolute(cfg.model)
    request = {"config": cfg.model_copy(update=update).model_dump(mode="json")}

    def on_event(e: dict[str, Any]) -> None:
        if progress is not None:
            progress(e["stage"], e["done"], e["total"])

    result = submit_kind(
        "sample",
        request,
        name=cfg.out.rstrip("/").rsplit("/", 1)[-1] or "samples",
        tracking_uri=tracking_uri,
        error=BatchError,
        on_progress=on_event,
    )
    return BatchResult(**result)


def run_job(request: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The batch job on the cluster (``python -m diffusion_core.ray_jobs sample ...``)."""
    cfg = BatchConfig.model_validate(request["config"])
    last = [0.0]

    def progress(stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:  # at most a line a second in the job's log
            last[0] = now
            emit({"stage": stage, "done": done, "total": total})

    return asdict(run_batch(cfg, progress=progress))


def _completed(output: Output) -> BatchResult | None:
    """The summary of this job when it already completed (and its outputs are all there)."""
    if not output.exists(SUMMARY_JSON) or not output.exists(MANIFEST):
        return None
    summary = read_json(output.uri(SUMMARY_JSON))
    if not summary.get("complete"):
        return None
    with output.open_read(MANIFEST) as f:
        files = set(pq.read_table(f, columns=["file"]).column("file").to_pylist())
    if not all(output.exists(f) for f in files):
        return None
    summary.pop("complete")
    return BatchResult(**{**summary, "written": 0, "resumed": summary["images"], "nothing_to_do": True})


# ============================================================================ 2. plan
def _read_file_udf(batch: pa.Table) -> Iterator[pa.Table]:
    """One Ray task per prompts file: its rows as tables of <= 1024 rows."""
    for path in batch.column("path").to_pylist():
        buf: list[dict[str, Any]] = []
        for row in read_prompt_file(path):
            buf.append(asdict(row))
            if len(buf) >= 1024:
                yield pa.Table.from_pylist(buf)
                buf = []
        if buf:
            yield pa.Table.from_pylist(buf)


def _plan(
    cfg: BatchConfig,
    output: Output,
    progress: Any,
    remote_args: dict[str, Any],
    done_shards: set[int],
) -> dict[str, Any]:
    """Validate every row, write ``rejected.jsonl`` and the plan of the images still to make
    (those of a shard already written are counted but not planned)."""
    import ray.data
    from ray.data import DataContext

    output.remove_tree(PLAN_DIR)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # file and line order: "the first id wins"
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"path": p} for p in cfg.prompts], override_num_blocks=len(cfg.prompts))
    ds = ds.map_batches(_read_file_udf, batch_size=1, batch_format="pyarrow", num_cpus=0.5, **remote_args)
    seen: set[str] = set()
    by_reason: Counter[str] = Counter()
    read = accepted = images = 0
    files: list[str] = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        name = f"{PLAN_DIR}/plan-{len(files):05d}.parquet"
        with output.atomic(name) as f:
            pq.write_table(pa.Table.from_pylist(pending, schema=PLAN_SCHEMA), f)
        files.append(output.uri(name))
        pending.clear()

    with output.atomic(REJECTED) as rejected:

        def reject(row: PromptRow, reason: str, detail: str) -> None:
            by_reason[reason] += 1
            line = {"source": row.source, "id": row.id, "reason": reason, "detail": detail}
            rejected.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))

        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for d in table.to_pylist():
                row = PromptRow(**d)
                read += 1
                if row.reason is not None:
                    reject(row, row.reason, row.detail)
                    continue
                if row.id in seen:
                    reject(row, PromptReason.DUPLICATE_ID, f"id {row.id!r} seen before")
                    continue
                seen.add(row.id)
                accepted += 1
                for k in range(cfg.images_per_prompt):
                    image_id = row.id if cfg.images_per_prompt == 1 else f"{row.id}_{k}"
                    seed = derive_seed(cfg.seed, image_id) if row.seed is None else row.seed + k
                    if images // cfg.shard_size not in done_shards:
                        pending.append(
                            {"index": images, "id": image_id, "prompt": row.prompt,
                             "negative_prompt": row.negative_prompt, "seed": seed}
                        )  # fmt: skip
                    images += 1
                    if len(pending) >= PLAN_ROWS:
                        flush()
            if progress is not None:
                progress("read prompts", read, None)
        if pending:
            flush()
    return {"read": read, "accepted": accepted, "by_reason": by_reason, "images": images, "files": files}


# ============================================================================ 3. sample
def _read_plan_udf(batch: pa.Table) -> Iterator[pa.Table]:
    """One Ray task per plan file (local or on the object store)."""
    for path in batch.column("path").to_pylist():
        with open_file(path) as f:
            yield from (pa.Table.from_batches([b]) for b in pq.ParquetFile(f).iter_batches(1024))


def _sample(
    cfg: BatchConfig,
    output: Output,
    model: ResolvedModel,
    plan: dict[str, Any],
    done_shards: set[int],
    progress: Any,
    remote_args: dict[str, Any],
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Sample the planned images and write the manifest (and the shards); return the counts and
    the first ``cfg.contact_sheet`` rows of the job."""
    webdataset = cfg.format == "webdataset"
    sizes = shard_sizes(plan["images"], cfg.shard_size)
    constant = {
        "member": "",
        "model_name": model.name or "",
        "model_version": model.version or "",
        "model_uri": model.uri,
        "sampler": cfg.settings.sampler,
        "num_inference_steps": cfg.settings.num_inference_steps,
        "guidance_scale": cfg.settings.guidance_scale,
    }
    counts = {"written": 0, "resumed": 0}
    first: list[dict[str, Any]] = []
    pending: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)

    with output.atomic(MANIFEST) as f:
        writer = pq.ParquetWriter(f, MANIFEST_SCHEMA)

        def record(rows: list[dict[str, Any]]) -> None:
            writer.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
            first.extend(r for r in rows if r["index"] < cfg.contact_sheet)
            if progress is not None:
                progress("sample", counts["written"] + counts["resumed"], plan["images"])

        for k in sorted(done_shards):  # a resumed webdataset job: shards already complete
            rows = [{**r, "resumed": True, "seconds": 0.0} for r in shard_rows(output, k)]
            if k >= len(sizes) or len(rows) != sizes[k]:
                expected = sizes[k] if k < len(sizes) else 0
                raise BatchError(
                    f"{output.uri(rows[0]['file'] if rows else str(k))} holds {len(rows)} images, "
                    f"this job puts {expected} there: the output was changed by hand; remove it"
                )
            counts["resumed"] += len(rows)
            record(rows)
        for table in _sampled(cfg, model, plan, remote_args):
            rows = [{**r, **constant} for r in table.to_pylist()]
            resumed = sum(r["resumed"] for r in rows)
            counts["resumed"] += resumed
            counts["written"] += len(rows) - resumed
            if not webdataset:
                record(rows)
                continue
            for r in rows:
                pending[r["index"] // cfg.shard_size].append(r)
            for k in [k for k, rs in pending.items() if len(rs) == sizes[k]]:
                staged = pending.pop(k)
                record(write_shard(output, k, staged, lambda r: output.read_bytes(r["file"])))
                output.remove(*(r["file"] for r in staged))  # packed: the staged copies go
        writer.close()
    if pending:  # cannot happen when every planned image came back
        raise BatchError(f"shards {sorted(pending)} did not get all their images")
    return counts, sorted(first, key=lambda r: r["index"])


def threads_per_actor(cfg: BatchConfig) -> int:
    """Torch intra-op threads of an actor: ``--torch-threads``, else the CPUs it reserves
    (rounded down, at least 1), never more. Threads beyond the cores an actor really gets spin
    at OpenMP barriers while their peers are descheduled: measured here, a loop with torch's 2
    natural threads on a busy 2-core machine ran 20x slower than with 1 (docs/batch.md)."""
    return cfg.torch_threads or max(1, int(cfg.actor_cpus))


def _sampled(
    cfg: BatchConfig, model: ResolvedModel, plan: dict[str, Any], remote_args: dict[str, Any]
) -> Iterator[pa.Table]:
    """The sampler actors' result tables (nothing when every image is in a written shard)."""
    if not plan["files"]:
        return
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"path": p} for p in plan["files"]], override_num_blocks=len(plan["files"]))
    ds = ds.map_batches(_read_plan_udf, batch_size=1, batch_format="pyarrow", num_cpus=0.25, **remote_args)
    # One block per actor call: a plan file is one block, and a block goes to one actor, so
    # without this a job of < 4096 images kept every actor but one idle (docs/batch.md, Speed).
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(
        CascadeSampler,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.actor_cpus,
        num_gpus=cfg.actor_gpus or None,
        fn_constructor_kwargs={
            "model_dir": model.local_dir,
            "out": cfg.out,
            "settings": cfg.settings.model_dump(mode="json"),
            "torch_threads": threads_per_actor(cfg),
            "folder": STAGING_DIR if cfg.format == "webdataset" else "images",
        },
        **remote_args,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# ============================================================================ 4. record
def _contact_sheet(output: Output, rows: list[dict[str, Any]]) -> None:
    """A grid of the job's first images with their prompts, for a person to look at."""
    import io

    import numpy as np
    from PIL import Image

    from diffusion_core.evaluation.grids import caption_grid

    if any(r["member"] for r in rows):  # webdataset: the PNGs are members of the first shards
        found = shard_pngs(output, dict.fromkeys(r["file"] for r in rows), {r["member"] for r in rows})
        data = [found[r["member"]] for r in rows]
    else:
        data = [output.read_bytes(r["file"]) for r in rows]
    images = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
    grid = caption_grid(images, [r["prompt"] for r in rows], scale=max(1, 128 // images.shape[1]))
    with output.atomic(CONTACT_SHEET) as f:
        grid.save(f, format="PNG")
