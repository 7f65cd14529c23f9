"""Every path on object storage: a real S3 server (SeaweedFS, ``tests/s3.py``), real local Ray
Train (2 workers), a real ``mlflow server`` whose artifacts go to the bucket through its proxy.

Ingest → train (stopped at step 4) → resume (steps 5-8 from the checkpoint on S3) → export, with
the dataset, the run storage and the export folder all ``s3://``; what is on the bucket is listed
with boto3, independently of the project's filesystem layer.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest
import torch

from diffusion_core import storage
from diffusion_core.training import NonFiniteLossError, load_preset, train
from infra.local.services import MlflowServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRESET = load_preset("tiny")


@pytest.fixture(scope="module")
def s3_env(s3):
    """The S3 settings in this process's environment (the driver's), for the module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        yield s3


@pytest.fixture(scope="module")
def root(s3_env) -> str:
    return s3_env.prefix("e2e")


@pytest.fixture(scope="module")
def mlflow_server(s3_env, root, tmp_path_factory):
    """Artifacts proxied to ``<root>/mlflow``; the keys are in the server's environment."""
    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-s3"),
        artifacts_destination=storage.join(root, "mlflow"),
        extra_env=s3_env.env,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dataset(s3_env, root, tmp_path_factory) -> str:
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes

    raw = tmp_path_factory.mktemp("raw")
    write_shapes(raw, 48, seed=3, size=32, shard_size=32)
    out = storage.join(root, "data")
    cfg = IngestConfig(
        sources=[str(raw)],
        out=out,
        resolution=16,
        min_size=16,
        shard_size=20,
        text_encoder="hash-test",
        max_tokens=8,
        eval_fraction=0.2,
        eval_max=4,
    )
    result = ingest(cfg, engine="local")
    assert result.read == result.accepted + result.rejected
    assert result.accepted == result.train + result.eval and result.eval > 0
    return out


def _no_partials(keys: list[str]) -> None:
    """No temporary object of ours (``.name.partial``) is visible; Ray's own
    ``.validate_storage_marker`` is the one hidden name expected."""
    hidden = [k for k in keys if k.rsplit("/", 1)[-1].startswith(".")]
    assert set(hidden) <= {".validate_storage_marker"}, keys
    assert not [k for k in keys if k.endswith(storage.PARTIAL_SUFFIX)], keys


def test_ingest_writes_a_complete_dataset_to_s3(s3_env, dataset):
    from diffusion_core.data.format import read_manifest
    from diffusion_core.data.ingest import verify

    keys = s3_env.keys(dataset)
    manifest = json.loads(s3_env.client().get_object(
        Bucket=s3_env.bucket, Key=f"{dataset.split('/', 3)[3]}/manifest.json"
    )["Body"].read())  # fmt: skip
    names = [s["name"] for s in manifest["shards"]] + [s["name"] for s in manifest["eval_shards"]]
    assert sorted(keys) == sorted([*names, "manifest.json", "rejected.jsonl"])
    _no_partials(keys)
    verify(dataset)  # every shard's bytes and sha256 as the manifest says, read back from S3
    assert read_manifest(dataset).num_samples == manifest["split"]["train"]


def test_train_resume_export_with_every_path_on_s3(
    s3_env, root, dataset, mlflow_server, ray_local, tmp_path, capfd
):
    from mlflow.tracking import MlflowClient

    from diffusion_core.cascade import Cascade

    runs, export = storage.join(root, "runs"), storage.join(root, "cascade")
    cfg = PRESET.for_stage("base", storage_path=runs, tracking_uri=mlflow_server.url)
    first = train(cfg, dataset, export_dir=export, stop_at=4)
    assert first.status == "stopped" and first.step == 4
    run_keys = s3_env.keys(storage.join(runs, first.run_name))
    for name in ("run.json", "summary.json", "progress.json", "attempts.jsonl"):
        assert name in run_keys, run_keys
    assert "checkpoint_00000004/ema.safetensors" in run_keys
    assert not s3_env.keys(export), "a stopped run exports nothing"

    again = train(cfg, resume=first.run_name, export_dir=export)
    assert again.status == "completed" and again.step == 8
    # two worker-group starts; the second continued from the checkpoint on S3, not from step 0
    assert [a["start_step"] for a in again.attempts] == [0, 4]
    assert all(len(a["workers"]) == 2 for a in again.attempts)
    run_keys = s3_env.keys(storage.join(runs, first.run_name))
    assert {"checkpoint_00000004/state.json", "checkpoint_00000008/state.json"} <= set(run_keys)
    summary = json.loads(storage.read_bytes(storage.join(runs, first.run_name, "summary.json")))
    assert summary["status"] == "completed" and summary["export_dir"] == export
    _no_partials(run_keys)

    export_keys = s3_env.keys(export)
    assert {"cascade.json", "training.json", "stages/base/model.safetensors"} <= set(export_keys)
    _no_partials(export_keys)
    local = storage.download(export, tmp_path / "cascade")
    cascade = Cascade.load(local)
    assert [s.name for s in cascade] == ["base"]
    images = cascade.sample(["a small red circle"], steps=3)
    assert images.shape == (1, 8, 8, 3) and images.dtype == torch.uint8
    lineage = json.loads((local / "training.json").read_text())["stages"]["base"]
    assert lineage["step"] == 8 and lineage["run_name"] == first.run_name

    # MLflow: the artifacts went through the server's proxy into the bucket
    mlflow_keys = s3_env.keys(storage.join(root, "mlflow"))
    assert any(k.endswith(".png") for k in mlflow_keys), mlflow_keys
    run = MlflowClient(mlflow_server.url).get_run(again.mlflow_run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert run.info.status == "FINISHED"

    # the secret key: nowhere in params, tags, run files, the server's log or this run's output
    secret = s3_env.secret_key
    assert secret not in json.dumps([run.data.params, run.data.tags])
    for key in run_keys:
        if key.endswith((".json", ".jsonl")):
            assert secret not in storage.read_bytes(storage.join(runs, first.run_name, key)).decode()
    assert secret not in Path(mlflow_server.log_path).read_text(errors="replace")
    out, err = capfd.readouterr()
    assert secret not in out + err


def test_a_non_finite_loss_on_s3_stops_and_is_not_retried(
    s3_env, root, dataset, mlflow_server, ray_local, tmp_path
):
    runs = storage.join(root, f"nan-{secrets.token_hex(2)}")
    cfg = PRESET.for_stage(
        "base", storage_path=runs, tracking_uri=mlflow_server.url, max_failures=1
    )
    fault = {"kind": "nan", "step": 6, "rank": 1, "marker": str(tmp_path / "unused")}
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6"):
        train(cfg, dataset, export_dir=None, fault=fault)
    (name,) = [n for n in storage.listdir(runs) if n.startswith("base-")]  # beside Ray's own
    keys = s3_env.keys(storage.join(runs, name))
    assert "nonfinite.json" in keys and "summary.json" in keys
    checkpoints = {k.split("/")[0] for k in keys if re.match(r"checkpoint_\d+/", k)}
    assert checkpoints == {"checkpoint_00000004"}, "the last good checkpoint, none after it"
    summary = json.loads(storage.read_bytes(storage.join(runs, name, "summary.json")))
    # max_failures=1, yet one attempt: the NaN marker on S3 stopped the retry
    assert summary["status"] == "failed" and len(summary["attempts"]) == 1
