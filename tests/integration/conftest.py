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


# ============================================================================ a 2-node cluster
def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a second node (1 CPU each) started with `ray start` on 127.0.0.1, the head with
    the dashboard (Jobs API). Each `ray start --block` runs in its own process group, stopped by
    its id at the end. This process stays on the session's local Ray: runs on the cluster are
    made by subprocesses (the job entry point) or through the Jobs API, as a user's driver would.
    Module-scoped: each module using it starts one (test_training.py, test_ray_jobs.py)."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    ray_bin = str(Path(sys.executable).with_name("ray"))
    gcs, dash, agent1, agent2 = free_ports(4)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # Not under pytest's basetemp: another pytest session on this machine may prune that while
    # the cluster runs (it keeps the 3 newest), taking a job's working_dir with it; short too,
    # for Ray's socket paths.
    temp = Path(tempfile.mkdtemp(prefix="ray2n-", dir="/tmp"))
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head = [
        ray_bin, "start", "--head", f"--port={gcs}", f"--temp-dir={temp}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent1}", *common,
    ]  # fmt: skip
    worker = [
        ray_bin, "start", f"--address=127.0.0.1:{gcs}",
        f"--dashboard-agent-listen-port={agent2}", *common,
    ]  # fmt: skip
    count = (
        f"import ray; ray.init(address='127.0.0.1:{gcs}', log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 - closed below
    procs = []
    try:
        procs.append(
            subprocess.Popen(head, env=env, stdout=log, stderr=log, start_new_session=True)
        )
        time.sleep(3)
        procs.append(
            subprocess.Popen(worker, env=env, stdout=log, stderr=log, start_new_session=True)
        )
        deadline = time.monotonic() + 120
        while True:
            out = subprocess.run(
                [sys.executable, "-c", count], env=env, capture_output=True, text=True
            )
            if out.stdout.strip().endswith("2"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"2-node cluster did not start; see {temp / 'ray-start.log'}")
            time.sleep(2)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=8)  # a node drains up to 30 s on SIGTERM; nothing to drain here
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
