"""The project's services on one machine, on loopback, started and stopped as one unit.

    python infra/local/services.py up [--auth] [--ray] [--state DIR] [--mlflow-port N] ...
    python infra/local/services.py status [--json]
    eval "$(python infra/local/services.py env)"     # MLFLOW_TRACKING_URI, PREFECT_API_URL, ...
    python infra/local/services.py down

What ``up`` starts (each in its own process group, with a health check, a log and a pid file):

- ``mlflow``: ``mlflow server`` on a sqlite store with proxied artifacts
  (``--artifacts-destination``: a local folder, or ``--artifacts-destination s3://bucket/mlflow``
  with the S3 endpoint and keys in the server's environment only, ``docs/deploy.md``), one
  worker, job execution off (healthy in seconds instead of ~30). With ``--auth``: the ``basic-auth`` app, an admin password generated into the state
  folder (MLflow 3.17 ships none and refuses to start without one), a Flask secret key.
- ``prefect-server``: ``prefect server start --no-ui`` with its sqlite database in the state
  folder. With ``--auth``: ``PREFECT_SERVER_API_AUTH_STRING`` (``/api/health`` stays open,
  everything else answers 401 without it).
- ``prefect-worker``: a worker of the process work pool ``cascade-process`` (it creates the pool),
  running flow runs from the repository root with the client settings (``env``) in its
  environment, so deployment runs use these services.
- ``ray`` (``--ray``): ``ray start --head --block``, dashboard and Jobs API on 127.0.0.1. Ray 2.60
  replaces a loopback ``--node-ip-address`` by the machine's address and its GCS, raylet and
  object manager listen on every interface, so this head always runs with token authentication
  (``RAY_AUTH_MODE=token``, the token generated into the state folder), with or without
  ``--auth``.
  ``RAY_ADDRESS`` is the head's GCS (drivers run here, attached to the head); the Jobs API's
  http address is ``RAY_API_SERVER_ADDRESS`` (set ``RAY_ADDRESS`` to it to submit instead).

State folder (default ``.services/``): ``services.json`` (ports, flags; no secrets),
``pids/<name>.json``, ``logs/<name>.log``, ``secrets/`` (0700; each file 0600, generated once and
reused: the MLflow admin password only takes effect when its user store is created),
``mlflow/`` (store, artifacts, auth store), ``prefect/`` (``PREFECT_HOME``), ``ray/`` (temp dir).
Secrets travel to the servers in environment variables only, never on a command line or in a log
line, and ``env`` prints ``$(cat FILE)`` for them rather than their values.

``down`` stops every service by its recorded process (pid and start time, so a reused pid is
never signalled): the signal each one needs (SIGINT to the Prefect server, twice to the worker,
which lingers after one; SIGTERM to MLflow's process group, which takes its worker children with
it; SIGTERM to the Ray head's ``ray start`` alone, which drains and stops its processes), then
SIGKILL for whatever of the group and of the recorded descendants is left after a grace period.
Linux reads process trees from /proc; elsewhere only process groups are used.

For tests and scripts that need one server of their own (not recorded in a state folder):
:class:`Server` (a command in its own process group, healthy when a URL answers 200; ``stop``,
``kill`` for "gone mid-request") and :class:`MlflowServer` (the same ``mlflow server`` command
as ``up``, from :func:`mlflow_server_command`, with ``restart`` on the same port and store).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE = Path(".services")
HOST = "127.0.0.1"
POOL = "cascade-process"
AUTOMATIONS = Path(__file__).resolve().parents[1] / "prefect" / "automations.yaml"
WORKER_NAME = "cascade-local-worker"
MLFLOW_ADMIN = "admin"
PREFECT_USER = "cascade"
# Start order; `down` goes the other way (the worker before the server it talks to).
ORDER = ("mlflow", "prefect-server", "ray", "prefect-worker")
# Inherited settings that would point a service (or the worker's flow runs) somewhere else.
_FOREIGN = ("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "RAY_AUTH_", "RAY_API_SERVER_ADDRESS")


class ServiceError(RuntimeError):
    """A service that could not be started, checked or stopped; the message says what to do."""


@dataclass
class Ports:
    """Loopback ports. Defaults are each tool's own, so the usual client settings work."""

    mlflow: int = 5000
    prefect: int = 4200
    ray: int = 6379  # GCS
    ray_dashboard: int = 8265  # dashboard + Jobs API (RAY_API_SERVER_ADDRESS)
    ray_client: int = 10001
    ray_agent: int = 52365


