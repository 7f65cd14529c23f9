"""The batch-sampling job end to end: real local Ray Data (actor pool), a tiny cascade, real files.

Every input format and bad row, byte-identical images across batch sizes and actor counts, a job
process killed mid-run and run again (png and webdataset output), the "nothing to do" rerun, a
registry alias pinned once while it moves, the outputs on a real S3 server, and the Prefect flow
under the test harness."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_core.batch import BatchConfig, BatchError, SamplerSettings, run_batch
from diffusion_core.cascade import Cascade
from diffusion_core.training import load_preset

pytestmark = pytest.mark.integration
FAST = SamplerSettings(num_inference_steps=4, guidance_scale=2.0)


def make_cascade(path: Path, seed: int) -> Path:
    """A tiny random cascade (8px base → 16px SR, the offline hash text encoder)."""
    torch.manual_seed(seed)
    cascade = Cascade.from_config(load_preset("tiny").cascade)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised output layers would make every image alike
        for stage in cascade:
            for p in stage.network.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    cascade.save(path)
    return path


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory) -> Path:
    return make_cascade(tmp_path_factory.mktemp("cascade"), 0)


@pytest.fixture(autouse=True)
def _local(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def prompts_txt(path: Path, n: int) -> Path:
    colours = ["red", "blue", "green"]
    path.write_text("".join(f"a {colours[i % 3]} shape number {i}\n" for i in range(n)))
    return path


def cfg(cascade_dir, prompts, out, **kw) -> BatchConfig:
    return BatchConfig(model=str(cascade_dir), prompts=[str(p) for p in prompts], out=str(out),
                       settings=kw.pop("settings", FAST), **kw)  # fmt: skip


def manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def test_every_format_and_bad_row_adds_up(ray_local, cascade_dir, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"a red circle\n\nbad \xff\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "two squares", "id": "sq", "seed": 5}) + "\n{oops\n"
        + json.dumps({"prompt": "dup", "id": "sq"}) + "\n"
        + json.dumps({"prompt": "three stars", "negative_prompt": "blue"}) + "\n"
    )  # fmt: skip
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,seed\na green triangle,1\nctrl\x07char,2\n")
    par = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a big circle", "   "], "id": ["big", "blank"]}), par)
    out = tmp_path / "out"
    r = run_batch(cfg(cascade_dir, [txt, jsonl, csv, par], out, images_per_prompt=2))
    reasons = {"empty_prompt": 2, "not_utf8": 1, "bad_json": 1, "duplicate_id": 1, "control_characters": 1}
    assert r.rejected_by_reason == dict(sorted(reasons.items()))
    assert r.read == 11 == r.accepted + r.rejected and r.accepted == 5
    assert r.images == 10 == r.written and r.resumed == 0
    rows = manifest(out)
    assert sorted(x["id"] for x in rows) == sorted(
        f"{i}_{k}" for i in ("a-1", "sq", "b-4", "c-2", "big") for k in (0, 1)
    )
    sq = {x["id"]: x for x in rows}
    assert (sq["sq_0"]["seed"], sq["sq_1"]["seed"]) == (5, 6)  # an explicit seed, then +k
    assert sq["b-4_0"]["negative_prompt"] == "blue"
    for x in rows:
        data = (out / x["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == x["sha256"] and data[:4] == b"\x89PNG"
        assert x["model_uri"] == str(cascade_dir) and x["num_inference_steps"] == 4
    from PIL import Image

    assert Image.open(out / rows[0]["file"]).size == (16, 16)
    assert (out / "contact_sheet.png").is_file()
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 6 and {x["reason"] for x in rejected} == set(reasons)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["images"] == 10
    assert not list(out.rglob("*.partial"))


def test_bad_jobs_fail_before_any_actor_starts(ray_local, cascade_dir, tmp_path):
    p = prompts_txt(tmp_path / "p.txt", 3)
    with pytest.raises(BatchError, match="does not exist"):
        run_batch(cfg(cascade_dir, [tmp_path / "none.txt"], tmp_path / "o1"))
    with pytest.raises(BatchError, match="model folder .* does not exist"):
        run_batch(cfg(tmp_path / "nowhere", [p], tmp_path / "o2"))
    with pytest.raises(BatchError, match="cannot reach the MLflow registry"):
        nowhere = "http://127.0.0.1:9"  # nothing listens there
        run_batch(cfg("models:/x@champion", [p], tmp_path / "o3", tracking_uri=nowhere))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(BatchError, match="no prompt to sample"):
        run_batch(cfg(cascade_dir, [empty], tmp_path / "o4"))
    (tmp_path / "x").mkdir()
    prompts_txt(tmp_path / "x" / "p.txt", 2)
    with pytest.raises(BatchError, match="several prompts files are named"):
        run_batch(cfg(cascade_dir, [p, tmp_path / "x" / "p.txt"], tmp_path / "o5"))


def test_images_are_byte_identical_across_batch_sizes_and_actor_counts(ray_local, cascade_dir, tmp_path):
    p = prompts_txt(tmp_path / "p.txt", 12)
    a = run_batch(cfg(cascade_dir, [p], tmp_path / "a", batch_size=1, num_actors=1))
    b = run_batch(cfg(cascade_dir, [p], tmp_path / "b", batch_size=5, num_actors=2))
    assert a.images == b.images == 12
    sha_a = {x["id"]: x["sha256"] for x in manifest(tmp_path / "a")}
    sha_b = {x["id"]: x["sha256"] for x in manifest(tmp_path / "b")}
    assert sha_a == sha_b and len(set(sha_a.values())) == 12  # and the images differ
    # a changed setting changes the images; the same output folder refuses another job
    with pytest.raises(BatchError, match="holds the output of another job"):
        run_batch(cfg(cascade_dir, [p], tmp_path / "a", settings=SamplerSettings(num_inference_steps=5)))
    again = run_batch(cfg(cascade_dir, [p], tmp_path / "a", batch_size=3))
    assert again.nothing_to_do and again.written == 0


def test_a_killed_job_resumes_without_recomputing_or_duplicating(ray_local, cascade_dir, tmp_path):
    p = prompts_txt(tmp_path / "p.txt", 150)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "diffusion_core.cli", "sample", "--model", str(cascade_dir),
            "--prompts", str(p), "--out", str(out), "--num-inference-steps", "12",
            "--batch-size", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list((out / "images").glob("*.png"))) < 10 if (out / "images").exists() else True:
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no images after 240 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {f.name for f in (out / "images").glob("*.png")}
    assert 10 <= len(done_before) < 150 and not (out / "manifest.parquet").exists()
    stat_before = {f: (out / "images" / f).stat().st_mtime_ns for f in done_before}
    time.sleep(2)  # let the killed Ray's processes go
    r = run_batch(cfg(cascade_dir, [p], out, settings=SamplerSettings(num_inference_steps=12), batch_size=2))
    assert r.images == 150 and r.resumed >= len(done_before) and r.written == 150 - r.resumed
    ids = [x["id"] for x in manifest(out)]
    assert len(ids) == len(set(ids)) == 150
    assert not [f for f in out.rglob("*") if f.name.endswith(".partial")]
    # the images written before the kill were not recomputed (nor rewritten)
    assert all((out / "images" / f).stat().st_mtime_ns == t for f, t in stat_before.items())
    # and they are the images an uninterrupted job writes
    straight = run_batch(cfg(cascade_dir, [p], tmp_path / "straight",
                             settings=SamplerSettings(num_inference_steps=12), batch_size=8))  # fmt: skip
    assert straight.images == 150
    assert {x["id"]: x["sha256"] for x in manifest(out)} == {
        x["id"]: x["sha256"] for x in manifest(tmp_path / "straight")
    }


def read_webdataset(out: Path) -> dict[str, dict]:
    """Every sample of the output's shards, read by the ``webdataset`` package (not our reader)."""
    import webdataset as wds

    urls = sorted(str(f) for f in (out / "shards").glob("*.tar"))
    samples: dict[str, dict] = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in samples, f"{s['__key__']} twice"
        samples[s["__key__"]] = {"shard": Path(s["__url__"]).name, **s}
    return samples


