"""A cascade folder on an object store (``s3://bucket/cascade``, any fsspec URI), made local.

:func:`local_cascade` is THE one place that turns where a cascade is (a local folder or a URI)
into a local folder that :meth:`Cascade.load <diffusion_core.cascade.Cascade.load>`,
:func:`~diffusion_core.cascade.cascade_files` and :func:`~diffusion_core.cascade.content_hash`
read; every loader of the project (``cascade sample``, ``cascade evaluate``, ``cascade
register``, the batch actors) goes through them. A local folder is returned as it is. A URI is
copied into a cache folder (:func:`default_cache_dir`, ``$CASCADE_MODEL_CACHE``):

1. ``cascade.json`` is read first. The export writes it last, so without it the export is
   unfinished (or this is not a cascade): refused, saying so. Its stages name the files to fetch:
   ``stages/<name>/*`` of each listed stage (what ``cascade_files`` reads), ``training.json`` and
   the per-stage export records ``exports/<name>.json`` when present.
2. Every name is checked before it becomes a local path
   (:func:`diffusion_core.storage.safe_relpath`):
   a stage named ``..``, an object key ``stages/base/../../x``, an absolute name is refused with
   the reason, and nothing is written outside the cache.
3. The copy's identity is computed from the listing, before anything is downloaded: the sha256
   of ``cascade.json``'s bytes and, per file, its size and the sha256 its export record gives
   (``exports/<stage>.json``, written by :func:`diffusion_core.training.export.export_stage`),
   else the store's change marker (an S3 ETag). The cache folder ``<cache>/<identity>`` is reused
   when it exists, holds its manifest (written last) and every file has the size the manifest
   says; otherwise it is replaced.
4. A download goes into a fresh hidden folder beside it; every file's size is checked against
   the listing and its sha256 against the export record (a mismatch: the export changed while it
   was read: one retry from step 1, then an error), then ``cascade_files`` checks the folder is a
   whole cascade, the manifest is written, and the folder is renamed into place: a cache folder
   is complete or absent, a killed download leaves only a hidden ``.tmp-*`` folder (removed by a
   later fetch once a day old). Two processes fetching the same cascade both download; the
   first rename wins and the other uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from diffusion_core import storage
from diffusion_core.cascade.config import CASCADE_JSON, CascadeConfig

CACHE_ENV = "CASCADE_MODEL_CACHE"
"""The cache folder of cascades fetched from object stores (see :func:`default_cache_dir`)."""
EXPORTS_DIR = "exports"
"""``exports/<stage>.json``: each stage's own export record (lineage, file sizes and sha256)."""
TRAINING_JSON = "training.json"
MANIFEST = ".cascade-cache.json"
RECORD_VERSION = 1
_STALE_TMP_S = 24 * 3600


class CascadeFetchError(ValueError):
    """A cascade on an object store that cannot be used: unfinished, changed while read, or with
    names that would escape the cache folder (the message says which)."""


