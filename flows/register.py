"""The evaluate-and-register flow: a cascade folder → a registered, gated model version.

A thin Prefect 3 flow over :func:`diffusion_core.registry.register` (``docs/registry.md``):

- ``evaluate`` task: :func:`diffusion_core.evaluation.evaluate` on the held-out split (skipped
  when ``metrics`` names a report file already written by ``cascade evaluate --out``);
- ``register`` task: log, register, gate and move the aliases, with this flow run's id in the
  version's lineage (``prefect.flow_run_id``). Registration is idempotent by content hash, so a
  retry after a lost server completes the same version instead of adding one;
- a markdown artifact with the metrics and the gate's decision.

Bad inputs (no cascade, a report of other data) fail at once, without retries (flows/retry.py).
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.evaluation.report import EvalReport, EvalSettings
from diffusion_core.registry import REGISTERED_MODEL, GateConfig, RegistryError, register
from flows.retry import retry_if_transient


class RegisterParams(BaseModel):
    """Parameters of one evaluate-and-register run."""

    model_config = ConfigDict(extra="forbid")

    cascade: str = Field(description="Cascade folder (cascade.json + stages/).")
    data: str = Field(description="Dataset folder the cascade is evaluated on.")
    name: str = Field(REGISTERED_MODEL, description="Registered model name.")
    metrics: str | None = Field(None, description="An EvalReport JSON file instead of evaluating.")
    settings: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation settings.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The promotion gate.")
    promote: bool = Field(True, description="Move champion when the gate passes.")
    tracking_uri: str | None = Field(None, description="MLflow URI (default: the environment).")


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_if_transient)
def evaluate_task(params: RegisterParams) -> dict[str, Any]:
    if params.metrics:
        with open(params.metrics) as f:
            return EvalReport.model_validate_json(f.read()).model_dump(mode="json")
    try:
        from diffusion_core.evaluation import evaluate  # type: ignore[attr-defined]
    except ImportError as e:  # permanent: not retried
        raise RegistryError(
            f"diffusion_core.evaluation cannot evaluate here ({e}); pass metrics=<report file>"
        ) from e
    report = evaluate(params.cascade, params.data, params.settings)
    return report.model_dump(mode="json")


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def register_task(params: RegisterParams, report: dict[str, Any], flow_run_id: str | None):
    logger = get_run_logger()
    result = register(
        params.cascade,
        params.data,
        name=params.name,
        report=EvalReport.model_validate(report),
        settings=params.settings,
        promote=params.promote,
        gate=params.gate,
        tracking_uri=params.tracking_uri,
        flow_run_id=flow_run_id,
        progress=lambda phase, message: logger.info("%s", message),
    )
    return result.summary()


def summary_markdown(result: dict[str, Any], report: dict[str, Any]) -> str:
    decision = result.get("decision") or {}
    lines = [
        f"# Register `{result['name']}` version {result['version']}",
        "",
        f"**{'Promoted to champion' if result['promoted'] else 'Not promoted'}**: "
        f"{result['reason']}",
        "",
        f"Aliases: {', '.join(f'`{a}`' for a in result['aliases']) or 'none'}; "
        f"status `{result['status']}`; content `{(result.get('content_hash') or '')[:12]}`.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for key, value in sorted(report.get("metrics", {}).items()):
        lines.append(f"| {key} | {value:.6g} |")
    if decision:
        lines += ["", "| gate | |", "|---|---|", f"| decision | {decision.get('decision')} |"]
        for key in ("metric", "candidate", "baseline", "baseline_version"):
            if decision.get(key) is not None:
                lines.append(f"| {key} | {decision[key]} |")
    s = report.get("settings", {})
    lines += [
        "",
        f"Evaluated on dataset `{report.get('dataset_version', '')[:16]}` "
        f"({report.get('split')}, {s.get('num_samples')} samples, {s.get('sampler')} "
        f"{s.get('steps')} steps, guidance {s.get('guidance_scale')}, seed {s.get('seed')}).",
    ]
    return "\n".join(lines) + "\n"


@flow(name="register", log_prints=True)
def register_flow(params: RegisterParams) -> dict[str, Any]:
    """Evaluate (or read the report), register, gate; returns the registration summary."""
    from prefect.runtime import flow_run

    report = evaluate_task(params)
    result = register_task(params, report, flow_run.id)
    key = re.sub(r"[^a-z0-9-]+", "-", f"register-{params.name}".lower()).strip("-")
    create_markdown_artifact(
        markdown=summary_markdown(result, report),
        key=key,
        description=f"registration of {params.name} version {result['version']}",
    )
    return result


if __name__ == "__main__":  # pragma: no cover
    import sys

    register_flow(RegisterParams(cascade=sys.argv[1], data=sys.argv[2]))