def shard_digests(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (out / "shards").glob("*.tar")}


def test_webdataset_shards_hold_every_image_once_with_the_png_bytes(ray_local, cascade_dir, tmp_path):
    p = prompts_txt(tmp_path / "p.txt", 12)
    png = run_batch(cfg(cascade_dir, [p], tmp_path / "png", batch_size=4))
    a = run_batch(cfg(cascade_dir, [p], tmp_path / "a", format="webdataset", shard_size=5,
                      batch_size=1, num_actors=1))  # fmt: skip
    b = run_batch(cfg(cascade_dir, [p], tmp_path / "b", format="webdataset", shard_size=5,
                      batch_size=3, num_actors=2))  # fmt: skip
    assert png.images == a.images == b.images == 12 == a.written == b.written
    ids = [f"p-{i}" for i in range(1, 13)]
    samples = read_webdataset(tmp_path / "a")
    assert sorted(samples) == sorted(ids)
    # the prompts, in file order, cut into shards of 5, 5 and 2
    assert [samples[i]["shard"] for i in ids] == ["shard-000000.tar"] * 5 + ["shard-000001.tar"] * 5 + [
        "shard-000002.tar"
    ] * 2
    by_id = {x["id"]: x for x in manifest(tmp_path / "png")}
    for i in ids:
        assert samples[i]["png"] == (tmp_path / "png" / by_id[i]["file"]).read_bytes()
        assert samples[i]["txt"].decode() == by_id[i]["prompt"]
        meta = json.loads(samples[i]["json"])
        assert meta["sha256"] == by_id[i]["sha256"] and meta["seed"] == by_id[i]["seed"]
    # the manifest points at shard and member; the shards' bytes do not depend on the batch size
    # or the actor count (fixed tar headers, members in plan order)
    rows = {x["id"]: x for x in manifest(tmp_path / "b")}
    assert sorted(rows) == sorted(ids)
    assert rows["p-7"]["file"] == "shards/shard-000001.tar" and rows["p-7"]["member"] == "p-7.png"
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b") and len(shard_digests(tmp_path / "a")) == 3
    for out in (tmp_path / "a", tmp_path / "b"):
        assert (out / "contact_sheet.png").is_file() and not (out / "images").exists()
        assert not [f for f in out.rglob("*") if f.name.endswith(".partial") or ".staging" in f.parts]
    # the shard size is part of the job: another one in the same folder is another job
    with pytest.raises(BatchError, match="holds the output of another job"):
        run_batch(cfg(cascade_dir, [p], tmp_path / "a", format="webdataset", shard_size=4))
    assert run_batch(cfg(cascade_dir, [p], tmp_path / "a", format="webdataset", shard_size=5)).nothing_to_do