def folder_files(root: Path) -> list[str]:
    """The files of the local cascade folder ``root`` that ``Cascade.load`` reads, relative and
    sorted: ``cascade.json`` and ``stages/<name>/*`` of every stage it lists (an error if any is
    missing; :func:`diffusion_core.cascade.cascade_files` is this after fetching a URI)."""
    path = root / CASCADE_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} has no {CASCADE_JSON}: not a cascade folder (train the stages with "
            "`cascade train --export DIR` or save one with Cascade.save)"
        )
    try:
        config = CascadeConfig.model_validate_json(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not a valid cascade config: {e}") from e
    files = [CASCADE_JSON]
    for stage in config.stages:
        folder = root / "stages" / stage.name
        found = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        if not found:
            raise FileNotFoundError(f"stage {stage.name!r} of {root} has no files in {folder}")
        files += [p.relative_to(root).as_posix() for p in found]
    return files


def folder_hash(root: Path) -> str:
    """sha256 over the (path, sha256) of every file :func:`folder_files` lists (what
    :func:`diffusion_core.cascade.content_hash` returns for a local folder)."""
    outer = hashlib.sha256()
    for rel in folder_files(root):
        inner = hashlib.sha256()
        with open(root / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{rel}\t{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def default_cache_dir() -> Path:
    """``$CASCADE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/cascade-diffusion/cascades``, else
    ``~/.cache/cascade-diffusion/cascades``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cascade-diffusion" / "cascades"


def record_name(stage: str) -> str:
    """The relative name of a stage's export record."""
    return f"{EXPORTS_DIR}/{storage.safe_relpath(stage)}.json"


def local_cascade(
    source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A local folder holding the cascade at ``source`` (see the module docstring): ``source``
    itself when it is local, else a verified copy in ``cache_dir`` (default
    :func:`default_cache_dir`). Raises ``FileNotFoundError`` (no ``cascade.json``: not a cascade
    or an unfinished export) or :class:`CascadeFetchError`."""
    text = str(source)
    if not storage.is_uri(text):
        return Path(text.removeprefix("file://"))
    uri = text.rstrip("/")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    try:
        return _fetch(uri, root)
    except _Changed:
        pass  # another export wrote while we read: once more from cascade.json
    try:
        return _fetch(uri, root)
    except _Changed as e:
        raise CascadeFetchError(
            f"{storage.redact(uri)} changed while it was downloaded twice ({e}): an export into "
            "it is running; load it once the export has finished"
        ) from None


class _Changed(Exception):
    pass


def _fetch(uri: str, cache_root: Path) -> Path:
    plan, cascade_bytes = _plan(uri)
    key = _identity(cascade_bytes, plan)
    if key is not None:
        final = cache_root / key
        if _valid(final):
            return final
    tmp = cache_root / f".tmp-{key or 'unkeyed'}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = _download(uri, tmp, cascade_bytes, plan)
        listed = folder_files(tmp)  # a whole cascade, as Cascade.load reads it
        missing = sorted(set(listed) - set(files))
        if missing:  # cannot happen with the plan above; never cache a folder that is short
            raise CascadeFetchError(f"{storage.redact(uri)}: {missing} were not fetched")
        if key is None:  # no change marker for some file: keyed by what was read
            key = _identity(
                cascade_bytes,
                {rel: {**f, "token": "sha256:" + f["sha256"]} for rel, f in files.items()},
            )
        final = cache_root / str(key)
        manifest = {
            "source": storage.redact(uri),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "content_hash": folder_hash(tmp),
            "files": {
                rel: {"size": f["size"], "sha256": f["sha256"]} for rel, f in sorted(files.items())
            },
        }
        storage.write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists() and not _valid(final):
            _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _valid(final):  # someone else's, and not whole: should not happen
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _plan(uri: str) -> tuple[dict[str, dict[str, Any]], bytes]:
    """``({relative name: {size, token, sha256 (expected, or None)}}, cascade.json's bytes)``."""
    where = storage.redact(uri)
    try:
        cascade_bytes = storage.read_bytes(storage.join(uri, CASCADE_JSON))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {CASCADE_JSON} at {where}: not a cascade, or its export has not finished "
            f"(an export writes {CASCADE_JSON} last, once its first stage is complete)"
        ) from None
    try:
        config = CascadeConfig.model_validate_json(cascade_bytes)
    except ValueError as e:
        raise CascadeFetchError(f"{where}/{CASCADE_JSON} is not a valid cascade config: {e}") from e
    plan: dict[str, dict[str, Any]] = {}
    top = {e["name"]: e for e in storage.list_entries(uri)}
    if TRAINING_JSON in top and top[TRAINING_JSON]["type"] == "file":
        e = top[TRAINING_JSON]
        plan[TRAINING_JSON] = {"size": e["size"], "token": e["token"], "sha256": None}
    records = {e["name"]: e for e in storage.list_entries(storage.join(uri, EXPORTS_DIR))}
    for stage in config.stages:
        folder = f"stages/{stage.name}"
        try:
            storage.safe_relpath(folder)
        except ValueError as e:
            raise CascadeFetchError(f"{where}: stage name {stage.name!r} refused: {e}") from None
        expected: dict[str, Any] = {}
        rec_name = f"{stage.name}.json"
        if rec_name in records and records[rec_name]["type"] == "file":
            rel = record_name(stage.name)
            try:
                record = json.loads(storage.read_bytes(storage.join(uri, rel)))
            except FileNotFoundError:
                raise _Changed(f"{rel} disappeared") from None
            except ValueError as e:
                raise CascadeFetchError(f"{where}/{rel} cannot be read: {e}") from None
            expected = dict(record.get("files") or {})
            for name in expected:
                storage.safe_relpath(name)
                if name.rsplit("/", 1)[0] != folder:
                    raise CascadeFetchError(f"{where}/{rel} names {name!r}, outside {folder}/")
            plan[rel] = {
                "size": records[rec_name]["size"],
                "token": records[rec_name]["token"],
                "sha256": None,
            }
        entries = storage.list_entries(storage.join(uri, folder))
        for e in entries:  # every name, files and folders: a '..' folder is refused too
            try:
                storage.safe_relpath(f"{folder}/{e['name']}")
            except ValueError as err:
                raise CascadeFetchError(f"{where}: {err}") from None
        files = {f"{folder}/{e['name']}": e for e in entries if e["type"] == "file"}
        if not files:
            raise CascadeFetchError(
                f"{where}: stage {stage.name!r} listed in {CASCADE_JSON} has no files under "
                f"{folder}/: the export is incomplete"
            )
        for rel, info in expected.items():
            if rel not in files:
                raise _Changed(f"{rel} (in the export record) is missing")
            if int(info.get("size", -1)) != files[rel]["size"]:
                raise _Changed(
                    f"{rel} has {files[rel]['size']} bytes, its record says {info.get('size')}"
                )
        for rel, e in files.items():
            sha = (expected.get(rel) or {}).get("sha256")
            plan[rel] = {"size": e["size"], "token": e["token"], "sha256": sha}
    return plan, cascade_bytes


def _identity(cascade_bytes: bytes, plan: dict[str, dict[str, Any]]) -> str | None:
    """The cache key: sha256 of cascade.json and of each file's (name, size, sha256 or token);
    None when some file has neither (nothing to recognise it by before reading it)."""
    lines = [
        f"{CASCADE_JSON}\t{len(cascade_bytes)}\tsha256:{hashlib.sha256(cascade_bytes).hexdigest()}"
    ]
    for rel in sorted(plan):
        f = plan[rel]
        token = f"sha256:{f['sha256']}" if f.get("sha256") else f.get("token")
        if token is None:
            return None
        lines.append(f"{rel}\t{f['size']}\t{token}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:40]


def _download(
    uri: str, tmp: Path, cascade_bytes: bytes, plan: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Every planned file into ``tmp``, sizes and sha256s checked; cascade.json is the bytes
    already read (so the copy is what the identity names)."""
    fetched: dict[str, dict[str, Any]] = {}
    for rel, want in sorted(plan.items()):
        target = storage.local_target(tmp, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, n = hashlib.sha256(), 0
        try:
            with storage.open_file(storage.join(uri, rel)) as src, open(target, "wb") as dst:
                for block in iter(lambda: src.read(8 << 20), b""):
                    digest.update(block)
                    n += len(block)
                    dst.write(block)
        except FileNotFoundError:
            raise _Changed(f"{rel} disappeared") from None
        except OSError as e:  # s3fs: the object changed under its If-Match read
            if "PreconditionFailed" in str(e) or "precondition" in str(e).lower():
                raise _Changed(f"{rel} changed while read") from None
            raise
        sha = digest.hexdigest()
        if n != want["size"]:
            raise _Changed(f"{rel}: {n} bytes read, {want['size']} listed")
        if want.get("sha256") and sha != want["sha256"]:
            raise _Changed(
                f"{rel}: sha256 {sha[:12]} is not its export record's {want['sha256'][:12]}"
            )
        fetched[rel] = {"size": n, "sha256": sha}
    target = storage.local_target(tmp, CASCADE_JSON)
    target.write_bytes(cascade_bytes)
    fetched[CASCADE_JSON] = {
        "size": len(cascade_bytes),
        "sha256": hashlib.sha256(cascade_bytes).hexdigest(),
    }
    return fetched


def _valid(folder: Path) -> bool:
    """A cache folder that is whole: its manifest readable and every file of it present with
    the size the manifest says (the manifest is written last, the folder renamed into place)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all(
            (folder / storage.safe_relpath(rel)).is_file()
            and (folder / rel).stat().st_size == int(info["size"])
            for rel, info in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _discard(folder: Path) -> None:
    """Remove a broken cache folder: renamed aside first, so it is never half there."""
    aside = folder.with_name(f".tmp-discard-{folder.name}-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)


def _clean_stale(root: Path) -> None:
    now = time.time()
    for p in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
