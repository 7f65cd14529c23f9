"""Registry fixtures: a tiny dataset, tiny cascades (distinct weights), evaluation reports, the
`cascade register` / `cascade promote` commands, and one real `mlflow server` per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer

from diffusion_core.cascade import Cascade
from diffusion_core.evaluation.report import EvalReport, EvalSettings
from diffusion_core.registry.cli import promote_command, register_command
from diffusion_core.training import load_preset
from diffusion_core.training.export import TRAINING_JSON
from infra.local.services import MlflowServer

SETTINGS = EvalSettings(num_samples=8, steps=6)


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """16 shapes at 16px (the tiny cascade's top resolution), hash text encoder."""
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("registry-data")
    write_shapes(root / "raw", 16, seed=1, size=16, shard_size=16)
    cfg = IngestConfig(
        sources=[str(root / "raw")],
        out=str(root / "data"),
        resolution=16,
        min_size=16,
        shard_size=16,
        text_encoder="hash-test",
        max_tokens=8,
    )
    ingest(cfg, engine="local")
    return root / "data"


@pytest.fixture(scope="session")
def dataset_version(data_dir) -> str:
    from diffusion_core.data.format import read_manifest

    return read_manifest(str(data_dir)).version


@pytest.fixture(scope="session")
def make_cascade(tmp_path_factory, dataset_version) -> Callable[[int], Path]:
    """``make_cascade(seed)``: a tiny cascade folder with weights drawn from ``seed`` (perturbed
    so that samples depend on them) and a training.json like the export writes."""
    root = tmp_path_factory.mktemp("cascades")

    def make(seed: int) -> Path:
        out = root / f"cascade-{seed}"
        if out.exists():
            return out
        torch.manual_seed(seed)
        cascade = Cascade.from_config(load_preset("tiny").cascade)
        with torch.no_grad():
            for stage in cascade:
                for p in stage.network.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        cascade.save(out)
        stages = {
            s.name: {
                "run_name": f"{s.name}-run-{seed}",
                "step": 8,
                "dataset_version": dataset_version,
                "mlflow_run_id": f"{seed:08d}{s.name}",
                "tracking_uri": "http://alice:***@mlflow.internal:5000",
            }
            for s in cascade
        }
        (out / TRAINING_JSON).write_text(json.dumps({"stages": stages}))
        return out

    return make


@pytest.fixture(scope="session")
def make_report(dataset_version) -> Callable[..., EvalReport]:
    """``make_report(kid, **settings)``: an EvalReport of the test dataset."""

    def make(kid: float, *, fid: float = 80.0, **settings) -> EvalReport:
        s = SETTINGS.model_copy(update=settings)
        return EvalReport(
            dataset_version=dataset_version, settings=s, metrics={"kid": kid, "fid": fid}
        )

    return make


@pytest.fixture
def metrics_file(tmp_path, make_report) -> Callable[..., Path]:
    """``metrics_file(kid, **settings)``: a report written as `cascade evaluate --out` would."""
    counter = iter(range(10_000))

    def write(kid: float, **settings) -> Path:
        path = tmp_path / f"report-{next(counter)}.json"
        path.write_text(make_report(kid, **settings).model_dump_json(indent=2))
        return path

    return write


@pytest.fixture(scope="session")
def cli() -> typer.Typer:
    """The two commands as `cascade` registers them (diffusion_core/cli.py)."""
    app = typer.Typer()
    app.command("register")(register_command)
    app.command("promote")(promote_command)
    return app


def last_json(output: str) -> dict:
    """The last line of a command's stdout, parsed (the commands' contract)."""
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on loopback for the session (sqlite + proxied artifacts)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
