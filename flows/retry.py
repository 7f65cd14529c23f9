"""The one retry policy of every flow's tasks: retry what a retry can fix, nothing else.

An error is permanent when it says so (``transient = False``, as on a
:class:`~diffusion_core.errors.JobError` (ingest, batch) for a bad input and on
:class:`~diffusion_core.training.NonFiniteLossError`) or when it is a ``ValueError`` /
``TypeError`` (bad configs, bad data: ``ConfigError`` and ``DataError`` are ``ValueError``s).
Anything else (I/O, a lost Ray worker, a server that went away) is retried: every task of the
pipeline is idempotent, so a retry resumes or redoes the work cleanly.
"""

from __future__ import annotations

from typing import Any


def is_transient(error: BaseException) -> bool:
    """Whether a retry might succeed where ``error`` happened."""
    flag = getattr(error, "transient", None)
    if flag is not None:
        return bool(flag)
    return not isinstance(error, ValueError | TypeError)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: retry a failed task run only for transient errors."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - classified, not handled
        return is_transient(e)
    return False
