"""Paths, URIs and small files: one helper for each, shared by every job.

- :func:`absolute`: a URI stays as it is, a local path becomes absolute (what Ray and a cluster
  need: the same string must mean the same place everywhere).
- :class:`AtomicFile` / :func:`write_bytes_atomic` / :func:`write_json_atomic`: the one
  "write then rename" of the project (shards, manifests, run records, exports). A local write
  goes to a hidden ``.<name>.partial`` beside the target, is fsynced and renamed into place, so a
  reader sees the old file or the new one, never half of one (a killed writer leaves only the
  ``.partial``); on an object store a single PUT becomes visible at once.
- :func:`read_json` / :func:`exists`: on a local disk or an fsspec filesystem.
- :func:`redact`: a URI fit for logs, params, tags and job metadata (no password, no token).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec

_SECRET_QUERY = re.compile(r"(pass|secret|token|key|signature|credential|auth)", re.I)


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def absolute(path: str | os.PathLike[str]) -> str:
    """A URI unchanged; a local path made absolute (``~`` expanded, symlinks resolved)."""
    text = str(path)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    return text if is_uri(text) else str(Path(text).expanduser().resolve())


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URI (no normalisation of the base)."""
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def read_json(uri: str) -> Any:
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        return json.load(f)


PARTIAL_SUFFIX = ".partial"


def partial_path(path: str) -> str:
    """The temporary name of ``path`` while it is written: ``dir/.name.partial``."""
    head, base = os.path.split(os.fspath(path))
    return os.path.join(head, f".{base}{PARTIAL_SUFFIX}")


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; some filesystems cannot open a folder: best effort.
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A binary file that appears at ``path`` only on :meth:`commit`; :meth:`abort` removes it.

    As a context manager it commits on success and aborts on an exception.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.tmp_path = partial_path(self.path)
        self.file: BinaryIO = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp_path, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes_atomic(path: str, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)


def write_json_atomic(uri: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented, key-sorted JSON (stable bytes for the same object), atomically, on a
    local path or an fsspec URI (see the module docstring)."""
    raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
    target = str(uri).removeprefix("file://")
    if not is_uri(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        write_bytes_atomic(target, raw)
        return
    fs, path = fsspec.core.url_to_fs(target)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, raw)


def redact(uri: str | None) -> str | None:
    """``uri`` without credentials: the password of ``user:pass@`` becomes ``***`` and query
    parameters that look like secrets (``token``, ``password``, ``X-Amz-Signature``, ...) too.

    >>> redact("http://alice:s3cret@mlflow:5000/x?token=abc&page=2")
    'http://alice:***@mlflow:5000/x?token=***&page=2'
    """
    if uri is None or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*"
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # urlunsplit would rewrite e.g. sqlite://// as sqlite://
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user:password@, user, password)``: for handing a URI to another process
    while the credentials travel separately (environment variables, never job metadata)."""
    if "://" not in uri:
        return uri, None, None
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, user or None, password or None
