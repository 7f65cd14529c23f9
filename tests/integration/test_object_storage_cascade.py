"""Cascades on a real S3 server (SeaweedFS, ``tests/s3.py``): stages exported *concurrently*
into one ``s3://`` cascade (threads and processes) all end up in it, and the cascade loads
straight from the bucket (``Cascade.load("s3://...")``, ``cascade sample``'s model resolution,
``cascade evaluate``, ``register``), verified and cached, sampling bit-identically to a copy
downloaded with ``storage.download``. Tiny networks: seconds, no Ray, no training run.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion_core import storage
from diffusion_core.cascade import Cascade, Stage, content_hash
from diffusion_core.cascade.fetch import CACHE_ENV, CascadeFetchError, local_cascade
from diffusion_core.training import load_preset
from diffusion_core.training.checkpoint import EMA_FILE
from diffusion_core.training.export import export_stage

pytestmark = [pytest.mark.integration]

PRESET = load_preset("tiny")
STAGES = list(PRESET.stage_names)  # base, sr1
THREAD_ROUNDS = 12
PROCESS_ROUNDS = 6


@pytest.fixture(scope="module")
def s3_env(s3):
    with pytest.MonkeyPatch.context() as mp_:
        for k, v in s3.env.items():
            mp_.setenv(k, v)
        yield s3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """One ``ema.safetensors`` per stage of the tiny preset (random, perturbed weights)."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for name in STAGES:
        stage = Stage(PRESET.for_stage(name).stage_config)
        with torch.no_grad():
            for p in stage.network.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        (root / name).mkdir()
        save_file(
            {k: v.contiguous() for k, v in stage.network.state_dict().items()},
            str(root / name / EMA_FILE),
        )
        out[name] = str(root / name)
    return out


def _export(ckpt: str, uri: str, stage: str, start_at: float) -> str:
    """One stage's export, started at ``start_at`` (both stages of a round start together)."""
    time.sleep(max(0.0, start_at - time.time()))
    export_stage(
        ckpt, uri, cascade=PRESET.cascade, stage=stage, lineage={"run_name": f"run-{stage}"}
    )
    return stage


def _check_whole(s3, uri: str) -> None:
    keys = set(s3.keys(uri))
    want = {"cascade.json", "training.json", "exports/base.json", "exports/sr1.json"}
    want |= {f"stages/{s}/{f}" for s in STAGES for f in ("model.safetensors", "config.json")}
    assert want <= keys, sorted(keys)
    assert not any(k.endswith(".partial") or "/." in k for k in keys), sorted(keys)
    index = json.loads(
        s3.client().get_object(Bucket=s3.bucket, Key=_key(s3, uri, "cascade.json"))["Body"].read()
    )
    assert [s["name"] for s in index["stages"]] == STAGES, f"{uri}: a stage was lost: {index}"
    training = json.loads(
        s3.client().get_object(Bucket=s3.bucket, Key=_key(s3, uri, "training.json"))["Body"].read()
    )
    assert {k: v["run_name"] for k, v in training["stages"].items()} == {
        s: f"run-{s}" for s in STAGES
    }


def _key(s3, uri: str, rel: str) -> str:
    return f"{uri.removeprefix(f's3://{s3.bucket}/')}/{rel}"


def test_concurrent_exports_from_threads_keep_every_stage(s3_env, ckpts):
    with cf.ThreadPoolExecutor(2) as pool:
        for _ in range(THREAD_ROUNDS):
            uri = s3_env.prefix("threads")
            start = time.time() + 0.05
            futures = [pool.submit(_export, ckpts[s], uri, s, start) for s in reversed(STAGES)]
            assert sorted(f.result() for f in futures) == sorted(STAGES)
            _check_whole(s3_env, uri)


def test_concurrent_exports_from_processes_keep_every_stage(s3_env, ckpts):
    ctx = mp.get_context("spawn")  # the environment (keys, endpoint) is inherited
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        warm = s3_env.prefix("warm")  # imports and the first connection, before the races
        list(pool.map(_export, [ckpts["sr1"]] * 2, [warm] * 2, ["sr1"] * 2, [0.0] * 2))
        for _ in range(PROCESS_ROUNDS):
            uri = s3_env.prefix("procs")
            start = time.time() + 0.3
            futures = [pool.submit(_export, ckpts[s], uri, s, start) for s in reversed(STAGES)]
            assert sorted(f.result() for f in futures) == sorted(STAGES)
            _check_whole(s3_env, uri)


