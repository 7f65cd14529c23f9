"""Paths, URIs and small files: the one filesystem layer of every job.

- :func:`filesystem`: THE place that turns a path or URI into ``(fsspec filesystem, path)``;
  :func:`pyarrow_filesystem` the same for pyarrow (what Ray Train's ``RunConfig`` takes). An
  ``s3://`` URI gets its endpoint and credentials from the standard environment variables
  (:data:`S3_ENV`), the ones boto3, s3fs, pyarrow and MLflow read, so one set of variables
  configures every client.
- :func:`absolute`: a URI stays as it is, a local path becomes absolute (what Ray and a cluster
  need: the same string must mean the same place everywhere).
- :class:`AtomicFile` / :func:`write_bytes_atomic` / :func:`write_json_atomic`: the one
  "write then publish" of the project (shards, manifests, run records, exports). A local write
  goes to a hidden ``.<name>.partial`` beside the target, is fsynced and renamed into place, so a
  reader sees the old file or the new one, never half of one (a killed writer leaves only the
  ``.partial``). On an object store the bytes are spooled to a local temporary file and sent in
  one upload on commit: an object appears whole (a single PUT, or a multipart upload, which is
  only visible once completed) or not at all, and nothing ``.partial`` is ever visible there.
- :func:`exists`, :func:`read_bytes`, :func:`read_json`, :func:`listdir`, :func:`list_entries`,
  :func:`remove`, :func:`append_bytes`, :func:`download`, :func:`upload_dir`: on a local disk or
  an object store.
- :func:`safe_relpath` / :func:`local_target`: an object key made a local path only if it
  cannot leave the target folder (no ``..``, no absolute name); ``download`` checks every key.
- :func:`redact`: a URI fit for logs, params, tags and job metadata (no password, no token).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec

_SECRET_QUERY = re.compile(r"(pass|secret|token|key|signature|credential|auth)", re.I)

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "access key (boto3, s3fs, pyarrow, MLflow)",
    "AWS_SECRET_ACCESS_KEY": "secret key",
    "AWS_SESSION_TOKEN": "temporary credentials' token (optional)",
    "AWS_ENDPOINT_URL_S3": "an S3-compatible endpoint, e.g. http://minio:9000 (botocore's name); "
    "AWS_ENDPOINT_URL and MLflow's MLFLOW_S3_ENDPOINT_URL are read if it is unset",
    "AWS_DEFAULT_REGION": "region (AWS_REGION also read; us-east-1 if neither)",
}
"""The variables that configure object storage, for every client of the project (docs/deploy.md,
"Object storage")."""

_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def absolute(path: str | os.PathLike[str]) -> str:
    """A URI unchanged; a local path made absolute (``~`` expanded, symlinks resolved)."""
    text = str(path)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    return text if is_uri(text) else str(Path(text).expanduser().resolve())


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URI (no normalisation of the base)."""
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


# -- filesystems -----------------------------------------------------------------------------


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself)."""
    return next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)


def s3_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for ``uri``: for ``s3://``, the endpoint, region and credentials of the
    environment (given explicitly, so a cached filesystem never outlives changed credentials)
    and no listing cache (other processes write the same prefixes: a run's workers, the driver)."""
    if not str(uri).startswith(("s3://", "s3a://")):
        return {}
    opts: dict[str, Any] = {
        "use_listings_cache": False,
        "client_kwargs": {"region_name": s3_region()},
    }
    if endpoint := s3_endpoint():
        opts["endpoint_url"] = endpoint
    key, secret, token = (os.environ.get(v) for v in _CREDENTIAL_VARS)
    if key and secret:
        opts.update(key=key, secret=secret)
        if token:
            opts["token"] = token
    return opts


def filesystem(uri: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path on it)`` for a local path or a URI (see the module docstring)."""
    text = str(uri)
    if not is_uri(text):  # absolute, symlinks kept (the readers check them themselves)
        local = os.path.expanduser(text.removeprefix("file://"))
        return fsspec.filesystem("file"), os.path.abspath(local)
    try:
        return fsspec.core.url_to_fs(text, **storage_options(text))
    except ImportError as e:
        raise ValueError(f"no filesystem for {redact(text)!r}: {e}") from e


def pyarrow_filesystem(uri: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(pyarrow filesystem, path on it)``: what Ray Train's ``RunConfig(storage_path=path,
    storage_filesystem=fs)`` takes. ``s3://`` gets the native S3 filesystem with the settings of
    :func:`storage_options` (the credentials travel inside the filesystem object, so Ray's
    controller can write the run without the variables in its own environment); any other URI
    is fsspec's, wrapped."""
    import pyarrow.fs as pafs

    text = str(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), absolute(text)
    if text.startswith(("s3://", "s3a://")):
        key, secret, token = (os.environ.get(v) for v in _CREDENTIAL_VARS)
        kwargs: dict[str, Any] = {"region": s3_region()}
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret, session_token=token)
        if endpoint := s3_endpoint():
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = urlsplit(endpoint).scheme or "https"
        return pafs.S3FileSystem(**kwargs), text.split("://", 1)[1].rstrip("/")
    fs, path = filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def storage_env() -> dict[str, str]:
    """The object-storage variables set in this process (:data:`S3_ENV` and the alternative
    endpoint names): what another process of the same job needs, in its environment only."""
    names = (*S3_ENV, *_ENDPOINT_VARS, "AWS_REGION")
    return {n: os.environ[n] for n in dict.fromkeys(names) if os.environ.get(n)}


