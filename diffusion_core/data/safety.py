"""Reading inputs without reaching outside the source: no symlinks, no escaping paths, a size cap.

Every file the ingest reads goes through here, in the Ray tasks and in the local loop alike.

- A file is named by a *location*: ``{"root": DIR, "rel": "a/b.png"}`` for a local file (opened
  component by component below ``DIR`` with ``O_NOFOLLOW``, so no symlink is followed even if
  one appears after planning) or ``{"url": URL}`` for an fsspec URL.
- Before reading, the size (``fstat``, the filesystem's ``size``, a tar header) is checked against
  ``max_file_bytes``: a 5 GB "image" is refused, never read into memory.
- A manifest row's path is resolved by :func:`resolve_manifest_path`: relative to the manifest's
  folder, and it must stay below that folder (after resolving symlinks) or an allowed root; a URL
  needs ``allow_remote`` (or an allowed URL prefix).
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

from diffusion_core.data.images import Rejected
from diffusion_core.data.reasons import Reason
from diffusion_core.storage import filesystem, open_file

DEFAULT_MAX_FILE_BYTES = 64 * 2**20

Location = dict[str, str]


@dataclass(frozen=True)
class ReadPolicy:
    """What the readers may open. ``allow_roots``: local folders or URL prefixes that manifest
    paths may point into besides the manifest's folder; ``allow_remote``: any URL in a manifest."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    allow_roots: tuple[str, ...] = ()
    allow_remote: bool = False


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol


def describe(loc: Location) -> str:
    return loc["url"] if "url" in loc else os.path.join(loc["root"], loc["rel"])


def too_large(size: int, limit: int) -> str:
    """The rejection detail of a file over the cap."""
    return (
        f"{size} bytes ({size / 2**20:.1f} MiB) > max_file_bytes={limit}: not read; "
        "raise --max-file-bytes if such files are wanted"
    )


# ------------------------------------------------------------------------------- local files


def walk_local(root: str) -> tuple[list[str], list[str]]:
    """Relative paths (``/``-separated, sorted) of the files and of the symlinks below ``root``.

    A symlink, to a file or a folder, is listed as a link and never followed; anything that is
    neither a folder nor a link (a FIFO, a device) counts as a file and is refused when opened.
    """
    files: list[str] = []
    links: list[str] = []
    todo = [""]
    while todo:
        d = todo.pop()
        with os.scandir(os.path.join(root, d) if d else root) as it:
            for e in it:
                rel = f"{d}/{e.name}" if d else e.name
                if e.is_symlink():
                    links.append(rel)
                elif e.is_dir(follow_symlinks=False):
                    todo.append(rel)
                else:
                    files.append(rel)
    return sorted(files), sorted(links)


