"""Connecting to Ray: one place for every job (ingest, training, sampling)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

_INIT_LOCK = threading.Lock()
_log = logging.getLogger(__name__)

#: A file for Ray's own driver-side messages (start-up, Ray Data's execution plans, Ray Train's
#: controller): set it and they stay out of the console. ``flows/retrain.py`` (so ``make demo``)
#: sets it to ``<workdir>/logs/ray.log``.
RAY_LOG_ENV = "CASCADE_RAY_LOG"


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS``, or start a local Ray (once per process, thread-safe).

    The local Ray gets the dashboard: Ray Train's placement-group cleaner asks the State API
    (served by the dashboard) whether the run's controller is gone, and without it never exits
    and logs a warning every few seconds. Worker logs stay in Ray's session folder
    (``CASCADE_RAY_LOGS=1`` streams them here too); worker errors come back in the exception.
    With ``CASCADE_RAY_LOG=FILE`` Ray's driver-side log lines go to FILE instead of stderr (one
    line on stdout says where, and where the session's logs are).
    """
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return
        log_file = os.environ.get(RAY_LOG_ENV) or None
        if log_file:
            redirect_ray_logging(Path(log_file))
        to_driver = os.environ.get("CASCADE_RAY_LOGS", "") not in ("", "0")
        address = os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            raise RuntimeError(
                f"RAY_ADDRESS={address} is a Jobs API (dashboard) address: ingest, training and "
                "sampling submit themselves there as Ray jobs; this code path needs a Ray to "
                "connect to (a GCS address host:port, 'auto', or no RAY_ADDRESS for a local Ray)"
            )
        if address:
            context = ray.init(address=address, log_to_driver=to_driver)
            if os.environ.get(_JOB_CONFIG_VAR):  # a job's driver: it has the cluster's env
                _set_inherited("job", _credentials(os.environ))
            else:
                _set_inherited("connected", None)
        else:
            snapshot = _credentials(os.environ)  # what the raylet, so every worker, inherits
            context = ray.init(
                num_cpus=len(os.sched_getaffinity(0)),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=to_driver,
            )
            _set_inherited("started", snapshot)
        if log_file:
            redirect_ray_logging(Path(log_file))  # Ray Data/Train may have added console handlers
            session = getattr(context, "address_info", {}).get("session_dir") or "?"
            dashboard = getattr(context, "dashboard_url", None)
            where = f"dashboard http://{dashboard}; " if dashboard else ""
            print(f"ray: {where}messages in {log_file}; session logs in {session}/logs", flush=True)


# ------------------------------------------------------------------ credentials for workers
#: Variables that hold a credential: never put into a runtime env when the workers have them.
CREDENTIAL_VARS = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    }
)
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PASSWD|API_KEY|ACCESS_KEY")
_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver

#: How this process is attached to Ray, set by :func:`ensure_ray` (see :func:`worker_env_vars`):
#: (``started`` | ``job`` | ``connected``, the credential variables the workers inherit or None
#: when unknown, the Ray job id of this driver, so a later ``ray.init`` elsewhere is noticed).
_ATTACHED: tuple[str, dict[str, str] | None, str] | None = None
_WARNED: set[str] = set()


def is_credential(name: str) -> bool:
    """Whether an environment variable holds a credential (a known name, or one that says so)."""
    return name in CREDENTIAL_VARS or bool(_SECRET_NAME.search(name.upper()))


def _credentials(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if is_credential(k)}


def _set_inherited(how: str, inherited: dict[str, str] | None) -> None:
    import ray

    global _ATTACHED
    _ATTACHED = (how, inherited, ray.get_runtime_context().get_job_id())


def attachment() -> tuple[str | None, dict[str, str] | None]:
    """How this process is attached to the Ray it uses now and the credential variables its
    workers inherit (None: unknown; also when Ray was started or connected by other code)."""
    import ray

    if _ATTACHED is None or not ray.is_initialized():
        return None, None
    how, inherited, job = _ATTACHED
    if ray.get_runtime_context().get_job_id() != job:
        return None, None
    return how, inherited


def worker_env_vars(candidates: Mapping[str, str]) -> dict[str, str]:
    """The part of ``candidates`` (the variables the tasks and actors of a job need) to put into
    their runtime env's ``env_vars``: every setting, but a credential only where the workers
    cannot already have it — the one decision for training, ingest and sampling. Call it once
    Ray is up (after :func:`ensure_ray`).

    Ray keeps runtime envs in its state (GCS; the State API and dashboard show them, Ray Train
    keeps its ``worker_runtime_env`` in its run state), so a credential there is visible to
    anyone who can read the dashboard. The workers inherit their raylet's environment:

    - ``started`` (:func:`ensure_ray` started the local Ray): the raylet got this process's
      environment as it was then (recorded at that moment), so a credential with the same value
      now is left out; one set or changed since is passed.
    - ``job`` (this process is a Ray job's driver: ``RAY_ADDRESS=http://...`` submitted it, or a
      KubeRay RayJob): the driver got the cluster's environment (the pods' Secrets) plus the
      job's runtime env, and so does every worker of the job (the nodes of one cluster are
      given the same credentials): the same rule, against this process's environment when it
      connected.
    - ``connected`` (a driver outside the cluster attached by ``host:port``), or a Ray that
      other code started: nothing is known of the workers' environment, so credentials are
      passed (a warning names them, once, for ``connected``).
    """
    how, inherited = attachment()
    chosen = choose_worker_env(candidates, inherited)
    new = sorted(k for k in chosen if is_credential(k) and k not in _WARNED)
    if how == "connected" and new:
        _WARNED.update(new)
        _log.warning(
            "passing %s to the Ray workers in their runtime env, which Ray keeps in its state: "
            "this driver is attached to a cluster from outside; give the cluster's nodes the "
            "credentials and submit through the Jobs API (RAY_ADDRESS=http://...) instead",
            ", ".join(new),
        )
    return chosen


def choose_worker_env(
    candidates: Mapping[str, str], inherited: Mapping[str, str] | None
) -> dict[str, str]:
    """:func:`worker_env_vars`' rule: every candidate but the credentials that ``inherited``
    (the workers' credential variables; None: unknown) has with the same value."""
    return {
        k: v
        for k, v in candidates.items()
        if inherited is None or not is_credential(k) or inherited.get(k) != v
    }


def redirect_ray_logging(path: Path) -> None:
    """Send the ``ray`` loggers' console output to ``path`` (appended); file handlers Ray keeps
    for itself (Ray Data's session log) stay as they are. Idempotent."""
    import ray  # noqa: F401  (configures the ``ray`` loggers)
    import ray.data  # noqa: F401  (configures ``ray.data``, which does not propagate)

    path.parent.mkdir(parents=True, exist_ok=True)
    target = str(path.resolve())
    for name in ("ray", *_own_loggers()):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if not any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            handler = logging.FileHandler(target, encoding="utf-8")
            handler.setLevel(logging.INFO)  # ray.data logs at DEBUG to its own session file
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


def _own_loggers() -> list[str]:
    """``ray.*`` loggers that print on their own (``propagate = False``)."""
    return [
        name
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("ray.") and isinstance(lg, logging.Logger) and not lg.propagate
    ]


def source_root() -> Path | None:
    """The source checkout this package runs from (it has a pyproject.toml), if any: shipped to
    Ray workers (``PYTHONPATH`` locally, ``working_dir`` for the Jobs API) so that they import
    this code even where it is not pip-installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None