def exists(uri: str | os.PathLike[str]) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_json(uri: str | os.PathLike[str]) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def open_file(uri: str | os.PathLike[str], mode: str = "rb") -> Any:
    """An open file (read modes; writes go through :class:`AtomicFile`)."""
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def listdir(uri: str | os.PathLike[str]) -> list[str]:
    """Names directly under a folder or prefix (empty if there is none)."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})


_TOKEN_KEYS = (
    "ETag", "etag", "md5Hash", "crc32c", "LastModified", "last_modified", "mtime", "created",
)  # fmt: skip


def list_entries(uri: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What lies directly under a folder or prefix (empty if nothing): one dict per entry,
    sorted by name, with ``name`` (the last part of the key, as stored: not checked),
    ``type`` (``file`` or ``directory``), ``size`` and ``token``, a change marker of the file
    when the filesystem gives one (an S3 ETag, a GCS md5, else a modification time; None if
    none): what a cache keys a remote file by before reading it."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if not name or str(e["name"]).rstrip("/") == path.rstrip("/"):
            continue
        token = next((str(e[k]) for k in _TOKEN_KEYS if e.get(k) not in (None, "")), None)
        kind = "file" if e.get("type") == "file" else "directory"
        out[name] = {"name": name, "type": kind, "size": int(e.get("size") or 0), "token": token}
    return [out[n] for n in sorted(out)]


def remove(uri: str | os.PathLike[str], *, missing_ok: bool = True) -> None:
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def size(uri: str | os.PathLike[str]) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


def safe_relpath(rel: str) -> str:
    """``rel`` if it is a plain relative path (``a/b/c``) that cannot leave the folder it is
    joined to; ``ValueError`` saying why otherwise (absolute, ``..``, ``.``, empty parts,
    backslashes, NUL). For names that come from an object store or a file someone else wrote:
    an object key ``stages/../../x`` must not become a local path outside the target folder."""
    text = str(rel)
    why = None
    if not text:
        why = "it is empty"
    elif "\x00" in text:
        why = "it contains a NUL byte"
    elif "\\" in text:
        why = "it contains a backslash"
    elif text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        why = "it is absolute"
    elif any(part in ("", ".", "..") for part in text.split("/")):
        why = "it has an empty, '.' or '..' component"
    if why:
        raise ValueError(f"refusing the object name {text!r}: {why} (it could escape the folder)")
    return text


def local_target(root: str | os.PathLike[str], rel: str) -> Path:
    """``root/rel`` for a name checked with :func:`safe_relpath`, verified to lie inside
    ``root`` once resolved (a symlink in ``root`` cannot redirect it either)."""
    base = Path(root).resolve()
    target = (base / safe_relpath(rel)).resolve()
    if not target.is_relative_to(base):
        raise ValueError(f"refusing the object name {rel!r}: it resolves outside {base}")
    return target


def download(uri: str, local: str | os.PathLike[str]) -> Path:
    """A copy of the folder (or file) ``uri`` at ``local``; a local ``uri`` is copied too.
    Refuses (``ValueError``) a folder holding a key that would land outside ``local``."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        base = path.rstrip("/") + "/"
        for found in fs.find(path):
            if found.startswith(base):
                safe_relpath(found[len(base) :])
    fs.get(path.rstrip("/") + ("/" if fs.isdir(path) else ""), str(local), recursive=True)
    return Path(local)


def upload_dir(local: str | os.PathLike[str], uri: str, *, last: tuple[str, ...] = ()) -> None:
    """Every file under ``local`` to the same relative names under ``uri``, each atomically;
    the relative names in ``last`` go after all the others (a marker such as a manifest, whose
    presence says the rest is complete)."""
    root = Path(local)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    for rel in [f for f in files if f not in last] + [f for f in last if f in files]:
        with open(root / rel, "rb") as src, AtomicFile(join(uri, rel)) as dst:
            shutil.copyfileobj(src, dst)


# -- atomic writes ---------------------------------------------------------------------------

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
    """A binary file that appears at ``path`` (local or a URI) only on :meth:`commit`;
    :meth:`abort` drops it. As a context manager it commits on success and aborts on an
    exception. Locally the bytes go to ``.<name>.partial`` beside the target; for a URI, to a
    local temporary file that one upload publishes (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path).removeprefix("file://")
        self.remote = is_uri(self.path)
        if self.remote:
            self.tmp_path = None
            self.file: BinaryIO = tempfile.TemporaryFile(prefix="cascade-upload-")
        else:
            self.tmp_path = partial_path(self.path)
            self.file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        self.file.flush()
        if self.remote:
            try:
                fs, path = filesystem(self.path)
                self.file.seek(0)
                with fs.open(path, "wb") as out:  # one upload, published when closed
                    shutil.copyfileobj(self.file, out, 8 << 20)
            finally:
                self.file.close()
            return
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp_path, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        self.file.close()
        if self.tmp_path is not None and os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def makedirs(uri: str | os.PathLike[str]) -> None:
    """A local folder (and its parents); nothing for an object store, which has no folders."""
    if not is_uri(uri):
        os.makedirs(absolute(uri), exist_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    if not is_uri(path):
        makedirs(os.path.dirname(absolute(path)))
    with AtomicFile(path) as f:
        f.write(data)


def write_json_atomic(uri: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented, key-sorted JSON (stable bytes for the same object), atomically, on a
    local path or a URI (see the module docstring)."""
    write_bytes_atomic(uri, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def append_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Append to a file. An object store cannot append: the object is read and rewritten whole
    (atomically), so one writer at a time (e.g. rank 0's ``attempts.jsonl``)."""
    if not is_uri(uri):
        makedirs(os.path.dirname(absolute(uri)))
        with open(absolute(uri), "ab") as f:
            f.write(data)
        return
    old = read_bytes(uri) if exists(uri) else b""
    write_bytes_atomic(uri, old + data)


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
