"""prefect.yaml: every deployment's entrypoint is a real flow of this repository, and the nightly
retrain is scheduled at 03:00, shipped inactive, never overlapping itself."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_point_at_real_flows_with_their_parameters():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "ingest", "train-cascade", "register", "sample-batch"}
    flows = {}
    for name, d in deployments.items():
        path, func = d["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        flows[name] = flow
        assert d["work_pool"]["name"] == "cascade-process"
        params = set(flow.parameters.properties)
        assert set(d.get("parameters", {})) <= params, f"{name}: unknown parameters"
    assert flows["nightly"].name == "retrain"
    assert {"sources", "workdir", "preset", "overrides", "model_name", "prompts", "warm_start",
            "promote"} <= set(flows["nightly"].parameters.properties)  # fmt: skip
    nightly = deployments["nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule == {"cron": "0 3 * * *", "timezone": "UTC", "active": False}
    assert nightly["concurrency_limit"]["limit"] == 1
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
