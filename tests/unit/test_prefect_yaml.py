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


def _nightly() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "nightly")


def test_a_new_dataset_event_from_the_ingest_flow_triggers_the_nightly_retrain():
    from datetime import UTC, datetime
    from uuid import uuid4

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    from flows.ingest import dataset_event

    (spec,) = _nightly()["triggers"]
    declared = DeploymentEventTrigger.model_validate(spec)  # what `prefect deploy` reads
    assert declared.enabled
    fields = {"match", "match_related", "after", "expect", "for_each", "posture", "threshold",
              "within"}  # fmt: skip
    trigger = EventTrigger.model_validate(declared.model_dump(mode="json", include=fields))
    result = {"dataset_version": "ab" * 32, "out": "s3://bucket/data?token=SECRET", "accepted": 9,
              "rejected": 1, "eval": 2}  # fmt: skip
    args = dataset_event(result)
    assert "SECRET" not in repr(args), "no credential in the event"

    def received(event: str, resource_id: str) -> ReceivedEvent:
        return ReceivedEvent(
            occurred=datetime.now(UTC), event=event, resource={"prefect.resource.id": resource_id},
            payload={}, id=uuid4(),
        )  # fmt: skip

    assert trigger.covers(received(args["event"], args["resource"]["prefect.resource.id"]))
    assert not trigger.covers(received("cascade.dataset.deleted", "cascade.dataset.abab"))
    assert not trigger.covers(received(args["event"], "prefect.flow-run.1234"))


def test_the_zombie_automation_outlasts_the_deployments_heartbeat():
    """A run is marked Crashed only after missing more than one heartbeat."""
    from prefect.events.schemas.automations import AutomationCore

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    automations = yaml.safe_load((ROOT / "infra/prefect/automations.yaml").read_text())
    (zombie,) = [AutomationCore.model_validate(a) for a in automations["automations"]]
    assert zombie.trigger.posture == "Proactive"
    assert zombie.actions[0].type == "change-flow-run-state" and zombie.actions[0].state == "CRASHED"
    for d in spec["deployments"]:
        beat = int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= beat and 2 * beat <= zombie.trigger.within.total_seconds(), d["name"]