def _open_below(root: str, rel: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``root/rel``, following no symlink below ``root``.

    ``root`` itself may be a link (the user named it). Raises :class:`Rejected` (``symlink``,
    ``special_file``, ``unsafe_path``) or ``FileNotFoundError``.
    """
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise Rejected(Reason.UNSAFE_PATH, f"{rel!r} is not a plain relative path")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW
            # O_NONBLOCK: opening a FIFO must not hang (it is refused by the fstat below)
            flags |= os.O_NONBLOCK if last else os.O_DIRECTORY
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(part, dir_fd=fd)
                    where = "/".join(parts[: i + 1])
                    raise Rejected(
                        Reason.SYMLINK, f"{where!r} is a symlink to {target!r}: never followed"
                    ) from None
                raise FileNotFoundError(
                    errno.ENOENT, f"{'/'.join(parts[: i + 1])!r} is not a folder", rel
                ) from None
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a folder" if stat.S_ISDIR(st.st_mode) else f"not a regular file ({st.st_mode:o})"
            )
            raise Rejected(Reason.SPECIAL_FILE, f"{rel!r} is {kind}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


# ------------------------------------------------------------------------------- any location


def open_stream(loc: Location) -> BinaryIO:
    """A binary file object for streaming (tars, manifests): no size cap, no symlink followed."""
    if "url" in loc:
        return open_file(loc["url"])
    fd, _ = _open_below(loc["root"], loc["rel"])
    return os.fdopen(fd, "rb")


def read_file(loc: Location, max_bytes: int) -> bytes:
    """The whole file, refused (``file_too_large``) before reading when it is over ``max_bytes``."""
    if "url" in loc:
        fs, path = filesystem(loc["url"])
        size = fs.size(path)  # None when the server does not say: the bounded read below decides
        if size is not None and size > max_bytes:
            raise Rejected(Reason.FILE_TOO_LARGE, too_large(size, max_bytes))
        f: BinaryIO = fs.open(path, "rb")
    else:
        fd, size = _open_below(loc["root"], loc["rel"])
        f = os.fdopen(fd, "rb")
        if size > max_bytes:
            f.close()
            raise Rejected(Reason.FILE_TOO_LARGE, too_large(size, max_bytes))
    with f:
        data = _read_bounded(f, max_bytes, size)
    if len(data) > max_bytes:
        raise Rejected(Reason.FILE_TOO_LARGE, too_large(len(data), max_bytes))
    return data


def _read_bounded(f: BinaryIO, limit: int, size: int | None) -> bytes:
    """At most ``limit + 1`` bytes: bounded even if the file grew or its size is unknown. The
    first read asks for the expected size (``read(n)`` allocates ``n`` up front), then 1 MiB;
    a short read is the end of the file."""
    chunks: list[bytes] = []
    got = 0
    ask = min(size, limit) + 1 if size is not None else 1 << 20
    while got <= limit:
        ask = min(ask, limit + 1 - got)
        b = f.read(ask)
        chunks.append(b)
        got += len(b)
        if len(b) < ask:
            break
        ask = 1 << 20
    return b"".join(chunks)


# ------------------------------------------------------------------------------- manifests


def _norm_url(url: str) -> str:
    proto, _, rest = url.partition("://")
    rest = posixpath.normpath("/" + rest).lstrip("/")
    return f"{proto.lower()}://{rest}"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=64)
def _real(path: str) -> str:
    return os.path.realpath(path)


def _local_location(path: str, base: str | None, roots: list[str], given: str) -> Location:
    if not os.path.isabs(path):
        if base is None:
            raise Rejected(
                Reason.UNSAFE_PATH, f"{given!r}: a relative local path in a remote manifest"
            )
        path = os.path.join(base, path)
    real = os.path.realpath(path)  # resolves '..' and every symlink: where the bytes really are
    for root in ([base] if base is not None else []) + roots:
        r = _real(root)
        if real == r:
            raise Rejected(Reason.SPECIAL_FILE, f"{given!r} names the folder {r!r}, not a file")
        if _under(real, r):
            return {"root": r, "rel": real[len(r) :].lstrip("/")}
    # no absolute location in the detail: rejected.jsonl is part of the dataset's content
    via = " through a symlink" if os.path.normpath(path) != real else ""
    roots_note = " and the allowed roots" if roots else ""
    raise Rejected(
        Reason.UNSAFE_PATH,
        f"{given!r} leads{via} outside the manifest's folder{roots_note}: move the file below "
        "the manifest's folder or allow its folder with --allow-root DIR (IngestConfig.allow_roots)",
    )


def resolve_manifest_path(given: str, base: Location, policy: ReadPolicy) -> Location:
    """Where a manifest row's image is, or :class:`Rejected` (``unsafe_path``) when it lies
    outside the manifest's folder (``base``) and the allowed roots, or is a URL not allowed."""
    local_roots = [r.removeprefix("file://") for r in policy.allow_roots if _is_path(r)]
    url_roots = [_norm_url(r) for r in policy.allow_roots if not _is_path(r)]
    base_dir = base.get("root")
    if given.startswith("file://"):
        return _local_location(given.removeprefix("file://"), base_dir, local_roots, given)
    if "://" in given:
        url = _norm_url(given)
        inside = "url" in base and _under(url, _norm_url(base["url"]))
        if policy.allow_remote or inside or any(_under(url, r) for r in url_roots):
            return {"url": given}
        raise Rejected(
            Reason.UNSAFE_PATH,
            f"{given!r} is a URL; a manifest may name only files below its own folder: pass "
            "--allow-remote (IngestConfig.allow_remote) to fetch URLs, or --allow-root PREFIX",
        )
    if base_dir is not None:
        return _local_location(given, base_dir, local_roots, given)
    # a plain path in a remote manifest: in the manifest's filesystem (object stores have no
    # symlinks, so normalising the path is resolving it)
    proto, _, bpath = _norm_url(base["url"]).partition("://")
    path = posixpath.normpath(posixpath.join("/" + bpath, given)).lstrip("/")
    url = f"{proto}://{path}"
    if (
        _under(url, f"{proto}://{bpath}")
        or policy.allow_remote
        or any(_under(url, r) for r in url_roots)
    ):
        return {"url": url}
    raise Rejected(
        Reason.UNSAFE_PATH,
        f"{given!r} leads outside the manifest's folder: pass --allow-root PREFIX or "
        "--allow-remote",
    )


def _is_path(root: str) -> bool:
    return root.startswith("file://") or "://" not in root
