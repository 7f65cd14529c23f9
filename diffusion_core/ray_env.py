"""Connecting to Ray: one place for every job (ingest, training, sampling)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_INIT_LOCK = threading.Lock()


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS``, or start a local Ray (once per process, thread-safe).

    The local Ray gets the dashboard: Ray Train's placement-group cleaner asks the State API
    (served by the dashboard) whether the run's controller is gone, and without it never exits
    and logs a warning every few seconds. Worker logs stay in Ray's session folder
    (``CASCADE_RAY_LOGS=1`` streams them here too); worker errors come back in the exception.
    """
    import ray

    with _INIT_LOCK:
        if ray.is_initialized():
            return
        to_driver = os.environ.get("CASCADE_RAY_LOGS", "") not in ("", "0")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=to_driver)
        else:
            ray.init(
                num_cpus=len(os.sched_getaffinity(0)),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=to_driver,
            )


def source_root() -> Path | None:
    """The source checkout this package runs from (it has a pyproject.toml), if any: shipped to
    Ray workers (``PYTHONPATH`` locally, ``working_dir`` for the Jobs API) so that they import
    this code even where it is not pip-installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None
