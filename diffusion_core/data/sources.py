"""Readers for the three raw inputs (``docs/data.md``), local paths or fsspec URLs.

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
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from diffusion_core.data.images import IMAGE_EXTENSIONS, Rejected
from diffusion_core.data.reasons import Reason
from diffusion_core.data.safety import (
    Location,
    ReadPolicy,
    describe,
    is_local,
    open_stream,
    read_file,
    resolve_manifest_path,
    walk_local,
)
from diffusion_core.data.tario import iter_tar, split_member_name
from diffusion_core.storage import filesystem

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
        units.extend(_plan_one(src, chunk))
    return units


class _Source:
    """One source seen as a folder: relative paths → locations (:mod:`.safety`) and labels.

    A single-file source is seen as its parent folder, labels then being the bare file names.
    """

    def __init__(self, src: str) -> None:
        try:
            self.fs, root = filesystem(src)
        except ImportError as e:
            raise SourceError(f"source {src!r}: its filesystem needs an extra package: {e}") from e
        if not self.fs.exists(root):
            raise SourceError(f"source {src!r} does not exist")
        self.local = is_local(self.fs)
        self.root = root.rstrip("/") or "/"
        self.prefix = posixpath.basename(self.root) or "root"
        self.is_dir = self.fs.isdir(self.root)
        self.file = ""
        if not self.is_dir:
            self.root, self.file = posixpath.split(self.root)
            self.prefix = ""
        # A local root is opened at its real path: the user named it, so it may be a link;
        # nothing below it is followed.
        self.open_root = os.path.realpath(self.root) if self.local else self.root

    def loc(self, rel: str) -> Location:
        if self.local:
            return {"root": self.open_root, "rel": rel}
        return {"url": self.fs.unstrip_protocol(posixpath.join(self.root, rel))}

    def label(self, rel: str) -> str:
        """Location-independent source id: the source's name, then the path inside it."""
        return posixpath.join(self.prefix, rel) if self.prefix else rel

    def base(self, rel_dir: str) -> Location:
        """The folder that a manifest's relative paths start from."""
        if self.local:
            return {"root": os.path.join(self.open_root, rel_dir) if rel_dir else self.open_root}
        return {"url": self.fs.unstrip_protocol(posixpath.join(self.root, rel_dir))}


def _plan_one(src: str, chunk: int) -> list[dict[str, Any]]:
    s = _Source(src)
    if not s.is_dir:
        return _plan_file(src, s, chunk)
    if s.local:
        files, links = walk_local(s.open_root)
    else:  # object stores have no symlinks
        files, links = sorted(p[len(s.root) + 1 :] for p in s.fs.find(s.root)), []
    units = _plan_folder(s, files, chunk)
    if not units:
        raise SourceError(
            f"source {src!r} holds nothing to ingest: no .tar shards, no images "
            f"({', '.join(IMAGE_EXTENSIONS)}) and no manifest "
            f"({', '.join(MANIFEST_EXTENSIONS)}) rows"
            + (f" ({len(links)} symlinks not followed)" if links else "")
        )
    # A symlink is never followed but listed in rejected.jsonl (a caption sidecar behind one
    # leaves its image without a caption, as a link member does in a tar).
    rejected = [
        {
            "source": s.label(rel),
            "reason": str(Reason.SYMLINK),
            "detail": f"symlink to {os.readlink(os.path.join(s.open_root, rel))!r}: "
            "a source folder's links are never followed",
        }
        for rel in links
    ]
    units += [
        {"kind": "rejected", "items": rejected[i : i + chunk]}
        for i in range(0, len(rejected), chunk)
    ]
    return units


def _plan_folder(s: _Source, files: list[str], chunk: int) -> list[dict[str, Any]]:
    tars = [f for f in files if _ext(f) == "tar"]
    if tars:
        present = set(files)
        return [_tar_unit(s, t, t[: -len(".tar")] + ".parquet" in present) for t in tars]
    images = [f for f in files if _ext(f) in IMAGE_EXTENSIONS]
    captions = [f for f in files if _ext(f) == "txt"]
    if images or captions:
        return _folder_units(s, images, captions, chunk)
    units = []
    for m in (f for f in files if _ext(f) in MANIFEST_EXTENSIONS):
        units.extend(_manifest_units(s, m, s.loc(m), chunk))
    return units