@dataclass
class Config:
    """What ``up`` was asked for; saved as ``services.json`` so status/env/down need no flags."""

    auth: bool = False
    ray: bool = False
    ui: bool = False
    ports: Ports = field(default_factory=Ports)
    artifacts_destination: str | None = None  # None: STATE/mlflow/artifacts

    @classmethod
    def load(cls, path: Path) -> Config | None:
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(
            auth=raw["auth"],
            ray=raw["ray"],
            ui=raw.get("ui", False),
            ports=Ports(**raw["ports"]),
            artifacts_destination=raw.get("artifacts_destination"),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)


@dataclass
class Record:
    """A started service's process: what its pid file holds."""

    name: str
    pid: int
    pgid: int
    start_ticks: str | None  # /proc start time: tells a live process from a reused pid
    started_at: float  # wall clock, for "the worker's first heartbeat came after it started"
    url: str
    log: str


@dataclass
class Stop:
    """How a service is stopped before SIGKILL: the signal, to whom, and how long to wait."""

    sig: int = signal.SIGTERM
    leader_only: bool = False
    repeat_after: float | None = None
    grace: float = 20.0


# How each service is stopped (see the module docstring for why).
STOPS = {
    "mlflow": Stop(signal.SIGTERM, grace=15),
    "prefect-server": Stop(signal.SIGINT, grace=25),
    "prefect-worker": Stop(signal.SIGINT, repeat_after=3.0, grace=20),
    "ray": Stop(signal.SIGTERM, leader_only=True, grace=45),
}


@dataclass
class Spec:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    healthy: Callable[[Record], bool]
    cwd: Path = ROOT


# -- processes -------------------------------------------------------------------------------

