"""The error a job raises when a run cannot complete, and whether retrying could help.

``transient`` is what the flows' one retry policy reads (``flows/retry.py``): False for problems
a retry cannot fix (a bad source, model or output folder), True for a failure of the job itself
(I/O, a lost worker).
"""

from __future__ import annotations


class JobError(RuntimeError):
    """A job run that could not complete; the message says what was wrong and what to do."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
