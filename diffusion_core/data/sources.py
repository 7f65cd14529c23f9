"""Readers for the three raw inputs (DESIGN §4), local paths or fsspec URLs.

1. img2dataset output: ``NNNNN.tar`` holding ``<key>.jpg|png|webp``, ``<key>.txt``,
   ``<key>.json``, with an optional sibling ``NNNNN.parquet`` whose ``status`` marks failures.
2. An image folder with caption sidecars (``a.jpg`` + ``a.txt``), recursively.
3. A manifest (``.parquet``, ``.jsonl`` or ``.csv``) of image path/URL and caption.

:func:`plan` (on the driver, cheap: listings and manifests only) turns sources into a sorted list
of *units* (a tar, or a chunk of files/rows). :func:`read_unit` (in parallel) turns one unit into
raw rows, in a deterministic order, each either a candidate sample or an input already rejected.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from diffusion_core.data.images import IMAGE_EXTENSIONS
from diffusion_core.data.reasons import Reason
from diffusion_core.data.tario import iter_tar, split_member_name

MANIFEST_EXTENSIONS = ("parquet", "jsonl", "csv")
PATH_COLUMNS = ("path", "image_path", "image", "file", "url")
CAPTION_COLUMNS = ("caption", "text", "txt")
# Provenance and licence fields carried into each sample's json when the source has them.
LICENCE_FIELDS = (
    "license",
    "licence",
    "license_url",
    "licence_url",
    "copyright",
    "author",
    "attribution",
    "url",
)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class SourceError(Exception):
    """A source that cannot be ingested at all (missing, empty, unreadable manifest)."""


@dataclass
class RawRow:
    """One input: a candidate sample (``image``/``caption`` bytes) or an early rejection."""

    key: str
    source: str
    kind: str
    image: bytes | None = None
    image_name: str = ""
    caption: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    detail: str = ""


def sanitize_key(raw: str) -> str:
    """A webdataset-safe key: no dots, no slashes (``sub/a.b`` -> ``sub_a_b``)."""
    key = _KEY_UNSAFE.sub("_", raw).strip("_")
    return key or "_"


def _licence_meta(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k in LICENCE_FIELDS:
        v = d.get(k)
        if v is not None and v == v and v != "":  # v == v drops NaN
            out[k] = v if isinstance(v, str | int | float | bool) else str(v)
    return out


# --------------------------------------------------------------------------------- planning


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def plan(sources: list[str], chunk: int = 256) -> list[dict[str, Any]]:
    """Resolve sources into sorted, JSON-serialisable read units. Raises :class:`SourceError`."""
    if not sources:
        raise SourceError("no source given: pass at least one path or URL")
    units: list[dict[str, Any]] = []
    for src in sources:
        found = _plan_one(src, chunk)
        if not found:
            raise SourceError(
                f"source {src!r} holds nothing to ingest: no .tar shards, no images "
                f"({', '.join(IMAGE_EXTENSIONS)}) and no manifest "
                f"({', '.join(MANIFEST_EXTENSIONS)}) rows"
            )
        units.extend(found)
    return units


def _plan_one(src: str, chunk: int) -> list[dict[str, Any]]:
    try:
        fs, root = fsspec.core.url_to_fs(src)
    except ImportError as e:
        raise SourceError(f"source {src!r}: its filesystem needs an extra package: {e}") from e
    if not fs.exists(root):
        raise SourceError(f"source {src!r} does not exist")
    proto = "://" in src
    root = root.rstrip("/") or "/"
    name = posixpath.basename(root) or "root"

    def url(p: str) -> str:
        return fs.unstrip_protocol(p) if proto else p

    def label(p: str) -> str:
        """Location-independent source id: the source's name, then the path inside it."""
        if p == root:
            return name
        return posixpath.join(name, p[len(root) + 1 :]) if p.startswith(root + "/") else p

    if fs.isdir(root):
        files = sorted(fs.find(root))
        tars = [f for f in files if _ext(f) == "tar"]
        if tars:
            return [_tar_unit(fs, t, url, label) for t in tars]
        images = [f for f in files if _ext(f) in IMAGE_EXTENSIONS]
        captions = [f for f in files if _ext(f) == "txt"]
        if images or captions:
            return _folder_units(root, images, captions, url, label, chunk)
        manifests = [f for f in files if _ext(f) in MANIFEST_EXTENSIONS]
        units = []
        for m in manifests:
            units.extend(_manifest_units(fs, m, url, label, chunk))
        return units
    ext = _ext(root)
    if ext == "tar":
        return [_tar_unit(fs, root, url, label)]
    if ext in MANIFEST_EXTENSIONS:
        return _manifest_units(fs, root, url, label, chunk)
    raise SourceError(
        f"source {src!r} is a file of type {ext!r}: expected a folder, a .tar shard "
        f"or a manifest ({', '.join(MANIFEST_EXTENSIONS)})"
    )


