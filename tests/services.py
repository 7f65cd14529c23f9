"""Real services for the tests, started and stopped by the test session.

- :class:`MlflowServer`: ``mlflow server`` on 127.0.0.1 with a sqlite backend and a local
  artifact folder (proxied: clients upload through the server, as in production), job execution
  off and one worker (healthy in ~6-7 s instead of ~33 s). :meth:`~Service.kill` SIGKILLs it (a
  server gone mid-request); :meth:`~MlflowServer.restart` brings it back on the same port and
  store.
- :class:`ModelServer`: ``mlflow models serve -m URI --env-manager local`` on 127.0.0.1.

Every service runs in its own process group and is stopped by signalling the group: a bare
SIGTERM to ``mlflow server`` once left its worker children behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


class Service:
    """A command in its own process group, healthy when ``health_url`` answers 200."""

    def __init__(self, name: str, root: Path, port: int | None = None):
        self.name = name
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / f"{name}.log"
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return _env()

    health_path = "/health"

    def start(self, timeout: float = 120.0) -> Service:
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        self.started_in = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        self._kill_stragglers()

    def kill(self) -> None:
        """SIGKILL the whole group at once: the service is gone, mid-request or not."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        self._kill_stragglers()

    def _kill_stragglers(self) -> None:
        # children that outlived the leader keep the group id: signal it once more
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MlflowServer(Service):
    """``mlflow server`` over ``root/mlflow.db`` with artifacts in ``root/artifacts``."""

    def __init__(self, root: Path, port: int | None = None):
        super().__init__("mlflow-server", root, port)

    def command(self) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]

    def env(self) -> dict[str, str]:
        return _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")

    def restart(self, timeout: float = 120.0) -> MlflowServer:
        self.stop()
        self.start(timeout)
        return self


class ModelServer(Service):
    """``mlflow models serve -m MODEL_URI --env-manager local`` against ``tracking_uri``."""

    health_path = "/ping"

    def __init__(self, root: Path, model_uri: str, tracking_uri: str, port: int | None = None):
        super().__init__("model-server", root, port)
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri

    def command(self) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            self.model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-w",
            "1",
        ]

    def env(self) -> dict[str, str]:
        return _env(
            MLFLOW_TRACKING_URI=self.tracking_uri,
            MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
        )
