"""The batch-sampling job: prompt files → one image per prompt (or K), as a Ray Data job.

1. **Pin the model** (:func:`~diffusion_core.batch.model.resolve_model`): an alias is resolved to
   a version once; a missing prompts file, an unknown model or an unreachable registry fail here,
   before any actor starts.
2. **Plan** (Ray tasks, one per prompts file, :mod:`~diffusion_core.batch.prompts`): rows are
   validated; the driver drops duplicate ids (the first wins), writes ``rejected.jsonl`` and the
   plan (``.plan/plan-NNNNN.parquet``: id, prompt, negative prompt, seed per image), streamed.
3. **Sample** (``read_parquet(plan) → map_batches(CascadeSampler, ActorPoolStrategy)``): each
   actor loads the cascade once and writes ``images/<id>.png`` atomically, skipping images that
   exist (a resumed job).
4. **Record**: ``manifest.parquet`` (id, prompt, seed, model, sampler settings, file, sha256,
   seconds), ``summary.json`` (counts, model, images/s), ``contact_sheet.png``. (Webdataset
   output for very large jobs is not built yet: ``docs/batch.md``.)

Resume: everything is a pure function of the job's arguments, so a job killed at any point and
run again with the same arguments skips the images on disk and writes the rest; run again once
complete, it does nothing and says so. An output folder holding another job is refused.
Ray Data's (beta) ``checkpoint_config`` is not used: its filter actor reserves a whole CPU and
deadlocked on 2 CPUs here, and idempotent per-image files need no extra state (``docs/batch.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from diffusion_core.batch.config import BatchConfig
from diffusion_core.batch.model import ModelError, ResolvedModel, resolve_model
from diffusion_core.batch.prompts import PromptRow, derive_seed, read_prompt_file
from diffusion_core.batch.reasons import PromptReason
from diffusion_core.batch.worker import CascadeSampler, image_path
from diffusion_core.errors import JobError
from diffusion_core.storage import AtomicFile, exists, read_json, write_json_atomic

JOB_JSON = "job.json"
SUMMARY_JSON = "summary.json"
MANIFEST = "manifest.parquet"
REJECTED = "rejected.jsonl"
PLAN_DIR = ".plan"
PLAN_ROWS = 4096
PLAN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.uint64()),
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
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def job_identity(cfg: BatchConfig, model: ResolvedModel) -> dict[str, Any]:
    """What the output folder's images are a function of (``job.json``): the pinned model, the
    prompts files' contents, and the settings."""
    return {
        "model": model.uri,
        "prompts": {p: _sha256(p) for p in cfg.prompts},
        "images_per_prompt": cfg.images_per_prompt,
        "seed": cfg.seed,
        "settings": cfg.settings.model_dump(mode="json"),
        "format": cfg.format,
    }


def run_batch(
    cfg: BatchConfig, *, progress: Callable[[str, int, int | None], None] | None = None
) -> BatchResult:
    """Run the job (see the module docstring). ``progress(stage, done, total)`` is called as it
    goes. Raises :class:`BatchError`; bad prompt rows are not errors (``rejected.jsonl``)."""
    t0 = time.perf_counter()
    if cfg.format != "png":
        raise BatchError("format='webdataset' is not built yet; use the default png format")
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
    os.makedirs(cfg.out, exist_ok=True)
    try:
        model = resolve_model(cfg.model, os.path.join(cfg.out, ".model"), cfg.tracking_uri)
    except ModelError as e:
        raise BatchError(str(e)) from None
    identity = job_identity(cfg, model)
    job_path = os.path.join(cfg.out, JOB_JSON)
    if os.path.exists(job_path):
        held = read_json(job_path)
        if held != identity:
            raise BatchError(
                f"{cfg.out} holds the output of another job (model {held.get('model')}, settings "
                f"{held.get('settings')}); choose another --out"
            )
        done = _completed(cfg)
        if done is not None:
            return done
    write_json_atomic(job_path, identity)

    from diffusion_core.ray_env import ensure_ray

    ensure_ray()
    plan = _plan(cfg, progress)
    if plan["accepted"] == 0:
        raise BatchError(
            f"no prompt to sample: all {plan['read']} rows were rejected "
            f"({dict(plan['by_reason'])}); see {os.path.join(cfg.out, REJECTED)}"
        )
    os.makedirs(os.path.join(cfg.out, "images"), exist_ok=True)
    t_sample = time.perf_counter()
    counts = _sample(cfg, model, plan, progress)
    sample_s = time.perf_counter() - t_sample
    if cfg.contact_sheet:
        _contact_sheet(cfg, plan["files"][0])
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
    write_json_atomic(os.path.join(cfg.out, SUMMARY_JSON), {**asdict(result), "complete": True})
    shutil.rmtree(os.path.join(cfg.out, PLAN_DIR), ignore_errors=True)
    return result