def _tar_unit(fs, path: str, url, label) -> dict[str, Any]:
    sibling = path[: -len(".tar")] + ".parquet"
    has_sibling = fs.exists(sibling)
    return {
        "kind": "tar",
        "url": url(path),
        "label": label(path),
        "parquet": url(sibling) if has_sibling else None,
        "parquet_label": label(sibling) if has_sibling else None,
    }


def _folder_units(root: str, images: list[str], captions: list[str], url, label, chunk: int):
    def stem(p: str) -> str:
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else posixpath.basename(p)
        return rel.rsplit(".", 1)[0]

    caption_by_stem = {stem(c): c for c in captions}
    items: list[dict[str, Any]] = []
    image_stems = set()
    for img in images:  # sorted: a.jpg before a.png, so a.jpg wins a duplicate stem
        s = stem(img)
        image_stems.add(s)
        cap = caption_by_stem.get(s)
        items.append(
            {
                "key": sanitize_key(s),
                "source": label(img),
                "image": url(img),
                "caption_file": url(cap) if cap else None,
            }
        )
    for s, cap in caption_by_stem.items():
        if s not in image_stems:
            items.append({"key": sanitize_key(s), "source": label(cap), "image": None})
    items.sort(key=lambda it: it["source"])
    return [{"kind": "folder", "items": items[i : i + chunk]} for i in range(0, len(items), chunk)]


def _manifest_units(fs, path: str, url, label, chunk: int) -> list[dict[str, Any]]:
    ext = _ext(path)
    base = posixpath.dirname(path)
    rows: list[dict[str, Any]] = []
    try:
        if ext == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                records = pq.read_table(f).to_pylist()
            parsed = [(r, None) for r in records]
        else:
            with fs.open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="surrogateescape")
            parsed = _parse_jsonl(text) if ext == "jsonl" else _parse_csv(text)
    except Exception as e:  # noqa: BLE001 - any failure to parse the whole manifest is fatal
        raise SourceError(f"manifest {url(path)!r} cannot be read: {type(e).__name__}: {e}") from e
    for i, (rec, err) in enumerate(parsed):
        source = f"{label(path)}#{i + 1}"
        if err is not None:
            rows.append({"source": source, "error": err, "key": f"row{i}"})
            continue
        path_col = next((c for c in PATH_COLUMNS if rec.get(c) not in (None, "")), None)
        cap_col = next((c for c in CAPTION_COLUMNS if c in rec), None)
        cap = rec.get(cap_col) if cap_col else None
        if isinstance(cap, bytes):
            cap = cap.decode("utf-8", errors="surrogateescape")
        if cap is not None and not isinstance(cap, str):
            cap = None if cap != cap else str(cap)  # NaN from pandas-like writers
        if path_col is None:
            rows.append(
                {"source": source, "key": f"row{i}", "error": f"no image column {PATH_COLUMNS}"}
            )
            continue
        img = given = str(rec[path_col])
        if "://" not in img and not posixpath.isabs(img):
            img = posixpath.join(base, img)
        img_url = img if "://" in img else url(img)
        raw_key = rec.get("key") or rec.get("id")
        key = sanitize_key(str(raw_key)) if raw_key not in (None, "") else None
        if key is None:
            rel = img[len(base) + 1 :] if img.startswith(base + "/") else posixpath.basename(img)
            key = sanitize_key(rel.rsplit(".", 1)[0])
        rows.append(
            {
                "source": source,
                "key": key,
                "image": img_url,
                "image_given": given,
                "caption": cap,
                "meta": _licence_meta(rec),
            }
        )
    return [{"kind": "manifest", "items": rows[i : i + chunk]} for i in range(0, len(rows), chunk)]


