"""The registry's pure parts: the content hash, the gate, lineage tags, the result's JSON."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from diffusion_core.cascade import Cascade
from diffusion_core.data.format import DatasetInfo
from diffusion_core.evaluation.report import EvalReport, EvalSettings
from diffusion_core.registry import GateConfig, RegistryError, content_hash, decide
from diffusion_core.registry.registration import (
    RegistrationResult,
    _stored_decision,
    lineage_tags,
)
from diffusion_core.training import load_preset
from diffusion_core.training.export import TRAINING_JSON

VERSION = "ab" * 32


def _report(kid: float = 0.1, *, version: str = VERSION, **settings) -> EvalReport:
    return EvalReport(
        dataset_version=version,
        settings=EvalSettings(num_samples=8, **settings),
        metrics={"kid": kid, "fid": 50.0, "faithfulness": 0.5},
    )


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    torch.manual_seed(0)
    return Cascade.from_config(load_preset("tiny").cascade).save(tmp_path_factory.mktemp("c"))


# ------------------------------------------------------------------ content hash


def test_content_hash_names_the_weights_not_the_place_or_the_lineage(cascade_dir, tmp_path):
    copy = shutil.copytree(cascade_dir, tmp_path / "copy")
    assert content_hash(copy) == content_hash(cascade_dir)
    (copy / TRAINING_JSON).write_text(json.dumps({"stages": {"base": {"run_name": "r"}}}))
    (copy / ".export.lock").write_text("")
    assert content_hash(copy) == content_hash(cascade_dir)
    weights = copy / "stages" / "sr1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert content_hash(copy) != content_hash(cascade_dir)


def test_content_hash_refuses_what_is_not_a_cascade(cascade_dir, tmp_path):
    with pytest.raises(RegistryError, match="no cascade.json"):
        content_hash(tmp_path)
    broken = shutil.copytree(cascade_dir, tmp_path / "broken")
    shutil.rmtree(broken / "stages" / "sr1")
    with pytest.raises(RegistryError, match="stage 'sr1'"):
        content_hash(broken)


# ------------------------------------------------------------------ the gate


def test_first_version_becomes_champion_only_with_finite_metrics():
    d = decide(_report(0.2), None)
    assert d.promote and d.decision == "first" and d.candidate == 0.2
    nan = _report(0.2)
    nan.metrics["fid"] = math.nan
    d = decide(nan, None)
    assert not d.promote and d.decision == "not_finite" and "fid" in d.reason
    d = decide(_report(0.2), None, GateConfig(metric="nll_bpd"))
    assert not d.promote and "no 'nll_bpd'" in d.reason


def test_gate_promotes_a_better_candidate_and_refuses_a_worse_one_or_a_tie():
    champion = _report(0.10)
    better = decide(_report(0.05), champion, champion_version="3")
    assert better.promote and better.decision == "better"
    assert (better.candidate, better.baseline, better.baseline_version) == (0.05, 0.10, "3")
    assert "0.05 < 0.1 of champion v3" in better.reason
    worse = decide(_report(0.20), champion, champion_version="3")
    assert not worse.promote and worse.decision == "worse"
    assert "0.2 does not beat 0.1 of champion v3" in worse.reason and worse.validation
    tie = decide(_report(0.10), champion, champion_version="3")
    assert not tie.promote and tie.decision == "worse"


def test_gate_margins_thresholds_and_higher_is_better():
    champion = _report(0.10)
    gate = GateConfig(min_absolute_change=0.03)
    assert not decide(_report(0.08), champion, gate).promote
    assert decide(_report(0.06), champion, gate).promote
    rel = GateConfig(min_relative_change=0.5)
    assert not decide(_report(0.06), champion, rel).promote
    assert decide(_report(0.04), champion, rel).promote
    bound = GateConfig(threshold=0.05)
    assert not decide(_report(0.06), None, bound).promote  # a first version above the bound
    assert decide(_report(0.04), None, bound).promote
    faith = GateConfig(metric="faithfulness", greater_is_better=True)
    better = _report(0.5)
    better.metrics["faithfulness"] = 0.9
    assert decide(better, champion, faith).promote
    assert not decide(champion, better, faith).promote


@pytest.mark.parametrize(
    "change",
    [
        {"version": "cd" * 32},
        {"num_samples": 16},
        {"sampler": "dpmsolver++"},
        {"steps": 20},
        {"guidance_scale": 1.0},
        {"seed": 7},
    ],
)
def test_gate_refuses_to_compare_reports_of_another_identity(change):
    champion = _report(0.10)
    version = change.pop("version", VERSION)
    settings = {"num_samples": 8, **change}
    candidate = EvalReport(
        dataset_version=version,
        settings=EvalSettings(**settings),
        metrics={"kid": 0.01, "fid": 1.0},
    )
    d = decide(candidate, champion, champion_version="1")
    assert not d.promote and d.decision == "not_comparable"
    assert d.identity_diff and "evaluated differently" in d.reason
    # batch size and the list of metrics do not change what is measured
    same = EvalReport(
        dataset_version=VERSION,
        settings=EvalSettings(num_samples=8, batch_size=3, metrics=("kid",)),
        metrics={"kid": 0.01},
    )
    assert decide(same, champion).decision == "better"


def test_gate_decision_round_trips_through_the_version_tags():
    d = decide(_report(0.05), _report(0.1), champion_version="2")

    class Version:
        tags = d.tags()

    back = _stored_decision(Version())
    assert back is not None
    assert (back.promote, back.decision, back.candidate, back.baseline, back.baseline_version) == (
        True,
        "better",
        0.05,
        0.1,
        "2",
    )
    assert _stored_decision(type("V", (), {"tags": {}})()) is None


# ------------------------------------------------------------------ lineage


def test_lineage_tags_name_the_data_the_training_runs_and_the_metrics(cascade_dir, tmp_path):
    folder = shutil.copytree(cascade_dir, tmp_path / "c")
    training = {
        "stages": {
            s: {
                "run_name": f"{s}-run",
                "mlflow_run_id": f"id-{s}",
                "dataset_version": VERSION,
                "step": 8,
                "tracking_uri": "http://alice:***@mlflow:5000",
            }
            for s in ("base", "sr1")
        }
    }
    (folder / TRAINING_JSON).write_text(json.dumps(training))
    data = DatasetInfo(
        path="s3://alice:s3cret@bucket/data?token=tok9",
        version=VERSION,
        resolution=16,
        text_encoder_name="hash-test",
        text_encoder_id="hash-test-384",
        max_tokens=8,
        shards=(("shard-000000.tar", 16),),
    )
    tags = lineage_tags(folder, data, _report(0.1), digest="d" * 64, flow_run_id="flow-123")
    assert tags["content_hash"] == "d" * 64
    assert tags["dataset_version"] == VERSION
    assert tags["training.base.run_name"] == "base-run"
    assert tags["training.sr1.mlflow_run_id"] == "id-sr1"
    assert tags["training.sr1.step"] == "8"
    assert tags["prefect.flow_run_id"] == "flow-123"
    assert tags["metric.kid"] == "0.1" and tags["metric.fid"] == "50.0"
    assert tags["cascade.stages"] == "base:8px,sr1:16px"
    assert EvalReport.model_validate_json(tags["eval.report"]).metrics["kid"] == 0.1
    assert "lineage.warning" not in tags
    text = json.dumps(tags)
    assert "s3cret" not in text and "tok9" not in text
    # trained on other data than evaluated on: said so
    data2 = DatasetInfo(**{**data.__dict__, "version": "ef" * 32})
    report2 = _report(0.1, version="ef" * 32)
    warned = lineage_tags(folder, data2, report2, digest="d" * 64)
    assert "trained on other datasets" in warned["lineage.warning"]
    assert "prefect.flow_run_id" not in warned


def test_result_summary_puts_the_contract_first_and_is_strict_json():
    r = RegistrationResult(
        name="m",
        version="3",
        aliases=["challenger"],
        promoted=False,
        reason="r",
        status="registered",
        model_uri="models:/m/3",
        metrics={"kid": math.nan},
    )
    s = r.summary()
    assert list(s)[:5] == ["name", "version", "aliases", "promoted", "reason"]
    assert s["metrics"]["kid"] is None
    json.dumps(s, allow_nan=False)
