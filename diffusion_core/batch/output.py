"""Where a batch job writes: a local folder or any fsspec URI (``s3://bucket/prefix``).

A thin layer of relative names (``images/x.png``) over :mod:`diffusion_core.storage`, the one
filesystem layer: every file appears whole or not at all (``AtomicFile``: a hidden ``.partial``
renamed locally, one upload on an object store), and an ``s3://`` output takes its endpoint and
credentials from the environment, never from the job's arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from diffusion_core import storage


def worker_env(root: str) -> dict[str, str]:
    """The object-storage variables of this process, for the tasks and actors of a job writing
    to ``root`` (none for a local folder): the candidates for the workers' runtime env, of which
    :func:`diffusion_core.ray_env.worker_env_vars` keeps the credentials only where the workers
    do not inherit them. Never in job metadata."""
    return storage.storage_env() if storage.is_uri(root) else {}


class Output:
    """The output location of a job: ``root`` (an absolute local path or a URI)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self.remote = storage.is_uri(root)

    def uri(self, rel: str) -> str:
        return storage.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return storage.exists(self.uri(rel))

    def makedirs(self) -> None:
        storage.makedirs(self.root)

    def listdir(self, rel: str) -> list[str]:
        return storage.listdir(self.uri(rel))

    def read_bytes(self, rel: str) -> bytes:
        return storage.read_bytes(self.uri(rel))

    def open_read(self, rel: str) -> BinaryIO:
        return storage.open_file(self.uri(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        storage.write_bytes_atomic(self.uri(rel), data)

    def makedirs_for(self, rel: str) -> None:
        """The local folder of ``rel`` (nothing on an object store)."""
        storage.makedirs(self.uri(rel).rsplit("/", 1)[0])

    @contextmanager
    def atomic(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file that appears at ``rel`` whole when the block ends without an error."""
        self.makedirs_for(rel)
        with storage.AtomicFile(self.uri(rel)) as f:
            yield f.file

    def remove(self, *rels: str) -> None:
        """Remove files (those already gone are fine)."""
        for rel in rels:
            storage.remove(self.uri(rel))

    def remove_tree(self, rel: str) -> None:
        fs, path = storage.filesystem(self.uri(rel))
        if fs.exists(path):
            fs.rm(path, recursive=True)