def _parse_jsonl(text: str) -> list[tuple[dict[str, Any], str | None]]:
    out: list[tuple[dict[str, Any], str | None]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(({}, f"line {n}: not JSON: {e}"))
            continue
        if not isinstance(rec, dict):
            out.append(({}, f"line {n}: a JSON {type(rec).__name__}, not an object"))
            continue
        out.append((rec, None))
    return out


def _parse_csv(text: str) -> list[tuple[dict[str, Any], str | None]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        return []
    return [(dict(r), None) for r in reader]


# --------------------------------------------------------------------------------- reading


def read_unit(unit: dict[str, Any]) -> Iterator[RawRow]:
    """Raw rows of one unit, in a deterministic order."""
    kind = unit["kind"]
    if kind == "tar":
        yield from _read_tar(unit)
    elif kind == "folder":
        yield from _read_folder(unit)
    elif kind == "manifest":
        yield from _read_manifest(unit)
    else:  # pragma: no cover - plan() makes only these
        raise ValueError(f"unknown unit kind {kind!r}")


def _read_bytes(u: str) -> bytes:
    with fsspec.open(u, "rb") as f:
        return f.read()


def _read_tar(unit: dict[str, Any]) -> Iterator[RawRow]:
    tar_url, tar_label = unit["url"], unit["label"]
    if unit.get("parquet"):
        yield from _failed_downloads(unit["parquet"], unit["parquet_label"])
    group_key: str | None = None
    group: dict[str, bytes] = {}

    def flush() -> Iterator[RawRow]:
        if group_key is not None:
            yield _tar_sample(tar_label, group_key, group)

    try:
        f = fsspec.open(tar_url, "rb").open()
    except OSError as e:
        yield RawRow("", tar_label, "img2dataset", reason=Reason.READ_ERROR, detail=str(e))
        return
    with f:
        for m in iter_tar(f):
            if m.reason is not None:
                src = f"{tar_label}::{m.name}" if m.name else tar_label
                if m.reason in (Reason.TRUNCATED_TAR, Reason.CORRUPT_TAR):
                    yield from flush()
                    group_key, group = None, {}
                yield RawRow("", src, "img2dataset", reason=m.reason, detail=m.detail)
                continue
            key, ext = split_member_name(m.name)
            if key != group_key:
                yield from flush()
                group_key, group = key, {}
            if ext in group:  # the same member twice in a row: a duplicate sample
                yield from flush()
                group = {}
            group[ext] = m.data or b""
        yield from flush()


def _tar_sample(tar_label: str, key: str, group: dict[str, bytes]) -> RawRow:
    src = f"{tar_label}::{key}"
    row = RawRow(sanitize_key(key), src, "img2dataset")
    images = [e for e in IMAGE_EXTENSIONS if e in group]
    if images:
        row.image_name = f"{key}.{images[0]}"
        row.image = group[images[0]]
    row.caption = group.get("txt")
    if "json" in group:
        try:
            meta = json.loads(group["json"])
            if isinstance(meta, dict):
                row.meta = _licence_meta(meta)
                if row.caption is None and isinstance(meta.get("caption"), str):
                    row.caption = meta["caption"].encode("utf-8", errors="surrogateescape")
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # img2dataset's json is informative only
    return row


def _failed_downloads(parquet_url: str, parquet_label: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(parquet_url, "rb") as f:
            t = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - the sibling parquet is optional information
        yield RawRow("", parquet_label, "img2dataset", reason=Reason.READ_ERROR, detail=str(e))
        return
    if "status" not in t.column_names:
        return
    for i, rec in enumerate(t.to_pylist()):
        if rec.get("status") in (None, "success"):
            continue
        key = rec.get("key") or f"row{i}"
        detail = str(rec.get("error_message") or rec.get("status"))
        yield RawRow(
            "",
            f"{parquet_label}#{key}",
            "img2dataset",
            reason=Reason.DOWNLOAD_FAILED,
            detail=detail,
        )


def _read_folder(unit: dict[str, Any]) -> Iterator[RawRow]:
    for it in unit["items"]:
        row = RawRow(it["key"], it["source"], "folder")
        if it["image"] is None:
            row.reason, row.detail = Reason.MISSING_IMAGE, "caption sidecar without an image"
            yield row
            continue
        row.image_name = posixpath.basename(it["image"])
        try:
            row.image = _read_bytes(it["image"])
            if it.get("caption_file"):
                row.caption = _read_bytes(it["caption_file"])
        except OSError as e:
            row.reason, row.detail = Reason.READ_ERROR, f"{type(e).__name__}: {e}"
        yield row


def _read_manifest(unit: dict[str, Any]) -> Iterator[RawRow]:
    for it in unit["items"]:
        row = RawRow(it["key"], it["source"], "manifest", meta=it.get("meta") or {})
        if it.get("error"):
            row.key = ""
            row.reason, row.detail = Reason.BAD_MANIFEST_ROW, it["error"]
            yield row
            continue
        if it.get("caption") is not None:
            row.caption = it["caption"].encode("utf-8", errors="surrogateescape")
        row.image_name = posixpath.basename(it["image"])
        try:
            row.image = _read_bytes(it["image"])
        except FileNotFoundError:
            row.reason, row.detail = Reason.MISSING_IMAGE, f"{it['image_given']!r} does not exist"
        except OSError as e:
            row.reason, row.detail = Reason.READ_ERROR, f"{type(e).__name__}: {e}"
        yield row
