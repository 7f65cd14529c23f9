"""Prompt files → validated prompt rows, one file at a time, streamed.

Formats: ``.txt`` (one prompt per line), ``.jsonl`` (objects with ``prompt`` and optional ``id``,
``seed``, ``negative_prompt``), ``.csv`` and ``.parquet`` with those columns. Every row of a file
becomes either a prompt row or a rejection with a :class:`PromptReason`, in file order, so the
counts always add up (read = accepted + rejected).

Why not Ray Data's ``read_text`` / ``read_json``: they decode a whole file at once and fail the
whole read on one non-UTF-8 byte or one malformed line, and give no line numbers. Rows need line
numbers (a row without an ``id`` is named ``<file stem>-<line>``, stable across runs, which is
what makes resuming and determinism work) and per-line reasons. So :func:`read_prompt_file`
streams one file (lines, CSV records, parquet record batches; memory bounded by a batch) and the
job runs it as one Ray task per file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from diffusion_core.batch.reasons import PromptReason
from diffusion_core.storage import open_file

MAX_PROMPT_CHARS = 4096
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class PromptRow:
    """One row of a prompts file: a prompt to sample, or (``reason`` set) a rejection."""

    id: str
    prompt: str
    seed: int | None
    negative_prompt: str
    source: str
    reason: str | None = None
    detail: str = ""


def file_stem(path: str) -> str:
    """The id prefix of a file's rows: its name without extension, made file-name safe."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0]
    return _STEM_UNSAFE.sub("_", stem).strip("_") or "prompts"


def derive_seed(job_seed: int, image_id: str) -> int:
    """The default seed of an image: a 63-bit hash of (job seed, image id)."""
    h = hashlib.blake2b(f"{job_seed}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def check_prompt(text: Any, what: str = "prompt") -> tuple[str | None, str]:
    """(reason, detail) of a bad prompt string, or (None, "")."""
    if not isinstance(text, str):
        return PromptReason.MISSING_PROMPT, f"{what} is {type(text).__name__}, not a string"
    if any("\udc80" <= c <= "\udcff" for c in text):  # undecodable bytes (surrogateescape)
        return PromptReason.NOT_UTF8, f"{what} is not valid UTF-8"
    bad = [c for c in text if unicodedata.category(c) == "Cc" and c not in "\t"]
    if bad:
        shown = sorted({repr(c) for c in bad})[:5]
        return PromptReason.CONTROL_CHARACTERS, f"{what} holds control characters {shown}"
    if not text.strip():
        return (PromptReason.EMPTY_PROMPT, "") if what == "prompt" else (None, "")
    if len(text) > MAX_PROMPT_CHARS:
        return PromptReason.PROMPT_TOO_LONG, f"{len(text)} characters > {MAX_PROMPT_CHARS}"
    return None, ""


def _row(rec: dict[str, Any], stem: str, line: int, source: str) -> PromptRow:
    """A prompt row from one record (jsonl object, CSV record, parquet row)."""
    raw_id = rec.get("id")
    row = PromptRow(f"{stem}-{line}", "", None, "", source)
    if raw_id not in (None, ""):
        row.id = str(raw_id)
        if isinstance(raw_id, bool) or not ID_RE.match(row.id):
            row.reason = PromptReason.BAD_ID
            row.detail = f"id {row.id[:80]!r} is not [A-Za-z0-9][A-Za-z0-9_-]{{0,127}}"
            return row
    if "prompt" not in rec:
        row.reason, row.detail = PromptReason.MISSING_PROMPT, "no 'prompt' column or key"
        return row
    reason, detail = check_prompt(rec["prompt"])
    if reason is None:
        reason, detail = check_prompt(rec.get("negative_prompt") or "", "negative_prompt")
    if reason is not None:
        row.reason, row.detail = reason, detail
        return row
    row.prompt = rec["prompt"].strip()
    row.negative_prompt = (rec.get("negative_prompt") or "").strip()
    seed = rec.get("seed")
    if seed not in (None, ""):
        try:
            if isinstance(seed, bool) or (isinstance(seed, float) and not seed.is_integer()):
                raise ValueError
            row.seed = int(seed)
            if not 0 <= row.seed < 2**63:
                raise ValueError
        except (TypeError, ValueError):
            row.reason = PromptReason.BAD_SEED
            row.detail = f"seed {seed!r} is not an integer in [0, 2**63)"
    return row


def _decode(raw: bytes) -> str:
    # surrogateescape keeps undecodable bytes as lone surrogates: check_prompt reports them
    return raw.decode("utf-8", errors="surrogateescape")


def read_prompt_file(path: str, label: str | None = None) -> Iterator[PromptRow]:
    """Every row of one prompts file, in order (see the module docstring)."""
    label = label or path.rstrip("/").rsplit("/", 1)[-1]
    stem = file_stem(path)
    ext = path.rsplit(".", 1)[-1].lower()
    try:
        with open_file(path) as f:
            if ext == "txt":
                yield from _txt(f, stem, label)
            elif ext == "jsonl":
                yield from _jsonl(f, stem, label)
            elif ext == "csv":
                yield from _csv(f, stem, label)
            else:
                yield from _parquet(f, stem, label)
    except (OSError, ValueError) as e:  # a file that breaks part-way: the rest is one rejection
        detail = f"{type(e).__name__}: {e}"
        yield PromptRow("", "", None, "", label, PromptReason.READ_ERROR, detail)


def _txt(f: Any, stem: str, label: str) -> Iterator[PromptRow]:
    for n, raw in enumerate(f, start=1):
        text = _decode(raw.rstrip(b"\r\n"))
        row = PromptRow(f"{stem}-{n}", "", None, "", f"{label}:{n}")
        reason, detail = check_prompt(text)
        if reason is not None:
            row.reason, row.detail = reason, detail
        else:
            row.prompt = text.strip()
        yield row


def _jsonl(f: Any, stem: str, label: str) -> Iterator[PromptRow]:
    for n, raw in enumerate(f, start=1):
        if not raw.strip():
            continue  # a blank line is not a record in JSON Lines
        source = f"{label}:{n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield PromptRow(f"{stem}-{n}", "", None, "", source, PromptReason.NOT_UTF8, str(e))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            yield PromptRow(f"{stem}-{n}", "", None, "", source, PromptReason.BAD_JSON, str(e))
            continue
        if not isinstance(rec, dict):
            yield PromptRow(
                f"{stem}-{n}", "", None, "", source, PromptReason.BAD_JSON,
                f"a JSON {type(rec).__name__}, not an object",
            )  # fmt: skip
            continue
        yield _row(rec, stem, n, source)


def _csv(f: Any, stem: str, label: str) -> Iterator[PromptRow]:
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.DictReader(text)
    for n, rec in enumerate(reader, start=2):  # line 1 is the header
        yield _row({k: v for k, v in rec.items() if k is not None}, stem, n, f"{label}:{n}")


def _parquet(f: Any, stem: str, label: str) -> Iterator[PromptRow]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            n += 1
            yield _row(rec, stem, n, f"{label}#{n}")