def test_a_killed_webdataset_job_resumes_shard_by_shard(ray_local, cascade_dir, tmp_path):
    p = prompts_txt(tmp_path / "p.txt", 80)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "diffusion_core.cli", "sample", "--model", str(cascade_dir),
            "--prompts", str(p), "--out", str(out), "--num-inference-steps", "12",
            "--batch-size", "2", "--format", "webdataset", "--shard-size", "8"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list((out / "shards").glob("*.tar"))) < 2:
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no 2 shards after 240 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    shards_before = {f.name: f.stat().st_mtime_ns for f in (out / "shards").glob("*.tar")}
    done = {int(name[6:12]) for name in shards_before}
    # staged images of unfinished shards (a kill between a shard's rename and the removal of
    # its staged copies leaves those too: they are not images to resume)
    staged_before = [f for f in (out / ".staging").glob("*.png") if (int(f.stem[2:]) - 1) // 8 not in done]
    assert 2 <= len(shards_before) < 10 and not (out / "manifest.parquet").exists()
    time.sleep(2)  # let the killed Ray's processes go
    job = dict(settings=SamplerSettings(num_inference_steps=12), format="webdataset", shard_size=8)
    r = run_batch(cfg(cascade_dir, [p], out, batch_size=2, **job))
    # complete shards were not redone, nor were the images staged for an unfinished one
    assert r.images == 80 and r.resumed >= 8 * len(shards_before) + len(staged_before)
    assert r.written == 80 - r.resumed
    assert all((out / "shards" / f).stat().st_mtime_ns == t for f, t in shards_before.items())
    samples = read_webdataset(out)
    assert sorted(samples) == sorted(f"p-{i}" for i in range(1, 81))  # every id exactly once
    ids = [x["id"] for x in manifest(out)]
    assert len(ids) == len(set(ids)) == 80
    assert not [f for f in out.rglob("*") if f.name.endswith(".partial") or ".staging" in f.parts]
    # and the shards are, byte for byte, those of an uninterrupted job with other batch sizes
    straight = tmp_path / "straight"
    assert run_batch(cfg(cascade_dir, [p], straight, batch_size=5, num_actors=2, **job)).written == 80
    assert shard_digests(out) == shard_digests(straight) and len(shard_digests(out)) == 10


def test_both_formats_write_to_s3_resume_there_and_list_exactly(
    ray_local, cascade_dir, tmp_path, s3, monkeypatch
):
    import io

    for k, v in s3.env.items():  # credentials from the environment, as in production
        monkeypatch.setenv(k, v)
    p = prompts_txt(tmp_path / "p.txt", 6)
    run_batch(cfg(cascade_dir, [p], tmp_path / "local"))
    local = {x["id"]: x["sha256"] for x in manifest(tmp_path / "local")}
    client = s3.client()
    records = {"job.json", "manifest.parquet", "rejected.jsonl", "summary.json", "contact_sheet.png"}
    for fmt, extra, files, lost in (
        ("png", {}, {f"images/p-{i}.png" for i in range(1, 7)}, ["images/p-5.png", "images/p-6.png"]),
        ("webdataset", {"shard_size": 4}, {"shards/shard-000000.tar", "shards/shard-000001.tar"},
         ["shards/shard-000001.tar"]),
    ):  # fmt: skip
        uri = s3.prefix(f"batch-{fmt}")
        job = cfg(cascade_dir, [p], uri, format=fmt, num_actors=2, batch_size=2, **extra)
        assert run_batch(job).written == 6
        assert set(s3.keys(uri)) == records | files  # no plan, staging or partial object left

        prefix = uri.removeprefix(f"s3://{s3.bucket}/")

        def get(key: str, prefix: str = prefix) -> bytes:  # read with boto3, not our fsspec layer
            return client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")["Body"].read()

        rows = pq.read_table(io.BytesIO(get("manifest.parquet"))).to_pylist()
        assert {x["id"]: x["sha256"] for x in rows} == local  # the same bytes as a local job
        if fmt == "png":
            assert all(hashlib.sha256(get(x["file"])).hexdigest() == x["sha256"] for x in rows)
        for key in ("job.json", "summary.json", "manifest.parquet"):
            assert s3.secret_key.encode() not in get(key)
        # what a job killed before its last images leaves: run again, only those are made
        for key in ["summary.json", "manifest.parquet", *lost]:
            client.delete_object(Bucket=s3.bucket, Key=f"{prefix}/{key}")
        r = run_batch(job)
        assert (r.written, r.resumed) == (2, 4)
        assert set(s3.keys(uri)) == records | files
        assert run_batch(job).nothing_to_do


def _register(client, name: str, cascade_dir: Path, artifacts: Path) -> str:
    """A registry version whose artifacts are a cascade folder (what resolution needs)."""
    exp = client.get_experiment_by_name("batch-test")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "batch-test", artifact_location=artifacts.as_uri()
    )
    run = client.create_run(exp_id)
    client.log_artifacts(run.info.run_id, str(cascade_dir), "cascade")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/cascade"
    return str(client.create_model_version(name, source=source, run_id=run.info.run_id).version)