_PROC = Path("/proc")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], pgid [2])."""
    try:
        return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid: int) -> str | None:
    st = _stat(pid)
    return st[19] if st else None


def _pid_alive(pid: int, start_ticks: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    st = _stat(pid)
    if st is None:
        return not _PROC.is_dir()
    if st[0] in ("Z", "X"):
        return False
    return start_ticks is None or st[19] == start_ticks


def _processes() -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    if not _PROC.is_dir():
        return out
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            out[int(entry.name)] = st
    return out


def _family(rec: Record) -> dict[int, str | None]:
    """Live members of the service's process group and descendants of its leader, with their
    start times (a child that left the group, e.g. a Ray job driver, is still found)."""
    procs = _processes()
    members = {pid for pid, st in procs.items() if int(st[2]) == rec.pgid}
    children: dict[int, list[int]] = {}
    for pid, st in procs.items():
        children.setdefault(int(st[1]), []).append(pid)
    todo = [rec.pid] if _pid_alive(rec.pid, rec.start_ticks) else []
    while todo:
        pid = todo.pop()
        members.add(pid)
        todo.extend(c for c in children.get(pid, ()) if c not in members)
    return {
        pid: procs[pid][19] for pid in members if pid in procs and procs[pid][0] not in ("Z", "X")
    }


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback port (for tests that start their own services)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- HTTP ------------------------------------------------------------------------------------


def _request(
    url: str, *, headers: dict[str, str] | None = None, body: dict | None = None
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def basic_auth(user_pass: str) -> dict[str, str]:
    """The ``Authorization`` header for ``user:password`` (how Prefect's client sends
    ``PREFECT_API_AUTH_STRING`` and MLflow's sends its username and password)."""
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


# -- secrets ---------------------------------------------------------------------------------


class Secrets:
    """Generated credentials, one 0600 file each in a 0700 folder, created once and reused."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str) -> Path:
        return self.folder / name

    def get(self, name: str, make: Callable[[], str]) -> str:
        path = self.path(name)
        if path.is_file():
            value = path.read_text().strip()
            if value:
                return value
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        value = make()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        os.chmod(path, 0o600)
        return value

    def values(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        files = [p for p in sorted(self.folder.iterdir()) if p.is_file()]
        return [v for p in files if (v := p.read_text().strip())]


def _token() -> str:
    return secrets.token_urlsafe(32)


# -- the services ----------------------------------------------------------------------------


class Services:
    """The local services of one state folder.

    ``auth``, ``ray``, ``ui`` and ``ports`` are what ``up`` starts; left as None they come from
    the folder's ``services.json`` (what the last ``up`` started), else the defaults.
    """

    def __init__(
        self,
        state: str | Path = DEFAULT_STATE,
        *,
        auth: bool | None = None,
        ray: bool | None = None,
        ui: bool | None = None,
        ports: Ports | None = None,
        artifacts_destination: str | None = None,
        bin_dir: str | Path | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        self.state = Path(state).absolute()
        saved = Config.load(self.state / "services.json") or Config()
        self.config = Config(
            auth=saved.auth if auth is None else auth,
            ray=saved.ray if ray is None else ray,
            ui=saved.ui if ui is None else ui,
            ports=ports or saved.ports,
            artifacts_destination=(
                saved.artifacts_destination
                if artifacts_destination is None
                else artifacts_destination or None  # "": the default folder
            ),
        )
        self._saved = saved if (self.state / "services.json").is_file() else None
        self.bin = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.echo = echo or (lambda line: print(line, flush=True))
        self.secrets = Secrets(self.state / "secrets")

    # -- paths and addresses --

    def log_path(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def _pid_path(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.json"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.config.ports.mlflow}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.config.ports.prefect}/api"

    @property
    def ray_url(self) -> str:
        """The dashboard and Jobs API."""
        return f"http://{HOST}:{self.config.ports.ray_dashboard}"

    @property
    def ray_address(self) -> str:
        """The head's GCS: what ``ray.init`` (ingest, sampling, training) connects to here."""
        return f"{HOST}:{self.config.ports.ray}"

    @property
    def ray_token_path(self) -> Path:
        return self.secrets.path("ray_auth_token")

    def names(self) -> list[str]:
        return [n for n in ORDER if n != "ray" or self.config.ray]

    # -- credentials --

    def mlflow_password(self) -> str:
        return self.secrets.get("mlflow_admin_password", _token)

    def prefect_auth_string(self) -> str:
        return self.secrets.get("prefect_auth_string", lambda: f"{PREFECT_USER}:{_token()}")

    def ray_token(self) -> str:
        return self.secrets.get("ray_auth_token", lambda: secrets.token_hex(32))

    # -- environments --

    # Credentials of the client settings, and the file each is read from.
    _SECRET_KEYS = {
        "MLFLOW_TRACKING_PASSWORD": "mlflow_admin_password",
        "PREFECT_API_AUTH_STRING": "prefect_auth_string",
    }

    def client_env(self, *, credentials: bool = True) -> dict[str, str]:
        """The variables a client exports to use these services (with ``credentials=False``,
        without the password and the auth string)."""
        env = {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api_url}
        if self.config.auth:
            env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
            if credentials:
                env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_password()
                env["PREFECT_API_AUTH_STRING"] = self.prefect_auth_string()
        if self.config.ray:
            # RAY_ADDRESS is the GCS, not the Jobs API: `cascade ingest|train|sample` then run
            # their driver on this machine, connected to the head. The Jobs API is
            # RAY_API_SERVER_ADDRESS (`ray job submit`, JobSubmissionClient);
            # `RAY_ADDRESS=$RAY_API_SERVER_ADDRESS cascade train|ingest|sample ...` submits the
            # command as a Ray job instead (diffusion_core/ray_jobs.py).
            env.update(
                RAY_ADDRESS=self.ray_address,
                RAY_API_SERVER_ADDRESS=self.ray_url,
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN_PATH=str(self.ray_token_path),
            )
        return env

    def env_script(self) -> str:
        """``export`` lines for a shell. Credentials are read from their files when the lines
        are evaluated, so the output itself holds none."""
        plain = self.client_env(credentials=False)
        lines = [f'# cascade-diffusion local services ({self.state}); use: eval "$(... env)"']
        for key in _client_keys(self.config):
            if key in self._SECRET_KEYS:
                path = shlex.quote(str(self.secrets.path(self._SECRET_KEYS[key])))
                lines.append(f'export {key}="$(cat {path})"')
            else:
                lines.append(f"export {key}={shlex.quote(plain[key])}")
        if not self.config.ray:
            lines.append(
                "# no Ray head (up --ray starts one): without RAY_ADDRESS, jobs start a local Ray"
            )
        return "\n".join(lines) + "\n"

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PREFECT_HOME"] = str(self.state / "prefect")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        return env

    # -- what each service is --

    def _tool(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise ServiceError(
                f"no {name} in {self.bin}: run this with the project's virtualenv "
                f"(.venv/bin/python infra/local/services.py ...) or pass --bin DIR"
            )
        return str(path)

    def specs(self) -> dict[str, Spec]:
        cfg, p = self.config, self.config.ports
        base = self._base_env()
        mlflow_argv, mlflow_env = mlflow_server_command(
            self._tool("mlflow"), p.mlflow, self.state / "mlflow", base,
            artifacts_destination=cfg.artifacts_destination,
        )  # fmt: skip
        if cfg.auth:
            mlflow_argv += ["--app-name", "basic-auth"]
            mlflow_env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(self._auth_ini()),
                MLFLOW_AUTH_ADMIN_USERNAME=MLFLOW_ADMIN,
                MLFLOW_AUTH_ADMIN_PASSWORD=self.mlflow_password(),
                MLFLOW_FLASK_SERVER_SECRET_KEY=self.secrets.get("mlflow_flask_secret_key", _token),
            )
        server_env = dict(base)
        if cfg.auth:
            server_env["PREFECT_SERVER_API_AUTH_STRING"] = self.prefect_auth_string()
        worker_env = {**base, **self.client_env()}
        specs = {
            "mlflow": Spec(
                "mlflow", mlflow_argv, mlflow_env, self.mlflow_url,
                lambda rec: _request(self.mlflow_url + "/health")[0] == 200,
            ),
            "prefect-server": Spec(
                "prefect-server",
                [
                    self._tool("prefect"), "server", "start", "--host", HOST,
                    "--port", str(p.prefect), "--ui" if cfg.ui else "--no-ui",
                ],
                server_env, self.prefect_api_url,
                lambda rec: _request(self.prefect_api_url + "/health")[0] == 200,
            ),
            "prefect-worker": Spec(
                "prefect-worker",
                [
                    self._tool("prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                    "--name", WORKER_NAME, "--install-policy", "never",
                ],
                worker_env, self.prefect_api_url, self._worker_online,
            ),
        }  # fmt: skip
        if cfg.ray:
            ray_env = {
                **base,
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path),
            }
            self.ray_token()
            specs["ray"] = Spec(
                "ray",
                [
                    self._tool("ray"), "start", "--head", "--block",
                    "--node-ip-address", HOST, "--port", str(p.ray),
                    "--dashboard-host", HOST, "--dashboard-port", str(p.ray_dashboard),
                    "--ray-client-server-port", str(p.ray_client),
                    "--dashboard-agent-listen-port", str(p.ray_agent),
                    "--temp-dir", str(self._ray_temp_dir()), "--disable-usage-stats",
                ],
                ray_env, self.ray_url,
                lambda rec: _request(
                    self.ray_url + "/api/version",
                    headers={"Authorization": f"Bearer {self.ray_token()}"},
                )[0] == 200,
            )  # fmt: skip
        return specs

    def _auth_ini(self) -> Path:
        """MLflow's basic-auth config: the user store in the state folder, no password (that
        goes in MLFLOW_AUTH_ADMIN_PASSWORD)."""
        path = self.state / "mlflow" / "basic_auth.ini"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.state / 'mlflow' / 'basic_auth.db'}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        return path

    def _ray_temp_dir(self) -> Path:
        # Ray puts unix sockets under its temp dir; their paths must stay under 108 bytes.
        path = self.state / "ray"
        if len(str(path)) > 40:
            digest = hashlib.sha256(str(self.state).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"cascade-ray-{digest}"
        return path

    def _ensure_automations(self) -> None:
        """Create the automations of ``infra/prefect/automations.yaml`` that the Prefect server
        does not have yet (by name): a run whose worker died is marked Crashed."""
        import yaml
        from prefect.events.schemas.automations import AutomationCore

        headers = basic_auth(self.prefect_auth_string()) if self.config.auth else {}
        status, body = _request(f"{self.prefect_api_url}/automations/filter", headers=headers, body={})
        if status != 200:
            raise ServiceError(f"prefect: listing automations answered {status}: {body[:200]!r}")
        have = {a["name"] for a in json.loads(body)}
        spec = yaml.safe_load(AUTOMATIONS.read_text())
        for raw in spec["automations"]:
            if raw["name"] in have:
                continue
            automation = AutomationCore.model_validate(raw).model_dump(mode="json")
            status, body = _request(
                f"{self.prefect_api_url}/automations/", headers=headers, body=automation
            )
            if status not in (200, 201):
                raise ServiceError(f"prefect: creating {raw['name']} answered {status}: {body[:300]!r}")
            self.echo(f"{'automation':<15} {'created':<16} {raw['name']}")

    def _worker_online(self, rec: Record) -> bool:
        headers = basic_auth(self.prefect_auth_string()) if self.config.auth else {}
        status, body = _request(
            f"{self.prefect_api_url}/work_pools/{POOL}/workers/filter", headers=headers, body={}
        )
        if status != 200:
            return False
        for worker in json.loads(body):
            beat = worker.get("last_heartbeat_time")
            if worker.get("name") == WORKER_NAME and beat:
                when = datetime.fromisoformat(beat.replace("Z", "+00:00"))
                if when.timestamp() >= rec.started_at - 1.0:
                    return True
        return False

    # -- records --

    def record(self, name: str) -> Record | None:
        path = self._pid_path(name)
        if not path.is_file():
            return None
        return Record(**json.loads(path.read_text()))

    def running(self, name: str) -> Record | None:
        """The service's record if its process is alive (a stale pid file is removed)."""
        rec = self.record(name)
        if rec is None:
            return None
        if _pid_alive(rec.pid, rec.start_ticks):
            return rec
        self._pid_path(name).unlink(missing_ok=True)
        return None

    def _running_any(self) -> list[str]:
        return [n for n in ORDER if self.running(n) is not None]

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.state.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not Linux/macOS
            yield
            return
        with open(self.state / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- up --

    def up(self, timeout: float = 180.0) -> dict[str, str]:
        """Start what is not running, wait until every service is healthy; returns
        ``{name: "started" | "already running"}``. Idempotent."""
        with self._lock():
            running = self._running_any()
            if running and self._saved is not None and _differs(self._saved, self.config):
                raise ServiceError(
                    f"services in {self.state} are running with {_describe(self._saved)}; "
                    f"run `down` first to restart them with {_describe(self.config)}"
                )
            if self.config.auth and importlib.util.find_spec("flask_wtf") is None:
                raise ServiceError(
                    "--auth needs MLflow's auth extra (Flask-WTF): pip install 'mlflow[auth]'"
                )
            os.chmod(self.state, 0o700)  # logs and stores are the user's own
            for sub in ("logs", "pids", "mlflow/artifacts", "prefect"):
                (self.state / sub).mkdir(parents=True, exist_ok=True)
            self.config.save(self.state / "services.json")
            self._saved = self.config
            specs = self.specs()
            result: dict[str, str] = {}
            try:
                first = [n for n in self.names() if n != "prefect-worker"]
                self._start_all([specs[n] for n in first], result, timeout)
                self._start_all([specs["prefect-worker"]], result, timeout)
                self._ensure_automations()
            except BaseException:
                started = [n for n, what in result.items() if what == "started"]
                if started:
                    self.echo(f"stopping what this `up` started: {', '.join(started)}")
                    self._stop_all(started)
                raise
            return result

    def _start_all(self, specs: list[Spec], result: dict[str, str], timeout: float) -> None:
        pending: dict[str, tuple[Spec, Record]] = {}
        for spec in specs:
            rec = self.running(spec.name)
            if rec is not None:
                pending[spec.name] = (spec, rec)
                result[spec.name] = "already running"
                continue
            pending[spec.name] = (spec, self._launch(spec))
            result[spec.name] = "started"
        deadline = time.monotonic() + timeout
        while pending:
            for name, (spec, rec) in list(pending.items()):
                if not _pid_alive(rec.pid, rec.start_ticks):
                    self._pid_path(name).unlink(missing_ok=True)
                    raise ServiceError(
                        f"{name} exited while starting; last lines of {rec.log}:\n"
                        + self.tail(name)
                    )
                if spec.healthy(rec):
                    took = time.time() - rec.started_at
                    state = result[name]
                    extra = f" (healthy after {took:.1f} s)" if state == "started" else ""
                    self.echo(f"{name:<15} {state:<16} {spec.url}{extra}")
                    del pending[name]
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                raise ServiceError(
                    f"not healthy after {timeout:.0f} s: {names}; see the logs in "
                    f"{self.state / 'logs'}:\n" + "\n".join(self.tail(n) for n in pending)
                )
            time.sleep(0.25)

    def _launch(self, spec: Spec) -> Record:
        port = _spec_port(spec, self.config.ports)
        if port is not None and not _port_free(port):
            raise ServiceError(
                f"{spec.name}: port {port} on {HOST} is already in use by another process; "
                f"choose another one (services.py up --help lists the port options)"
            )
        for value in self.secrets.values():  # secrets go in the environment, never in argv
            if any(value in a for a in spec.argv):
                raise ServiceError(f"{spec.name}: a credential would appear on the command line")
        log_path = self.log_path(spec.name)
        with open(log_path, "ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"=== {stamp} {shlex.join(spec.argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        rec = Record(
            name=spec.name,
            pid=proc.pid,
            pgid=proc.pid,
            start_ticks=_start_ticks(proc.pid),
            started_at=time.time(),
            url=spec.url,
            log=str(log_path),
        )
        self._pid_path(spec.name).write_text(json.dumps(asdict(rec)) + "\n")
        return rec

    # -- down --

    def down(self) -> dict[str, str]:
        """Stop every service of this state folder; returns ``{name: "stopped" | "not running"}``.
        Raises if a process is still alive afterwards."""
        with self._lock():
            names = [n for n in reversed(ORDER) if self.record(n) is not None]
            result = {n: "not running" for n in ORDER if n in self.names() or n in names}
            live = [n for n in names if self.running(n) is not None]
            result.update(self._stop_all(live))
            for name in ORDER:
                if name in result:
                    self.echo(f"{name:<15} {result[name]}")
            return result

    def _stop_all(self, names: list[str]) -> dict[str, str]:
        result: dict[str, str] = {}
        worker_first = [n for n in names if n == "prefect-worker"]
        rest = [n for n in names if n != "prefect-worker"]
        for batch in (worker_first, rest):
            if not batch:
                continue
            with ThreadPoolExecutor(len(batch)) as pool:
                for name, leftovers in zip(
                    batch, pool.map(lambda n: self._stop(n, STOPS[n]), batch), strict=True
                ):
                    if leftovers:
                        raise ServiceError(f"{name}: processes {leftovers} survived SIGKILL")
                    result[name] = "stopped"
        return result

    def _stop(self, name: str, how: Stop) -> list[int]:
        rec = self.record(name)
        if rec is None:
            return []
        family = _family(rec)

        def send(sig: int) -> None:
            if how.leader_only:
                if _pid_alive(rec.pid, rec.start_ticks):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rec.pid, sig)
            else:
                _signal_group(rec.pgid, sig)

        def left() -> list[int]:
            still = [p for p, t in family.items() if _pid_alive(p, t)]
            if _pid_alive(rec.pid, rec.start_ticks) and rec.pid not in still:
                still.append(rec.pid)
            return still

        send(how.sig)
        t0 = time.monotonic()
        repeated = how.repeat_after is None
        while left() and time.monotonic() - t0 < how.grace:
            if not repeated and time.monotonic() - t0 >= how.repeat_after:
                send(how.sig)
                repeated = True
            time.sleep(0.2)
        if left():
            _signal_group(rec.pgid, signal.SIGKILL)
            for pid in left():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while left() and time.monotonic() < deadline:
                time.sleep(0.1)
        survivors = left()
        if not survivors:
            self._pid_path(name).unlink(missing_ok=True)
        return survivors

    # -- status --

    def status(self) -> dict[str, dict[str, object]]:
        """Per service: ``running`` (process alive), ``healthy``, ``pid``, ``url``, ``log``."""
        specs = self.specs() if self._running_any() else {}
        out: dict[str, dict[str, object]] = {}
        for name in self.names():
            rec = self.running(name)
            spec = specs.get(name)
            out[name] = {
                "running": rec is not None,
                "healthy": bool(rec is not None and spec is not None and spec.healthy(rec)),
                "pid": rec.pid if rec else None,
                "url": rec.url if rec else None,
                "log": str(self.log_path(name)),
            }
        return out

    def tail(self, name: str, n: int = 30) -> str:
        """The last lines of a service's log."""
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {name}| {line}" for line in lines[-n:])


def mlflow_server_command(
    mlflow: str,
    port: int,
    store: Path,
    env: dict[str, str],
    *,
    artifacts_destination: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The one ``mlflow server`` command of the project: loopback, one worker, job execution
    off, a sqlite store in ``store``, proxied artifacts (``store/artifacts``, or
    ``artifacts_destination``, e.g. ``s3://bucket/mlflow``: clients upload through the server,
    which alone holds the object store's keys). Returns ``(argv, env)``; ``env`` is ``env`` plus
    what the server needs: for an ``s3://`` destination, ``MLFLOW_S3_ENDPOINT_URL`` from the
    object-store settings (``diffusion_core.storage``) — the AWS keys must already be in ``env``.
    """
    destination = artifacts_destination or str(store / "artifacts")
    argv = [
        mlflow, "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", destination,
    ]  # fmt: skip
    out = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if destination.startswith("s3://"):
        from diffusion_core.storage import s3_endpoint

        if endpoint := s3_endpoint():
            out["MLFLOW_S3_ENDPOINT_URL"] = endpoint
        if not (out.get("AWS_ACCESS_KEY_ID") and out.get("AWS_SECRET_ACCESS_KEY")):
            raise ServiceError(
                f"--artifacts-destination {destination}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 for a non-AWS store) for the "
                "MLflow server"
            )
    return argv, out


class Server:
    """A command in its own process group, healthy when ``url + health_path`` answers 200
    (see the module docstring). Subclasses give :meth:`command` and :meth:`env`."""

    health_path = "/health"

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
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The caller's environment without MLflow client settings, the venv's tools first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, timeout: float = 120.0) -> Server:
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if _request(self.url + self.health_path)[0] == 200:
                self.started_in = time.perf_counter() - t0
                return self
            time.sleep(0.25)
        self.stop()
        raise ServiceError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, sig)

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
        _signal_group(self.proc.pid, signal.SIGKILL)  # children that outlived the leader

    def kill(self) -> None:
        """SIGKILL the whole group at once: the service is gone, mid-request or not."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(10)
        _signal_group(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MlflowServer(Server):
    """``mlflow server`` (:func:`mlflow_server_command`) over ``root/mlflow.db``, artifacts in
    ``root/artifacts`` or ``artifacts_destination``; ``extra_env`` goes to the server only
    (e.g. the object store's keys)."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        artifacts_destination: str | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        super().__init__("mlflow-server", root, port)
        self.artifacts_destination = artifacts_destination
        self.extra_env = dict(extra_env or {})

    def _command(self) -> tuple[list[str], dict[str, str]]:
        return mlflow_server_command(
            str(Path(sys.executable).parent / "mlflow"),
            self.port,
            self.root,
            {**super().env(), **self.extra_env},
            artifacts_destination=self.artifacts_destination,
        )

    def command(self) -> list[str]:
        return self._command()[0]

    def env(self) -> dict[str, str]:
        return self._command()[1]

    def restart(self, timeout: float = 120.0) -> MlflowServer:
        self.stop()
        self.start(timeout)
        return self


def _client_keys(cfg: Config) -> list[str]:
    keys = ["MLFLOW_TRACKING_URI", "PREFECT_API_URL"]
    if cfg.auth:
        keys += ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"]
    if cfg.ray:
        keys += ["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"]
    return keys


def _spec_port(spec: Spec, ports: Ports) -> int | None:
    return {"mlflow": ports.mlflow, "prefect-server": ports.prefect, "ray": ports.ray}.get(
        spec.name
    )


def _differs(a: Config, b: Config) -> bool:
    def key(c: Config) -> tuple:
        return (c.auth, c.ray, c.ui, c.ports, c.artifacts_destination)

    return key(a) != key(b)


def _describe(cfg: Config) -> str:
    ports = ", ".join(f"{f.name}={getattr(cfg.ports, f.name)}" for f in fields(cfg.ports))
    return f"auth={'on' if cfg.auth else 'off'}, ray={'on' if cfg.ray else 'off'} ({ports})"


# -- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="services.py",
        description="MLflow, Prefect (server + a process worker) and optionally a Ray head on "
        "127.0.0.1, with their state in one folder.",
    )
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--state", default=str(DEFAULT_STATE), help="State folder (default: .services).")
    p.add_argument(
        "--auth",
        action="store_true",
        default=None,
        help="up: basic auth on MLflow, an auth string on Prefect (credentials generated "
        "into STATE/secrets).",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="up: also start a Ray head (always with token authentication).",
    )
    p.add_argument("--ui", action="store_true", default=None, help="up: serve Prefect's UI.")
    defaults = Ports()
    for f in fields(Ports):
        p.add_argument(
            f"--{f.name.replace('_', '-')}-port",
            dest=f"port_{f.name}",
            metavar="N",
            type=int,
            default=None,
            help=f"up: {f.name.replace('_', ' ')} port (default {getattr(defaults, f.name)}).",
        )
    p.add_argument(
        "--artifacts-destination",
        metavar="URI",
        default=None,
        help="up: where MLflow stores artifacts (proxied), e.g. s3://bucket/mlflow; the server "
        "reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 from this shell "
        "(default: STATE/mlflow/artifacts).",
    )
    p.add_argument("--timeout", type=float, default=180.0, help="up: seconds to wait for health.")
    p.add_argument("--bin", default=None, help="Folder holding mlflow, prefect and ray.")
    p.add_argument("--json", action="store_true", help="status: print JSON.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    given = {f.name: getattr(args, f"port_{f.name}") for f in fields(Ports)}
    if args.command == "up":  # exactly what the flags say; status/env/down read services.json
        ports = Ports(**{k: v for k, v in given.items() if v is not None})
        services = Services(
            args.state,
            auth=bool(args.auth),
            ray=bool(args.ray),
            ui=bool(args.ui),
            ports=ports,
            artifacts_destination=args.artifacts_destination or "",
            bin_dir=args.bin,
        )
    elif (
        args.auth
        or args.ray
        or args.ui
        or args.artifacts_destination
        or any(v is not None for v in given.values())
    ):
        print(
            "--auth, --ray, --ui, --artifacts-destination and the ports are options of `up`",
            file=sys.stderr,
        )
        return 2
    else:
        services = Services(args.state, bin_dir=args.bin)
    try:
        if args.command == "up":
            services.up(timeout=args.timeout)
            print(
                f'\nclient settings: eval "$({_rel(Path(sys.executable))} '
                f'{_rel(Path(__file__))} env --state {shlex.quote(args.state)})"'
            )
        elif args.command == "down":
            services.down()
        elif args.command == "env":
            sys.stdout.write(services.env_script())
        else:
            st = services.status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                for name, s in st.items():
                    state = "healthy" if s["healthy"] else "running" if s["running"] else "stopped"
                    print(f"{name:<15} {state:<9} {s['url'] or '-':<24} pid {s['pid'] or '-'}")
            return 0 if all(s["healthy"] for s in st.values()) else 3
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
