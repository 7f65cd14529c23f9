"""Tar files: safe streaming reads of untrusted tars, deterministic atomic writes of our own.

Reading never extracts anything to disk and never follows links: members are read into memory by
name, and a member whose name or type is unsafe is reported, not opened.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from diffusion_core.data.reasons import Reason
from diffusion_core.data.safety import too_large
from diffusion_core.storage import AtomicFile


@dataclass(frozen=True)
class Member:
    """One tar member: its name and bytes, or (``reason`` set) why it was refused."""

    name: str
    data: bytes | None = None
    reason: Reason | None = None
    detail: str = ""


def member_problem(info: tarfile.TarInfo) -> tuple[Reason, str] | None:
    """Why a member must not be used, or None when it is a plain file with a safe relative name."""
    name = info.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return Reason.UNSAFE_PATH, f"absolute path {name!r}"
    if ".." in name.replace("\\", "/").split("/"):
        return Reason.UNSAFE_PATH, f"'..' component in {name!r}"
    if info.issym() or info.islnk():
        return (
            Reason.LINK_MEMBER,
            f"{'symlink' if info.issym() else 'hard link'} {name!r} -> {info.linkname!r}",
        )
    if not info.isfile():
        return Reason.SPECIAL_MEMBER, f"member {name!r} of tar type {info.type!r}"
    return None


class _TailReader(io.RawIOBase):
    """Pass reads through, remembering the last 512 bytes (to check the end-of-archive marker)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self._raw.read(n)
        if b:
            self.tail = (self.tail + b)[-512:]
        return b

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def iter_tar(fileobj: BinaryIO, max_member_bytes: int | None = None) -> Iterator[Member]:
    """Stream the members of an untrusted (uncompressed) tar in order.

    Directories are skipped. Unsafe members come out with a reason, and so does a member larger
    than ``max_member_bytes`` (by its header; its data is streamed past, never held in memory).
    If the tar is cut short or damaged, a final ``Member`` with reason ``truncated_tar``
    (``corrupt_tar`` when not even one header could be read) reports it, after every intact
    member before the damage. A tar cut exactly at a member boundary is caught by its missing
    end-of-archive marker (a zero block).
    """
    n_ok = n_seen = 0  # intact members; members seen (a refused one proves the tar readable)
    reader = _TailReader(fileobj)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tf:
            for info in tf:
                n_seen += 1
                if info.isdir():
                    continue
                problem = member_problem(info)
                if (
                    problem is None
                    and max_member_bytes is not None
                    and info.size > max_member_bytes
                ):
                    problem = Reason.FILE_TOO_LARGE, too_large(info.size, max_member_bytes)
                if problem is not None:
                    yield Member(info.name, reason=problem[0], detail=problem[1])
                    continue
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(
                        f"member {info.name!r} has {len(data)} of its {info.size} bytes"
                    )
                n_ok += 1
                yield Member(info.name, data=data)
        reader.drain()
        if reader.tail != bytes(512):
            raise tarfile.ReadError("no end-of-archive marker: the file was cut short")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        reason = Reason.TRUNCATED_TAR if n_seen else Reason.CORRUPT_TAR
        yield Member(
            "", reason=reason, detail=f"after {n_ok} intact members: {type(e).__name__}: {e}"
        )


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.emb.npy`` -> (``dir/abc``, ``emb.npy``): the key ends at the basename's first dot."""
    head, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    key = posixpath.join(head, stem) if head else stem
    return key, ext.lower() if dot else ""


class DeterministicTarWriter:
    """Write a tar whose bytes depend only on the members given (fixed mtime, owner, mode).

    The tar is written to a hidden temporary name beside the target and renamed over it on
    :meth:`close`; :meth:`abort` removes the temporary file. The sha256 is computed while writing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._out = AtomicFile(path)
        self.tmp_path = self._out.tmp_path
        self._hashing = _HashingWriter(self._out.file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, key: str, members: Iterable[tuple[str, bytes]]) -> None:
        for ext, data in members:
            self.add(f"{key}.{ext}", data)
        self.count += 1

    def close(self) -> str:
        """Finish the tar, fsync, rename into place; return its sha256."""
        self._tar.close()
        self._out.commit()
        return self._hashing.hexdigest()

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 - best effort before removing the file
            pass
        self._out.abort()


class _HashingWriter(io.RawIOBase):
    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self._h.update(b)
        self.size += len(b)
        return self._raw.write(b)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> str:
    """Write ``(name, bytes)`` members to a deterministic tar at ``path``; return its sha256."""
    w = DeterministicTarWriter(path)
    try:
        for name, data in members:
            w.add(name, data)
    except BaseException:
        w.abort()
        raise
    return w.close()


class HashingReader(io.RawIOBase):
    """Pass reads through, hashing every byte (a file read once for its sha256 and its tar)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._h = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self._raw.read(n)
        self._h.update(b)
        return b

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        r = HashingReader(f)
        r.drain(chunk)
    return r.hexdigest()