def test_a_registry_alias_is_pinned_once_even_if_it_moves(ray_local, cascade_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, registry_uri=uri)
    store = tmp_path / "artifacts"
    v1 = _register(client, "cascade-diffusion", cascade_dir, store)
    v2 = _register(client, "cascade-diffusion", make_cascade(tmp_path / "other", 1), store)
    client.set_registered_model_alias("cascade-diffusion", "champion", v1)
    p = prompts_txt(tmp_path / "p.txt", 8)
    moved = []

    def move_champion(stage: str, done: int, total: int | None) -> None:
        if stage == "sample" and not moved:
            client.set_registered_model_alias("cascade-diffusion", "champion", v2)
            moved.append(done)

    out = tmp_path / "out"
    job = cfg("models:/cascade-diffusion@champion", [p], out, batch_size=2, tracking_uri=uri)
    r = run_batch(job, progress=move_champion)
    assert moved and r.model["version"] == v1 and r.model["uri"] == f"models:/cascade-diffusion/{v1}"
    rows = manifest(out)
    assert {(x["model_name"], x["model_version"]) for x in rows} == {("cascade-diffusion", v1)}
    run_batch(cfg(cascade_dir, [p], tmp_path / "folder"))
    assert {x["id"]: x["sha256"] for x in rows} == {x["id"]: x["sha256"] for x in manifest(tmp_path / "folder")}
    with pytest.raises(BatchError, match="not found in the registry"):
        run_batch(cfg("models:/cascade-diffusion@nope", [p], tmp_path / "o", tracking_uri=uri))


@pytest.mark.slow
def test_the_prefect_flow_runs_the_job_with_artifacts(ray_local, cascade_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.sample import sample_batch_flow

    p = prompts_txt(tmp_path / "p.txt", 4)
    with prefect_test_harness():
        result = sample_batch_flow(cfg(cascade_dir, [p], tmp_path / "out"))
        from prefect.client.orchestration import get_client

        async def artifacts():
            async with get_client() as c:
                return await c.read_artifacts()

        import asyncio

        keys = {a.key for a in asyncio.run(artifacts())}
    assert result["images"] == 4 and result["written"] == 4
    assert {"sample-batch-summary", "sample-batch-rows"} <= keys