@pytest.fixture(scope="module")
def exported(s3_env, ckpts) -> str:
    """A tiny cascade whose two stages were exported at the same time into one s3:// prefix."""
    uri = s3_env.prefix("cascade")
    barrier = threading.Barrier(2)

    def go(stage: str) -> None:
        barrier.wait()
        export_stage(
            ckpts[stage],
            uri,
            cascade=PRESET.cascade,
            stage=stage,
            lineage={"run_name": f"run-{stage}"},
        )

    threads = [threading.Thread(target=go, args=(s,)) for s in STAGES]
    [t.start() for t in threads]
    [t.join() for t in threads]
    _check_whole(s3_env, uri)
    return uri


def _sample(cascade: Cascade) -> torch.Tensor:
    prompts = ["a small red circle", "two large blue squares", ""]
    return cascade.sample(prompts, seed=[3, 4, 5], steps=4, sampler="ddim", per_image=True)


def test_loading_from_s3_samples_what_the_downloaded_copy_samples(
    s3_env, exported, tmp_path, monkeypatch
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    local = storage.download(exported, tmp_path / "copy")
    t0 = time.perf_counter()
    from_s3 = Cascade.load(exported)
    first_s = time.perf_counter() - t0
    assert [s.name for s in from_s3] == STAGES
    cached = local_cascade(exported)
    assert cached.parent == tmp_path / "cache"
    assert content_hash(exported) == content_hash(local) == content_hash(cached)
    images = _sample(from_s3)
    assert images.shape == (3, 16, 16, 3) and images.dtype == torch.uint8
    assert torch.equal(images, _sample(Cascade.load(local)))
    # again: the cache is reused (one folder), no object is downloaded
    t0 = time.perf_counter()
    assert torch.equal(_sample(Cascade.load(exported)), images)
    print(f"first load {first_s:.2f}s, cached load {time.perf_counter() - t0:.2f}s (with sampling)")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]


def test_an_unfinished_s3_export_is_refused(s3_env, ckpts, tmp_path):
    uri = s3_env.prefix("unfinished")
    export_stage(ckpts["sr1"], uri, cascade=PRESET.cascade, stage="sr1")  # the base is not there
    assert "cascade.json" not in s3_env.keys(uri)
    with pytest.raises(FileNotFoundError, match="export has not finished"):
        Cascade.load(uri, cache_dir=tmp_path / "cache")


