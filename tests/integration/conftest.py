"""Integration fixtures: one real local Ray for the whole session."""

from __future__ import annotations

import os

import pytest

from tests.s3 import s3  # noqa: F401 - the session's S3 server, for any test


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs (or the cluster at ``RAY_ADDRESS``), shut down at the end."""
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
