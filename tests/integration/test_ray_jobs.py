"""``RAY_ADDRESS=http://<dashboard>``: ingest and batch sampling are submitted as Ray jobs to a real
2-node cluster (``two_node_cluster``, conftest.py) and return what the local path returns; their
outputs are the same files, and no job's request, runtime env or metadata holds a credential of
the submitting process (which has some in its environment and in the tracking URI)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffusion_core import ray_jobs
from diffusion_core.ray_env import is_credential
from tests.integration.test_batch import make_cascade

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "cluster-test-s3cr3t-41c7"


def submit_mode(mp: pytest.MonkeyPatch, cluster: dict) -> None:
    """This process as a client of the cluster's Jobs API, with credentials of its own."""
    mp.setenv("RAY_ADDRESS", cluster["dashboard"])
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.delenv("CASCADE_IN_RAY_JOB", raising=False)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    mp.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)


def jobs_of(cluster: dict, kind: str) -> list:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(cluster["dashboard"]).list_jobs()
    return [j for j in jobs if (j.metadata or {}).get("kind") == f"cascade-{kind}"]


def assert_no_credential(job) -> dict:
    """Nothing secret in what Ray stores of the job; returns its decoded request."""
    request = ray_jobs.decode_request(job.entrypoint.rsplit(" ", 1)[-1])
    stored = json.dumps([job.model_dump() if hasattr(job, "model_dump") else str(job), request], default=str)
    assert (SECRET in stored) is False  # not an `in` assertion: pytest would print the secret
    env_vars = (job.runtime_env or {}).get("env_vars", {})
    assert not [k for k in env_vars if is_credential(k)], env_vars
    assert not [k for k in job.metadata if is_credential(k)], job.metadata
    return request


def test_ingest_through_the_jobs_api_writes_what_the_local_path_writes(two_node_cluster, tmp_path):
    from diffusion_core.data.ingest import IngestConfig, IngestResult, ingest
    from diffusion_core.data.shapes import write_shapes

    raw = tmp_path / "raw"
    write_shapes(raw, 40, seed=5, size=32, shard_size=16)
    opts = dict(resolution=16, min_size=16, shard_size=15, text_encoder="hash-test",
                max_tokens=8, eval_fraction=0.2, eval_max=3, num_encoders=1)  # fmt: skip
    local = ingest(IngestConfig(sources=[str(raw)], out=str(tmp_path / "local"), **opts),
                   engine="local")  # fmt: skip
    events = []
    with pytest.MonkeyPatch.context() as mp:
        submit_mode(mp, two_node_cluster)
        mp.chdir(tmp_path)  # relative paths: made absolute for the cluster
        remote = ingest(IngestConfig(sources=["raw"], out="remote", **opts), progress=events.append)
    assert isinstance(remote, IngestResult)
    assert remote.out == str(tmp_path / "remote")
    assert remote.dataset_version == local.dataset_version
    for field in ("read", "accepted", "rejected", "rejected_by_reason", "train", "eval"):
        assert getattr(remote, field) == getattr(local, field), field
    assert remote.shards == local.shards and remote.eval_shards == local.eval_shards
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "remote").iterdir())
    for name in names:
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert events and events[-1].read == local.read  # the job's progress came back
    (job,) = [j for j in jobs_of(two_node_cluster, "ingest") if j.metadata["name"] == "remote"]
    assert job.status == "SUCCEEDED"
    request = assert_no_credential(job)
    assert request["config"]["sources"] == [str(raw)]


def test_batch_sampling_through_the_jobs_api_writes_what_the_local_path_writes(
    two_node_cluster, ray_local, tmp_path
):
    from diffusion_core.batch import BatchConfig, BatchResult, SamplerSettings, run_batch

    cascade = make_cascade(tmp_path / "cascade", 1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a blue shape {i}\n" for i in range(5)) + "\n")
    uri = f"http://bob:{SECRET}@127.0.0.1:9/"  # unused by a folder model; must not travel

    def cfg(out: Path) -> BatchConfig:
        return BatchConfig(model=str(cascade), prompts=[str(prompts)], out=str(out),
                           tracking_uri=uri, settings=SamplerSettings(num_inference_steps=3),
                           contact_sheet=4)  # fmt: skip

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        local = run_batch(cfg(tmp_path / "local"))
    stages = []
    with pytest.MonkeyPatch.context() as mp:
        submit_mode(mp, two_node_cluster)
        remote = run_batch(cfg(tmp_path / "remote"), progress=lambda *a: stages.append(a))
    assert isinstance(remote, BatchResult)
    for field in (
        "read",
        "accepted",
        "rejected",
        "rejected_by_reason",
        "images",
        "written",
        "model",
    ):
        assert getattr(remote, field) == getattr(local, field), field
    assert remote.written == 5 and not remote.nothing_to_do
    assert any(s[0] == "sample" and s[1] == 5 for s in stages), stages

    def rows(out: Path) -> list[dict]:
        keep = ("index", "id", "prompt", "seed", "file", "sha256", "model_uri", "sampler")
        table = pq.read_table(out / "manifest.parquet").to_pylist()
        return sorted(({k: r[k] for k in keep} for r in table), key=lambda r: r["index"])

    assert rows(tmp_path / "remote") == rows(tmp_path / "local")
    for r in rows(tmp_path / "local"):
        assert (tmp_path / "remote" / r["file"]).read_bytes() == (
            tmp_path / "local" / r["file"]
        ).read_bytes()
    for name in ("rejected.jsonl", "contact_sheet.png", "job.json"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    (job,) = [j for j in jobs_of(two_node_cluster, "sample") if j.metadata["name"] == "remote"]
    request = assert_no_credential(job)
    assert request["config"]["tracking_uri"] == "http://127.0.0.1:9/"
    assert job.runtime_env["env_vars"]["CASCADE_IN_RAY_JOB"] == "1"
    assert "working_dir" in job.runtime_env or not os.path.exists("pyproject.toml")