def _plan_file(src: str, s: _Source, chunk: int) -> list[dict[str, Any]]:
    """A single tar or manifest. The file itself may be a link (the user named it); its sibling
    parquet and the manifest's relative paths are looked up beside the name given."""
    ext = _ext(s.file)
    if ext not in ("tar", *MANIFEST_EXTENSIONS):
        raise SourceError(
            f"source {src!r} is a file of type {ext!r}: expected a folder, a .tar shard "
            f"or a manifest ({', '.join(MANIFEST_EXTENSIONS)})"
        )
    if s.local:
        real = os.path.realpath(os.path.join(s.root, s.file))
        loc: Location = {"root": os.path.dirname(real), "rel": os.path.basename(real)}
    else:
        loc = s.loc(s.file)
    if ext == "tar":
        sibling = s.file[: -len(".tar")] + ".parquet"
        if s.local:  # lexists: a link is then refused, with a reason, when it is read
            has_sibling = os.path.lexists(os.path.join(s.open_root, sibling))
        else:
            has_sibling = s.fs.exists(posixpath.join(s.root, sibling))
        return [{**_tar_unit(s, s.file, has_sibling), "tar": loc}]
    return _manifest_units(s, s.file, loc, chunk)


def _tar_unit(s: _Source, rel: str, has_sibling: bool) -> dict[str, Any]:
    sibling = rel[: -len(".tar")] + ".parquet"
    return {
        "kind": "tar",
        "tar": s.loc(rel),
        "label": s.label(rel),
        "parquet": s.loc(sibling) if has_sibling else None,
        "parquet_label": s.label(sibling) if has_sibling else None,
    }


def _folder_units(s: _Source, images: list[str], captions: list[str], chunk: int):
    def stem(rel: str) -> str:
        return rel.rsplit(".", 1)[0]

    caption_by_stem = {stem(c): c for c in captions}
    items: list[dict[str, Any]] = []
    image_stems = set()
    for img in images:  # sorted: a.jpg before a.png, so a.jpg wins a duplicate stem
        st = stem(img)
        image_stems.add(st)
        cap = caption_by_stem.get(st)
        items.append(
            {
                "key": sanitize_key(st),
                "source": s.label(img),
                "image": s.loc(img),
                "caption_file": s.loc(cap) if cap else None,
            }
        )
    for st, cap in caption_by_stem.items():
        if st not in image_stems:
            items.append({"key": sanitize_key(st), "source": s.label(cap), "image": None})
    items.sort(key=lambda it: it["source"])
    return [{"kind": "folder", "items": items[i : i + chunk]} for i in range(0, len(items), chunk)]


def _manifest_units(s: _Source, rel: str, loc: Location, chunk: int) -> list[dict[str, Any]]:
    """Parse a manifest (on the driver). Its rows' paths are checked when they are read."""
    ext = _ext(rel)
    label = s.label(rel)
    base_dir = posixpath.join(s.root, posixpath.dirname(rel)).rstrip("/")  # as given, for keys
    rows: list[dict[str, Any]] = []
    try:
        with open_stream(loc) as f:
            if ext == "parquet":
                import pyarrow.parquet as pq

                parsed = [(r, None) for r in pq.read_table(f).to_pylist()]
            else:
                text = f.read().decode("utf-8", errors="surrogateescape")
                parsed = _parse_jsonl(text) if ext == "jsonl" else _parse_csv(text)
    except Exception as e:  # noqa: BLE001 - any failure to parse the whole manifest is fatal
        raise SourceError(
            f"manifest {describe(loc)!r} cannot be read: {type(e).__name__}: {e}"
        ) from e
    for i, (rec, err) in enumerate(parsed):
        source = f"{label}#{i + 1}"
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
        given = str(rec[path_col])
        raw_key = rec.get("key") or rec.get("id")
        if raw_key not in (None, ""):
            key = sanitize_key(str(raw_key))
        else:  # the path relative to the manifest's folder, without its extension
            p = given.removeprefix("file://")
            if posixpath.isabs(p) and p.startswith(base_dir + "/"):
                p = p[len(base_dir) + 1 :]
            elif "://" in p or posixpath.isabs(p):
                p = posixpath.basename(p)
            key = sanitize_key(posixpath.normpath(p).rsplit(".", 1)[0])
        rows.append(
            {
                "source": source,
                "key": key,
                "image_given": given,
                "caption": cap,
                "meta": _licence_meta(rec),
            }
        )
    base = s.base(posixpath.dirname(rel))
    return [
        {"kind": "manifest", "base": base, "items": rows[i : i + chunk]}
        for i in range(0, len(rows), chunk)
    ]


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


