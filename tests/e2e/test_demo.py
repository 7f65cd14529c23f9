"""The README's main command end to end, at the ``tiny`` preset: figures, built-in shapes, the
Ray Data ingest, both stages trained on local Ray, the sample grid and its shapes-checker report,
the runs in the local MLflow store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_runs_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from mlflow.tracking import MlflowClient

    from diffusion_core.cascade import Cascade
    from diffusion_core.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--preset", "tiny", "--count", "64"])
    assert res.exit_code == 0, res.output
    assert (out / "figures").is_dir() and (out / "data" / "manifest.json").is_file()
    assert [s.name for s in Cascade.load(out / "cascade")] == ["base", "sr1"]
    assert (out / "samples" / "grid.png").is_file()
    report = json.loads((out / "samples" / "report.json").read_text())
    assert len(report["samples"]) == 16 and 0.0 <= report["faithfulness"] <= 1.0
    assert set(report["stages"]) == {"base", "sr1"}
    client = MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cascade-train").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["base", "sr1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "held-out captions came out right" in res.output
