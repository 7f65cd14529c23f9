"""``CASCADE_RAY_LOG``: Ray's driver-side messages go to the file, not to the console (the demo's
"Ray start-up noise out of the user's way"), and one line says where they went."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import ray.data
from diffusion_core.ray_env import ensure_ray
ensure_ray()
print("rows", ray.data.range(8).map_batches(lambda b: b).count())
"""


def test_ray_messages_go_to_the_log_file_and_not_to_the_console(tmp_path):
    log = tmp_path / "logs" / "ray.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CASCADE_RAY_LOG"] = str(log)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "rows 8" in done.stdout
    assert f"messages in {log}" in done.stdout  # the user is told where
    text = log.read_text()
    for line in ("Started a local Ray instance", "Starting execution of Dataset"):
        assert line in text, f"{line!r} not in the log file"
        assert line not in console, f"{line!r} still on the console"
