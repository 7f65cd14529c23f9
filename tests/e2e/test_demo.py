"""The README's main command end to end, at the ``tiny`` preset: the figures, then the retrain
flow on the built-in shapes (Prefect's ephemeral API, local Ray, the sqlite MLflow store with
the registry): both stages trained, the cascade evaluated and registered as champion, the
held-out captions batch-sampled with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_runs_the_retrain_flow(tmp_path):
    """In a process of its own, as `make demo` runs it (Prefect's ephemeral API configures its
    logging for the process: under an in-process CLI runner it would keep the runner's closed
    stream for every later test)."""
    from mlflow.tracking import MlflowClient

    from diffusion_core.cascade import Cascade

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), CASCADE_EVAL_CACHE=str(tmp_path / "cache"))
    res = subprocess.run(
        [sys.executable, "-m", "diffusion_core.cli", "demo", "--out", str(out),
         "--preset", "tiny", "--count", "80"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(list((out / "figures").glob("*.png"))) >= 8
    (cascade_dir,) = (out / "cascades").iterdir()
    assert [s.name for s in Cascade.load(cascade_dir)] == ["base", "sr1"]
    client = MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    aliases = client.get_registered_model("cascade-diffusion").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "1"}
    runs = client.search_runs([client.get_experiment_by_name("cascade-train").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["base", "sr1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    samples = out / "samples" / "cascade-diffusion-v1"
    summary = json.loads((samples / "summary.json").read_text())
    assert summary["images"] >= 1 and (samples / "contact_sheet.png").is_file()
    report = next((out / "reports").glob("*.md")).read_text()
    assert "Version 1" in report and "kid" in report
    assert "champion" in res.stdout and Path(out / "raw").is_dir()
