"""Connecting to Ray: one place for every job (ingest, training, sampling)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

_INIT_LOCK = threading.Lock()

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
        if os.environ.get("RAY_ADDRESS"):
            context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=to_driver)
        else:
            context = ray.init(
                num_cpus=len(os.sched_getaffinity(0)),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=to_driver,
            )
        if log_file:
            redirect_ray_logging(Path(log_file))  # Ray Data/Train may have added console handlers
            session = getattr(context, "address_info", {}).get("session_dir") or "?"
            dashboard = getattr(context, "dashboard_url", None)
            where = f"dashboard http://{dashboard}; " if dashboard else ""
            print(f"ray: {where}messages in {log_file}; session logs in {session}/logs", flush=True)


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
