"""Registration against the embedded store (sqlite, no server): `cascade register` and
`cascade promote` end to end, the gate, idempotency, interrupted registrations, the flow."""

from __future__ import annotations

import io
import json
import math

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from diffusion_core.evaluation.report import EvalReport
from diffusion_core.registry import content_hash, promote, register
from diffusion_core.registry import registration as reg
from tests.integration.registry.conftest import SETTINGS, last_json

pytestmark = pytest.mark.integration

NAME = "cascade-diffusion"


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


@pytest.fixture
def no_evaluation(monkeypatch):
    """As if diffusion_core.evaluation could not evaluate here."""
    monkeypatch.setattr(reg, "_default_evaluator", lambda: None)


def _register(cli, store, cascade, data, *extra: str) -> dict:
    args = ["register", "--cascade", str(cascade), "--data", str(data), "--tracking-uri", store]
    r = CliRunner().invoke(cli, [*args, *extra])
    assert r.exit_code == 0, r.output
    return last_json(r.stdout)


def _versions(store: str, name: str = NAME) -> list[str]:
    found = MlflowClient(store).search_model_versions(f"name = '{name}'")
    return sorted(str(mv.version) for mv in found)


def _aliases(store: str, name: str = NAME) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient(store).get_registered_model(name).aliases.items()}