def _completed(cfg: BatchConfig) -> BatchResult | None:
    """The summary of this job when it already completed (and its outputs are all there)."""
    path = os.path.join(cfg.out, SUMMARY_JSON)
    if not os.path.exists(path) or not os.path.exists(os.path.join(cfg.out, MANIFEST)):
        return None
    summary = read_json(path)
    if not summary.get("complete"):
        return None
    manifest = pq.read_table(os.path.join(cfg.out, MANIFEST), columns=["file"])
    if not all(os.path.exists(os.path.join(cfg.out, f)) for f in manifest.column("file").to_pylist()):
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


def _plan(cfg: BatchConfig, progress: Any) -> dict[str, Any]:
    import ray.data
    from ray.data import DataContext

    plan_dir = os.path.join(cfg.out, PLAN_DIR)
    shutil.rmtree(plan_dir, ignore_errors=True)
    os.makedirs(plan_dir)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # file and line order: "the first id wins"
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"path": p} for p in cfg.prompts], override_num_blocks=len(cfg.prompts))
    ds = ds.map_batches(_read_file_udf, batch_size=1, batch_format="pyarrow", num_cpus=0.5)
    seen: set[str] = set()
    by_reason: Counter[str] = Counter()
    read = accepted = images = 0
    files: list[str] = []
    pending: list[dict[str, Any]] = []
    rejected = AtomicFile(os.path.join(cfg.out, REJECTED))

    def flush() -> None:
        path = os.path.join(plan_dir, f"plan-{len(files):05d}.parquet")
        with AtomicFile(path) as f:
            pq.write_table(pa.Table.from_pylist(pending, schema=PLAN_SCHEMA), f.file)
        files.append(path)
        pending.clear()

    def reject(row: PromptRow, reason: str, detail: str) -> None:
        by_reason[reason] += 1
        line = {"source": row.source, "id": row.id, "reason": reason, "detail": detail}
        rejected.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))

    try:
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
                    pending.append(
                        {"id": image_id, "prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": seed}
                    )
                    images += 1
                    if len(pending) >= PLAN_ROWS:
                        flush()
            if progress is not None:
                progress("read prompts", read, None)
        if pending or not files:
            flush()
        rejected.commit()
    except BaseException:
        rejected.abort()
        raise
    return {"read": read, "accepted": accepted, "by_reason": by_reason, "images": images, "files": files}


# ============================================================================ 3. sample
def _sample(cfg: BatchConfig, model: ResolvedModel, plan: dict[str, Any], progress: Any) -> dict[str, int]:
    import ray.data
    from ray.data import ActorPoolStrategy

    settings = cfg.settings.model_dump(mode="json")
    ds = ray.data.read_parquet(plan["files"], override_num_blocks=max(1, len(plan["files"])))
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
            "settings": settings,
            "torch_threads": cfg.torch_threads,
        },
    )
    constant = {
        "model_name": model.name or "",
        "model_version": model.version or "",
        "model_uri": model.uri,
        "sampler": cfg.settings.sampler,
        "num_inference_steps": cfg.settings.num_inference_steps,
        "guidance_scale": cfg.settings.guidance_scale,
    }
    counts = {"written": 0, "resumed": 0}
    manifest = AtomicFile(os.path.join(cfg.out, MANIFEST))
    writer = None
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            n = table.num_rows
            resumed = sum(table.column("resumed").to_pylist())
            counts["resumed"] += resumed
            counts["written"] += n - resumed
            for key, value in constant.items():
                table = table.append_column(key, pa.array([value] * n))
            if writer is None:
                writer = pq.ParquetWriter(manifest.file, table.schema)
            writer.write_table(table)
            if progress is not None:
                progress("sample", counts["written"] + counts["resumed"], plan["images"])
        if writer is not None:
            writer.close()
        manifest.commit()
    except BaseException:
        manifest.abort()
        raise
    return counts


# ============================================================================ 4. record
def _contact_sheet(cfg: BatchConfig, first_plan: str) -> None:
    import numpy as np
    from PIL import Image

    from diffusion_core.evaluation.grids import caption_grid

    rows = pq.read_table(first_plan).slice(0, cfg.contact_sheet).to_pylist()
    paths = [image_path(cfg.out, r["id"]) for r in rows]
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    grid = caption_grid(images, [r["prompt"] for r in rows], scale=max(1, 128 // images.shape[1]))
    with AtomicFile(os.path.join(cfg.out, "contact_sheet.png")) as f:
        grid.save(f.file, format="PNG")
