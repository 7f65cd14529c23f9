"""Fault injection for tests of recovery: a real worker crash, exception or NaN at a chosen step.

``$CASCADE_TRAIN_FAULT = {"step": s, "rank": r, "kind": "exit"|"raise"|"nan", "marker": path,
"delay_s": d}`` (set by ``train(..., fault=...)`` in the workers' environment) breaks rank ``r``
at step ``s``: ``exit`` kills the worker process (after ``d`` seconds), ``raise`` raises, once
(the marker file records that it did); ``nan`` poisons that step's text embeddings every time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FAULT_ENV = "CASCADE_TRAIN_FAULT"


def maybe_inject_fault(step: int, rank: int) -> None:
    """Kill or break this worker if the fault spec says so (once)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault = json.loads(spec)
    if step != fault["step"] or rank != fault.get("rank", 0) or fault.get("kind") == "nan":
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(json.dumps({"step": step, "rank": rank, "pid": os.getpid()}))
    time.sleep(float(fault.get("delay_s", 0)))
    if fault.get("kind", "exit") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def nan_fault(step: int, rank: int) -> bool:
    """Whether this step's batch is to be poisoned with NaN on this rank."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    fault = json.loads(spec)
    return fault.get("kind") == "nan" and step == fault["step"] and rank == fault.get("rank", 0)
