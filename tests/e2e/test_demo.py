"""The README's main command end to end, at the ``tiny`` preset: the figures, then the retrain
flow on the built-in shapes (Prefect's ephemeral API, local Ray, the sqlite MLflow store with
the registry): both stages trained, the cascade evaluated and registered as champion, the
held-out captions batch-sampled with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_runs_the_retrain_flow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("CASCADE_EVAL_CACHE", str(tmp_path / "eval-cache"))
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from diffusion_core.cascade import Cascade
    from diffusion_core.cli import app

    out = tmp_path / "out"
    with prefect_test_harness():
        res = CliRunner().invoke(
            app, ["demo", "--out", str(out), "--preset", "tiny", "--count", "80"]
        )
    assert res.exit_code == 0, res.output
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
    assert "champion" in res.output and Path(out / "raw").is_dir()