def read_unit(unit: dict[str, Any], policy: ReadPolicy | None = None) -> Iterator[RawRow]:
    """Raw rows of one unit, in a deterministic order; every file read as ``policy`` allows."""
    policy = policy or ReadPolicy()
    kind = unit["kind"]
    if kind == "tar":
        yield from _read_tar(unit, policy)
    elif kind == "folder":
        yield from _read_folder(unit, policy)
    elif kind == "manifest":
        yield from _read_manifest(unit, policy)
    elif kind == "rejected":
        for it in unit["items"]:
            yield RawRow("", it["source"], "folder", reason=it["reason"], detail=it["detail"])
    else:  # pragma: no cover - plan() makes only these
        raise ValueError(f"unknown unit kind {kind!r}")


def _read_tar(unit: dict[str, Any], policy: ReadPolicy) -> Iterator[RawRow]:
    tar_label = unit["label"]
    if unit.get("parquet"):
        yield from _failed_downloads(unit["parquet"], unit["parquet_label"], policy)
    group_key: str | None = None
    group: dict[str, bytes] = {}

    def flush() -> Iterator[RawRow]:
        if group_key is not None:
            yield _tar_sample(tar_label, group_key, group)

    try:
        f = open_stream(unit["tar"])
    except Rejected as r:
        yield RawRow("", tar_label, "img2dataset", reason=r.reason, detail=r.detail)
        return
    except OSError as e:
        yield RawRow("", tar_label, "img2dataset", reason=Reason.READ_ERROR, detail=str(e))
        return
    with f:
        for m in iter_tar(f, max_member_bytes=policy.max_file_bytes):
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


def _failed_downloads(
    parquet: Location, parquet_label: str, policy: ReadPolicy
) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(io.BytesIO(read_file(parquet, policy.max_file_bytes)))
    except Rejected as r:
        yield RawRow("", parquet_label, "img2dataset", reason=r.reason, detail=r.detail)
        return
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


def _read_into(row: RawRow, loc: Location, field: str, policy: ReadPolicy) -> bool:
    """Read ``loc`` into ``row.<field>``; on failure set the row's reason and return False."""
    try:
        setattr(row, field, read_file(loc, policy.max_file_bytes))
        return True
    except Rejected as r:
        row.reason, row.detail = r.reason, f"{field}: {r.detail}"
    except FileNotFoundError:  # gone since planning (folders) or never there (manifests)
        missing = Reason.MISSING_IMAGE if field == "image" else Reason.MISSING_CAPTION
        row.reason, row.detail = missing, f"{loc.get('rel', loc.get('url'))!r} does not exist"
    except OSError as e:
        row.reason, row.detail = Reason.READ_ERROR, f"{type(e).__name__}: {e}"
    return False


def _read_folder(unit: dict[str, Any], policy: ReadPolicy) -> Iterator[RawRow]:
    for it in unit["items"]:
        row = RawRow(it["key"], it["source"], "folder")
        if it["image"] is None:
            row.reason, row.detail = Reason.MISSING_IMAGE, "caption sidecar without an image"
            yield row
            continue
        row.image_name = posixpath.basename(it["image"].get("rel") or it["image"]["url"])
        if _read_into(row, it["image"], "image", policy) and it.get("caption_file"):
            _read_into(row, it["caption_file"], "caption", policy)
        yield row


def _read_manifest(unit: dict[str, Any], policy: ReadPolicy) -> Iterator[RawRow]:
    for it in unit["items"]:
        row = RawRow(it["key"], it["source"], "manifest", meta=it.get("meta") or {})
        if it.get("error"):
            row.key = ""
            row.reason, row.detail = Reason.BAD_MANIFEST_ROW, it["error"]
            yield row
            continue
        if it.get("caption") is not None:
            row.caption = it["caption"].encode("utf-8", errors="surrogateescape")
        given = it["image_given"]
        row.image_name = posixpath.basename(given)
        try:
            loc = resolve_manifest_path(given, unit["base"], policy)
        except Rejected as r:
            row.reason, row.detail = r.reason, r.detail
            yield row
            continue
        if not _read_into(row, loc, "image", policy) and row.reason == Reason.MISSING_IMAGE:
            row.detail = f"{given!r} does not exist"
        yield row