def test_hostile_names_on_s3_are_refused(s3_env, exported, tmp_path):
    """Names written by whoever can write the bucket must not make the fetch write outside its
    cache folder: an object key with ``..`` (SeaweedFS refuses to store one: AWS S3 does not, so
    the fetch checks every name itself, see tests/unit/test_cascade_fetch.py), a stage named
    ``..`` in cascade.json (valid for the config's name pattern), an absolute name in a record."""
    from botocore.exceptions import ClientError

    client = s3_env.client()
    copy = s3_env.prefix("hostile")
    storage.upload_dir(storage.download(exported, tmp_path / "copy"), copy)
    try:
        client.put_object(
            Bucket=s3_env.bucket, Key=_key(s3_env, copy, "stages/base/../../../x"), Body=b"x"
        )
        stored = True
    except ClientError as e:
        stored = False
        assert e.response["Error"]["Code"] == "InvalidRequest"
    cache = tmp_path / "a" / "b" / "cache"
    if stored:
        with pytest.raises(CascadeFetchError, match="refusing the object name"):
            local_cascade(copy, cache_dir=cache)
        client.delete_object(Bucket=s3_env.bucket, Key=_key(s3_env, copy, "stages/base/../../../x"))
    config = json.loads(storage.read_bytes(storage.join(copy, "cascade.json")))
    bad = json.loads(json.dumps(config))
    bad["stages"][0]["name"] = ".."
    storage.write_json_atomic(storage.join(copy, "cascade.json"), bad)
    with pytest.raises(CascadeFetchError, match=r"stage name '\.\.' refused"):
        local_cascade(copy, cache_dir=cache)
    storage.write_json_atomic(storage.join(copy, "cascade.json"), config)
    record = json.loads(storage.read_bytes(storage.join(copy, "exports", "base.json")))
    record["files"]["/tmp/escaped"] = {"size": 4, "sha256": "0" * 64}
    storage.write_json_atomic(storage.join(copy, "exports", "base.json"), record)
    with pytest.raises(ValueError, match="absolute"):
        local_cascade(copy, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_cascade_sample_resolves_an_s3_cascade(s3_env, exported, tmp_path):
    from diffusion_core.batch.model import ModelError, resolve_model

    resolved = resolve_model(exported, tmp_path / ".model")
    assert resolved.uri == exported and resolved.name is None
    local = Path(resolved.local_dir)
    assert local.parent == tmp_path / ".model" / "cascades"
    assert content_hash(local) == content_hash(exported)
    assert [s.name for s in Cascade.load(resolved.local_dir)] == STAGES  # what each actor does
    with pytest.raises(ModelError, match="export has not finished"):
        resolve_model(s3_env.prefix("nothing"), tmp_path / ".model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """8 shapes at 16px (the tiny cascade's resolution), hash text encoder."""
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("data")
    write_shapes(root / "raw", 12, seed=1, size=16, shard_size=12)
    cfg = IngestConfig(
        sources=[str(root / "raw")], out=str(root / "data"), resolution=16, min_size=16,
        shard_size=12, text_encoder="hash-test", max_tokens=8, eval_fraction=0.3, eval_max=4,
    )  # fmt: skip
    ingest(cfg, engine="local")
    return root / "data"


def test_cascade_evaluate_takes_an_s3_cascade(s3_env, exported, data_dir, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from diffusion_core.evaluation.cli import evaluate_command

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    app = typer.Typer()
    app.command("evaluate")(evaluate_command)
    app.command("other")(lambda: None)
    args = ["evaluate", "--cascade", exported, "--data", str(data_dir), "--metrics", "nll",
            "--num-samples", "2", "--nll-samples", "2", "--steps", "2", "--out", str(tmp_path / "r.json")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["details"]["cascade"]["dir"] == exported
    assert report["details"]["cascade"]["sha256"] == content_hash(
        storage.download(exported, tmp_path / "copy")
    )


def test_register_takes_an_s3_cascade(s3_env, exported, data_dir, tmp_path, monkeypatch):
    from diffusion_core.data.format import read_manifest
    from diffusion_core.evaluation.report import EvalReport, EvalSettings
    from diffusion_core.registry import register

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = EvalReport(
        dataset_version=read_manifest(str(data_dir)).version,
        settings=EvalSettings(num_samples=2, steps=2),
        metrics={"kid": 0.1, "fid": 50.0},
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = register(exported, data_dir, report=report, tracking_uri=store, name="s3-cascade")
    assert result.status == "registered" and result.version == "1"
    assert result.content_hash == content_hash(storage.download(exported, tmp_path / "copy"))
    again = register(exported, data_dir, report=report, tracking_uri=store, name="s3-cascade")
    assert again.status == "existing" and again.version == "1"
    import mlflow

    mlflow.set_tracking_uri(None)


def test_no_secret_in_the_cache(s3_env, exported, tmp_path):
    local = local_cascade(exported, cache_dir=tmp_path / "cache")
    for f in local.rglob("*"):
        if f.is_file():
            assert s3_env.secret_key.encode() not in f.read_bytes(), f
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_env.secret_key


def test_cascade_sample_batch_job_with_an_s3_model(s3_env, exported, ray_local, tmp_path):
    """The whole batch job (Ray Data, one sampler actor) on an ``s3://`` model: the same image
    bytes as the same job on the downloaded copy."""
    import pyarrow.parquet as pq

    from diffusion_core.batch.config import BatchConfig, SamplerSettings
    from diffusion_core.batch.job import run_batch

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green shape\n")
    fast = SamplerSettings(sampler="ddim", num_inference_steps=3)
    local = storage.download(exported, tmp_path / "copy")
    runs = {}
    for label, model in (("s3", exported), ("local", str(local))):
        out = tmp_path / label
        result = run_batch(
            BatchConfig(model=model, prompts=[str(prompts)], out=str(out), settings=fast)
        )
        assert result.images == 3 and result.model["uri"] == model
        runs[label] = {
            r["id"]: r["sha256"] for r in pq.read_table(out / "manifest.parquet").to_pylist()
        }
    assert runs["s3"] == runs["local"] and len(runs["s3"]) == 3
    assert list((tmp_path / "s3" / ".model" / "cascades").iterdir())  # fetched beside the output