def test_register_then_the_champion_loads_without_pickle_and_samples(
    cli, store, make_cascade, data_dir, dataset_version, metrics_file, monkeypatch
):
    cascade = make_cascade(0)
    out = _register(cli, store, cascade, data_dir, "--metrics", str(metrics_file(0.3)))
    assert list(out)[:5] == ["name", "version", "aliases", "promoted", "reason"]
    assert out["name"] == NAME and out["version"] == "1" and out["promoted"] is True
    assert out["aliases"] == ["challenger", "champion"] and out["status"] == "registered"
    assert out["content_hash"] == content_hash(cascade)

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    df = pd.DataFrame({"prompt": ["a red circle", "two green squares"], "seed": [1, 2]})
    images = model.predict(df, params={"num_inference_steps": 5})
    assert [Image.open(io.BytesIO(b)).size for b in images["image"]] == [(16, 16)] * 2
    again = model.predict(df.iloc[[1]], params={"num_inference_steps": 5})
    assert again["image"].iloc[0] == images["image"].iloc[1]

    # lineage on the version, metrics on the LoggedModel, the dataset as the run's input
    client = MlflowClient(store)
    mv = client.get_model_version(NAME, "1")
    tags = mv.tags
    assert tags["dataset_version"] == dataset_version
    assert tags["training.base.run_name"] == "base-run-0"
    assert tags["training.sr1.mlflow_run_id"] == "00000000sr1"
    assert tags["metric.kid"] == "0.3" and tags["gate.decision"] == "first"
    assert tags["registration"] == "complete" and tags["champion.by"] == "gate"
    assert len(tags.get("git_commit", "")) == 40
    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    metrics = {m.key: m for m in logged.metrics}
    assert metrics["kid"].value == 0.3 and metrics["kid"].dataset_digest == dataset_version[:36]
    run = client.get_run(mv.run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == dataset_version[:36]
    assert json.loads(inp.dataset.source)["uri"] == str(data_dir.resolve())
    assert "***" not in json.dumps(tags)  # training.json's redacted URI is not copied into tags


def test_registering_the_same_content_again_returns_the_existing_version(
    cli, store, make_cascade, data_dir, metrics_file, tmp_path
):
    import shutil

    first = _register(cli, store, make_cascade(0), data_dir, "--metrics", str(metrics_file(0.3)))
    # the same weights elsewhere, with another report: still the same model
    copy = shutil.copytree(make_cascade(0), tmp_path / "copy")
    again = _register(cli, store, copy, data_dir, "--metrics", str(metrics_file(0.1)))
    assert again["version"] == first["version"] == "1"
    assert again["status"] == "existing" and again["promoted"] is False
    assert "already registered" in again["reason"]
    assert again["aliases"] == ["challenger", "champion"]
    assert _versions(store) == ["1"]
    mlflow.set_tracking_uri(store)
    exp = MlflowClient(store).get_experiment_by_name("cascade-registry").experiment_id
    models = mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
    assert [m.tags.get("content_hash") for m in models] == [first["content_hash"]]


def test_the_gate_promotes_a_better_model_and_refuses_a_worse_one(
    cli, store, make_cascade, data_dir, metrics_file
):
    _register(cli, store, make_cascade(0), data_dir, "--metrics", str(metrics_file(0.30)))
    worse = _register(cli, store, make_cascade(1), data_dir, "--metrics", str(metrics_file(0.50)))
    assert worse["version"] == "2" and worse["promoted"] is False
    assert worse["aliases"] == ["challenger"]
    assert worse["decision"]["decision"] == "worse"
    assert "0.5 does not beat 0.3 of champion v1" in worse["reason"]
    assert _aliases(store) == {"champion": "1", "challenger": "2"}
    better = _register(cli, store, make_cascade(2), data_dir, "--metrics", str(metrics_file(0.2)))
    assert better["version"] == "3" and better["promoted"] is True
    assert better["aliases"] == ["challenger", "champion"]
    assert (better["decision"]["candidate"], better["decision"]["baseline"]) == (0.2, 0.3)
    tags = MlflowClient(store).get_model_version(NAME, "3").tags
    assert tags["gate.decision"] == "better" and tags["gate.baseline_version"] == "1"
    assert tags["champion.previous"] == "1"
    assert MlflowClient(store).get_model_version(NAME, "1").tags["champion.replaced_by"] == "3"
    # --no-promote records what the gate said and leaves champion where it is
    held = _register(
        cli, store, make_cascade(3), data_dir, "--metrics", str(metrics_file(0.1)), "--no-promote"
    )
    assert held["promoted"] is False and held["decision"]["decision"] == "held"
    assert _aliases(store) == {"champion": "3", "challenger": "4"}


def test_reports_of_another_identity_are_not_compared_unless_the_champion_is_re_evaluated(
    store, make_cascade, make_report, data_dir, no_evaluation
):
    register(make_cascade(0), data_dir, report=make_report(0.3), tracking_uri=store)
    other = make_report(0.01, num_samples=16)  # more samples: a different measurement
    r = register(make_cascade(1), data_dir, report=other, tracking_uri=store)
    assert not r.promoted and r.decision.decision == "not_comparable"
    assert r.decision.identity_diff == {"num_samples": [16, 8]}
    assert "not re-evaluating the champion" in r.reason
    assert _aliases(store)["champion"] == "1"

    # with an evaluator, the champion is evaluated on the candidate's settings, then compared
    calls = []
    kid_of = {content_hash(make_cascade(0)): 0.05, content_hash(make_cascade(2)): 0.02}

    def evaluator(cascade_dir, data, settings):
        calls.append(settings)
        return make_report(kid_of[content_hash(cascade_dir)], **settings.model_dump())

    r = register(
        make_cascade(2), data_dir, report=other.model_copy(update={"metrics": {"kid": 0.02}}),
        tracking_uri=store, evaluator=evaluator,
    )  # fmt: skip
    assert calls == [other.settings]
    assert r.promoted and r.decision.decision == "better" and r.decision.baseline == 0.05
    assert "re-evaluated" in r.reason
    client = MlflowClient(store)
    champ = client.get_model_version(NAME, "1")
    assert any(k.startswith("eval.report.") for k in champ.tags)  # the new measurement, kept
    logged = client.get_logged_model(champ.source.removeprefix("models:/"))
    assert 0.05 in [m.value for m in logged.metrics if m.key == "kid"]

    # that measurement is kept: a later candidate measured the same way is compared with it
    promote(NAME, "1", "back to v1 for the test", tracking_uri=store)

    def must_not_run(*args):
        raise AssertionError("the champion was evaluated again")

    candidate = other.model_copy(update={"metrics": {"kid": 0.04}})
    r = register(
        make_cascade(3), data_dir, report=candidate, tracking_uri=store, evaluator=must_not_run
    )
    assert r.promoted and (r.decision.baseline, r.decision.baseline_version) == (0.05, "1")


def test_register_evaluates_when_no_report_is_given(store, make_cascade, make_report, data_dir):
    seen = []

    def evaluator(cascade_dir, data, settings):
        seen.append((cascade_dir, data, settings))
        return make_report(0.4)

    r = register(make_cascade(0), data_dir, tracking_uri=store, evaluator=evaluator)
    assert r.promoted and r.metrics["kid"] == 0.4
    assert seen and seen[0][1] == str(data_dir)


def test_bad_inputs_exit_2_with_a_reason(
    cli, store, make_cascade, data_dir, metrics_file, tmp_path, no_evaluation
):
    runner = CliRunner()
    base = ["register", "--data", str(data_dir), "--tracking-uri", store]
    r = runner.invoke(cli, [*base, "--cascade", str(tmp_path)])
    assert r.exit_code == 2 and "no cascade.json" in r.output
    r = runner.invoke(cli, [*base, "--cascade", str(make_cascade(0))])
    assert r.exit_code == 2 and "--metrics" in r.output
    wrong = tmp_path / "wrong.json"
    report = json.loads(metrics_file(0.1).read_text())
    wrong.write_text(json.dumps({**report, "dataset_version": "f" * 64}))
    r = runner.invoke(cli, [*base, "--cascade", str(make_cascade(0)), "--metrics", str(wrong)])
    assert r.exit_code == 2 and "pass the data it was evaluated on" in r.output
    assert not MlflowClient(store).search_registered_models()


def test_manual_promote_and_rollback_are_recorded(cli, store, make_cascade, data_dir, metrics_file):
    _register(cli, store, make_cascade(0), data_dir, "--metrics", str(metrics_file(0.3)))
    _register(cli, store, make_cascade(1), data_dir, "--metrics", str(metrics_file(0.2)))
    assert _aliases(store)["champion"] == "2"
    runner = CliRunner()
    base = ["promote", "--name", NAME, "--tracking-uri", store]
    r = runner.invoke(cli, [*base, "--version", "1", "--reason", "v2 draws noise in prod"])
    assert r.exit_code == 0, r.output
    out = last_json(r.stdout)
    assert out["version"] == "1" and out["promoted"] is True and "champion" in out["aliases"]
    assert "v2 draws noise in prod" in out["reason"] and "champion was v2" in out["reason"]
    assert _aliases(store) == {"champion": "1", "challenger": "2"}
    client = MlflowClient(store)
    tags = client.get_model_version(NAME, "1").tags
    assert tags["champion.by"].startswith("manual:")
    assert tags["champion.reason"] == "v2 draws noise in prod" and tags["champion.previous"] == "2"
    assert client.get_model_version(NAME, "2").tags["champion.replaced_by"] == "1"
    history = json.loads(client.get_registered_model(NAME).tags["champion.history"])
    assert [(h["version"], h["previous"], h["by"].split(":")[0]) for h in history] == [
        ("1", None, "gate"),
        ("2", "1", "gate"),
        ("1", "2", "manual"),
    ]
    again = last_json(runner.invoke(cli, [*base, "--version", "1", "--reason", "x"]).stdout)
    assert again["promoted"] is False and "already the champion" in again["reason"]
    r = runner.invoke(cli, [*base, "--version", "9", "--reason", "x"])
    assert r.exit_code == 2 and "no version 9" in r.output
    r = runner.invoke(cli, [*base, "--version", "2", "--reason", "  "])
    assert r.exit_code == 2 and "--reason" in r.output


class _Interrupt(Exception):
    """Raised from the progress callback: the process dies at that point of a registration."""


@pytest.mark.parametrize("phase", ["log", "logged", "registered"])
def test_an_interrupted_registration_is_completed_by_a_rerun(
    store, make_cascade, make_report, data_dir, phase
):
    def die_at(p, message):
        if p == phase:
            raise _Interrupt(p)

    register(make_cascade(0), data_dir, report=make_report(0.3), tracking_uri=store)
    with pytest.raises(_Interrupt):
        register(
            make_cascade(1), data_dir, report=make_report(0.2), tracking_uri=store, progress=die_at
        )
    client = MlflowClient(store)
    partial = _versions(store)
    # a version exists only once its files are uploaded, with its lineage, but not gated yet
    for v in partial:
        mv = client.get_model_version(NAME, v)
        assert mv.tags["content_hash"] and mv.tags["eval.report"]
        mlflow.set_tracking_uri(store)
        assert mlflow.pyfunc.load_model(f"models:/{NAME}/{v}") is not None
    assert partial == (["1", "2"] if phase == "registered" else ["1"])
    if phase == "registered":
        assert "registration" not in client.get_model_version(NAME, "2").tags
        assert _aliases(store) == {"champion": "1", "challenger": "1"}
    r = register(make_cascade(1), data_dir, report=make_report(0.2), tracking_uri=store)
    assert r.version == "2" and r.promoted
    assert r.status == ("completed" if phase == "registered" else "registered")
    assert _versions(store) == ["1", "2"]
    assert _aliases(store) == {"champion": "2", "challenger": "2"}
    exp = client.get_experiment_by_name("cascade-registry").experiment_id
    digest = content_hash(make_cascade(1))
    mlflow.set_tracking_uri(store)
    models = mlflow.search_logged_models(
        experiment_ids=[exp], filter_string=f"tags.content_hash = '{digest}'", output_format="list"
    )
    assert len([m for m in models if str(m.status).endswith("READY")]) == 1  # uploaded once
    runs = client.search_runs([exp], f"tags.content_hash = '{digest}'")
    assert "RUNNING" not in {run.info.status for run in runs}


@pytest.mark.slow
def test_the_register_flow_registers_and_publishes_the_decision(
    store, make_cascade, data_dir, metrics_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.register import RegisterParams, register_flow

    params = RegisterParams(
        cascade=str(make_cascade(0)),
        data=str(data_dir),
        metrics=str(metrics_file(0.3)),
        settings=SETTINGS,
        tracking_uri=store,
    )
    with prefect_test_harness():
        result = register_flow(params)
        assert result["version"] == "1" and result["promoted"] is True
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts()
        (art,) = [a for a in arts if a.key == "register-cascade-diffusion"]
        assert "Promoted to champion" in art.data and "| kid | 0.3 |" in art.data
        flow_run_id = MlflowClient(store).get_model_version(NAME, "1").tags["prefect.flow_run_id"]
        assert flow_run_id == str(art.flow_run_id)


@pytest.mark.slow
def test_register_evaluates_with_diffusion_core_evaluation_and_re_evaluates_the_champion(
    store, make_cascade, tmp_path
):
    """The real evaluation (held-out split, offline Inception KID/FID) behind `register`."""
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes
    from diffusion_core.evaluation.report import EvalSettings

    write_shapes(tmp_path / "raw", 48, seed=3, size=16, shard_size=48)
    cfg = IngestConfig(
        sources=[str(tmp_path / "raw")],
        out=str(tmp_path / "data"),
        resolution=16,
        min_size=16,
        shard_size=48,
        text_encoder="hash-test",
        max_tokens=8,
        eval_fraction=0.3,
    )
    ingest(cfg, engine="local")
    settings = EvalSettings(num_samples=4, steps=4, metrics=("kid", "fid"))
    first = register(make_cascade(0), tmp_path / "data", settings=settings, tracking_uri=store)
    assert first.promoted and set(first.metrics) >= {"kid", "fid"}
    assert all(map(math.isfinite, first.metrics.values()))
    more = settings.model_copy(update={"num_samples": 5})
    second = register(make_cascade(1), tmp_path / "data", settings=more, tracking_uri=store)
    assert "champion re-evaluated" in second.reason
    assert second.decision.decision in ("better", "worse")
    tags = MlflowClient(store).get_model_version(NAME, "1").tags
    reports = [k for k in tags if k.startswith("eval.report.")]
    assert len(reports) == 1
    assert EvalReport.model_validate_json(tags[reports[0]]).settings.num_samples == 5
