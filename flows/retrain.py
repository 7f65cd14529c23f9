"""The ``retrain`` flow: the whole pipeline, as one deployable Prefect flow (docs/deploy.md).

ingest ``sources`` → train every stage (concurrently where Ray has the resources) → evaluate →
register (``challenger``; the gate; ``champion``) → batch-sample ``prompts`` with the version
just registered → a report. ``make demo`` runs this very flow on the embedded default (Prefect's
ephemeral API, local Ray, an sqlite MLflow store in ``workdir/runs``).

Idempotence and resume come from the pipeline itself, not from Prefect's result cache: every
step's output is a folder or a registry version named by what it is a function of, so a retried
task, or a crashed flow run started again with the same parameters, finds what finished and
continues from there (Prefect's cache would need its own result storage beside these folders,
and would not notice a folder deleted by hand):

- the dataset folder is ``workdir/datasets/<fingerprint of the raw inputs and options>``: an
  existing one (with its manifest) is reused, so a nightly run with no new data does no ingest;
- each stage's training run is named ``<stage>-<hash of (dataset version, its config)>``: a
  finished run is reused, an interrupted one resumed from its latest checkpoint;
- registration is keyed by the cascade's content hash (no duplicate version);
- the batch job skips the images already written.

Workdir layout: ``datasets/``, ``runs/`` (Ray runs, ``mlflow.db``), ``cascades/<key>/``,
``models/`` (the champion for warm starts), ``prompts/``, ``samples/<name>-v<version>/``,
``reports/``, ``logs/ray.log`` (Ray's driver-side messages, unless ``CASCADE_RAY_LOG`` says
elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.evaluation.report import EvalSettings
from diffusion_core.ray_env import RAY_LOG_ENV
from diffusion_core.storage import absolute, redact
from flows.retry import retry_if_transient
from flows.train import TrainStageParams, train_stage_task


class RetrainParams(BaseModel):
    """Parameters of a retraining run (the names are the contract of the deployments)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1, description="Raw data locations (ingest sources).")
    workdir: str = Field(description="Datasets, runs, the MLflow store (without a server), samples.")
    preset: str = Field("demo", description="Training preset: tiny, demo, gpu or a YAML path.")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Training fields per stage name ('*' for every stage), e.g. {'base': {'steps': 200}}.",
    )
    model_name: str = Field("cascade-diffusion", description="Registered model name.")
    prompts: str | None = Field(
        None, description="Prompts file for the final batch sampling (default: held-out captions)."
    )
    warm_start: bool = Field(
        False, description="Start each stage from the champion's weights when its network matches."
    )
    retrain_unchanged: bool = Field(
        False,
        description="With warm_start: train again even when the champion was trained on this very "
        "dataset version (by default such a run does nothing: no new data, nothing to learn).",
    )
    promote: bool = Field(True, description="Move champion when the gate passes.")
    evaluation: EvalSettings = Field(
        default_factory=lambda: EvalSettings(nll_samples=4),
        description="How the new cascade (and the champion, if measured otherwise) is evaluated.",
    )
    sample_count: int = Field(16, ge=1, description="Held-out captions sampled at the end.")
    eval_fraction: float = Field(0.02, ge=0.0, le=0.5, description="Held-out share at ingest.")


class RetrainSummary(BaseModel):
    """What a retraining run returns."""

    dataset_version: str
    dataset: str
    model_name: str
    model_version: str
    promoted: bool
    reason: str
    metrics: dict[str, float | None]
    samples: str
    report: str


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tracking_uri(workdir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir) / 'runs' / 'mlflow.db'}"


# ============================================================================ tasks
@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def dataset_task(params: RetrainParams, resolution: int, text_encoder: str) -> dict[str, Any]:
    """The dataset of these inputs: reused when it exists, else ingested."""
    from diffusion_core.data.format import read_manifest
    from diffusion_core.data.ingest import IngestConfig, ingest, input_fingerprint

    logger = get_run_logger()
    cfg = IngestConfig(
        sources=[absolute(s) for s in params.sources],
        out=str(Path(params.workdir) / "datasets" / "pending"),
        resolution=resolution,
        text_encoder=text_encoder,
        eval_fraction=params.eval_fraction,
    )
    out = Path(params.workdir) / "datasets" / input_fingerprint(cfg)[:16]
    if (out / "manifest.json").is_file():
        info = read_manifest(str(out))
        logger.info("dataset %s: inputs unchanged, reusing %s", info.version[:12], out)
        return {"path": str(out), "version": info.version, "reused": True}
    t = time.perf_counter()
    result = ingest(cfg.model_copy(update={"out": str(out)}))
    logger.info(
        "ingest: %d read, %d accepted (%d held out), %d rejected in %.0f s -> dataset %s",
        result.read, result.accepted, result.eval, result.rejected, time.perf_counter() - t,
        result.dataset_version[:12],
    )  # fmt: skip
    return {"path": str(out), "version": result.dataset_version, "reused": False}


@task
def champion_task(params: RetrainParams) -> dict[str, Any] | None:
    """The champion's version, training dataset version and metrics (None: no champion)."""
    from diffusion_core.registry import champion_lineage

    return champion_lineage(params.model_name, _tracking_uri(params.workdir))


@task
def warm_start_task(params: RetrainParams) -> str | None:
    """The champion's cascade folder, for warm starts (None: there is no champion yet)."""
    from diffusion_core.batch.model import ModelError, resolve_model

    try:
        champion = resolve_model(
            f"models:/{params.model_name}@champion",
            Path(params.workdir) / "models",
            _tracking_uri(params.workdir),
        )
    except ModelError as e:
        get_run_logger().info("warm start: no champion to start from (%s); training from scratch", e)
        return None
    get_run_logger().info("warm start from %s (version %s)", champion.uri, champion.version)
    return champion.local_dir


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_if_transient)
def evaluate_task(cascade: str, data: str, settings: EvalSettings) -> dict[str, Any]:
    from diffusion_core.evaluation import evaluate

    report = evaluate(cascade, data, settings)
    get_run_logger().info("evaluate: %s", {k: round(v, 4) for k, v in report.metrics.items()})
    return report.model_dump(mode="json")


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)
def register_task(params: RetrainParams, cascade: str, data: str, report: dict[str, Any]) -> dict[str, Any]:
    from diffusion_core.evaluation.report import EvalReport
    from diffusion_core.registry import register

    result = register(
        cascade,
        data,
        name=params.model_name,
        report=EvalReport.model_validate(report),
        settings=params.evaluation,
        promote=params.promote,
        tracking_uri=_tracking_uri(params.workdir),
        flow_run_id=flow_run.get_id(),
    )
    get_run_logger().info(
        "register: %s version %s %s (%s)", result.name, result.version, result.aliases, result.reason
    )
    return result.summary()


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def sample_task(params: RetrainParams, data: str, version: str) -> dict[str, Any]:
    from dataclasses import asdict

    from diffusion_core.batch import BatchConfig, run_batch

    prompts = params.prompts
    if prompts is None:  # the held-out captions of the dataset
        from diffusion_core.data.format import read_manifest
        from diffusion_core.evaluation.heldout import read_heldout

        info = read_manifest(data)
        n = min(params.sample_count, info.num_eval_samples)
        path = Path(params.workdir) / "prompts" / f"heldout-{info.version[:12]}-{n}.txt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            captions = read_heldout(info, n).captions if n else ["a red circle"]
            path.write_text("".join(c.replace("\n", " ") + "\n" for c in captions))
        prompts = str(path)
    out = Path(params.workdir) / "samples" / f"{params.model_name}-v{version}"
    result = run_batch(
        BatchConfig(
            model=f"models:/{params.model_name}/{version}",
            tracking_uri=_tracking_uri(params.workdir),
            prompts=[prompts],
            out=str(out),
        )
    )
    get_run_logger().info(
        "sample: %d images in %s (%d already there)", result.images, out, result.resumed
    )
    return asdict(result)


# ============================================================================ the report
def report_markdown(
    params: RetrainParams,
    dataset: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    report: dict[str, Any],
    registration: dict[str, Any],
    samples: dict[str, Any],
    seconds: dict[str, float],
) -> str:
    decision = registration.get("decision") or {}
    lines = [
        f"# Retraining of `{params.model_name}`",
        "",
        f"Dataset `{dataset['version'][:16]}` ({'reused' if dataset['reused'] else 'ingested'}): "
        f"`{dataset['path']}`",
        "",
        "| stage | run | steps | final loss | seconds | MLflow run |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, r in stages.items():
        loss = r["metrics"].get("loss")
        lines.append(
            f"| {name} | `{r['run_name']}` | {r['step']} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {r['seconds']:.0f} | `{r['mlflow_run_id']}` |"
        )
    lines += ["", "| metric | new | champion before |", "|---|---:|---:|"]
    metric = decision.get("metric")
    for k, v in sorted(report["metrics"].items()):
        base = decision.get("baseline") if k == metric else None
        lines.append(f"| {k} | {v:.4g} | {'' if base is None else f'{base:.4g}'} |")
    lines += [
        "",
        f"**Version {registration['version']}** — aliases {registration['aliases']}; "
        f"promoted: **{registration['promoted']}** ({registration['reason']}).",
        f"Model: `models:/{params.model_name}/{registration['version']}` in "
        f"`{redact(_tracking_uri(params.workdir))}`.",
        "",
        f"Samples: {samples['images']} images in `{samples['out']}` "
        f"(contact sheet `{Path(samples['out']) / 'contact_sheet.png'}`).",
        "",
        "| part | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"


# ============================================================================ the flow
@flow(name="retrain", log_prints=True)
def retrain_flow(
    sources: list[str],
    workdir: str,
    preset: str = "demo",
    overrides: dict[str, dict[str, Any]] | None = None,
    model_name: str = "cascade-diffusion",
    prompts: str | None = None,
    warm_start: bool = False,
    retrain_unchanged: bool = False,
    promote: bool = True,
    evaluation: EvalSettings | None = None,
    sample_count: int = 16,
    eval_fraction: float = 0.02,
) -> RetrainSummary:
    """The whole pipeline (see the module docstring); the parameters are :class:`RetrainParams`
    (``prefect deployment run 'retrain/nightly' -p sources='[...]' -p workdir=...``)."""
    given = dict(
        sources=sources,
        workdir=workdir,
        preset=preset,
        overrides=overrides or {},
        model_name=model_name,
        prompts=prompts,
        warm_start=warm_start,
        retrain_unchanged=retrain_unchanged,
        promote=promote,
        sample_count=sample_count,
        eval_fraction=eval_fraction,
    )
    if evaluation is not None:
        given["evaluation"] = evaluation
    return run_retrain(RetrainParams(**given))


def run_retrain(params: RetrainParams) -> RetrainSummary:
    """The body of :func:`retrain_flow` (call it inside a flow run)."""
    from diffusion_core.training import load_preset

    params = params.model_copy(update={"workdir": absolute(params.workdir)})
    preset = load_preset(params.preset)
    # Ray's and MLflow's own chatter stays out of the run's log: Ray's driver-side lines go to a
    # file (ensure_ray prints where), MLflow's download bars are off
    os.environ.setdefault(RAY_LOG_ENV, str(Path(params.workdir) / "logs" / "ray.log"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    seconds: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        seconds[name] = time.perf_counter() - t0
        print(f"retrain: {name} done in {seconds[name]:.0f} s", flush=True)

    t = time.perf_counter()
    print(f"retrain: ingest {params.sources}", flush=True)
    dataset = dataset_task(
        params, preset.cascade.stages[-1].resolution, preset.cascade.text_encoder or "all-MiniLM-L6-v2"
    )
    step("ingest", t)

    if params.warm_start and dataset["reused"] and not params.retrain_unchanged:
        champion = champion_task(params)
        if champion is not None and champion["dataset_version"] == dataset["version"]:
            return _unchanged(params, dataset, champion, seconds)

    t = time.perf_counter()
    init = warm_start_task(params) if params.warm_start else None
    storage = str(Path(params.workdir) / "runs")
    stage_params = {}
    for name in preset.stage_names:
        overrides = {**params.overrides.get("*", {}), **params.overrides.get(name, {})}
        overrides["storage_path"] = storage
        if init is not None and _same_network(init, preset, name):
            overrides["init_weights"] = init
        cfg = preset.for_stage(name, **overrides)
        stage_params[name] = (overrides, _key(dataset["version"], cfg.model_dump(mode="json")))
    cascade_key = _key(dataset["version"], [k for _, k in stage_params.values()])
    export = str(Path(params.workdir) / "cascades" / cascade_key)
    print(f"retrain: training {preset.stage_names} ({params.preset}) -> {export}", flush=True)
    futures = {
        name: train_stage_task.submit(
            TrainStageParams(
                stage=name,
                data=dataset["path"],
                config=params.preset,
                overrides=overrides,
                export_dir=export,
                run_name=f"{name}-{key}",
            )
        )
        for name, (overrides, key) in stage_params.items()
    }
    stages = {name: f.result() for name, f in futures.items()}
    step("train", t)

    t = time.perf_counter()
    print(f"retrain: evaluate ({params.evaluation.num_samples} held-out samples)", flush=True)
    report = evaluate_task(export, dataset["path"], params.evaluation)
    step("evaluate", t)
    t = time.perf_counter()
    registration = register_task(params, export, dataset["path"], report)
    step("register", t)
    t = time.perf_counter()
    samples = sample_task(params, dataset["path"], registration["version"])
    step("sample", t)

    markdown = report_markdown(params, dataset, stages, report, registration, samples, seconds)
    reports = Path(params.workdir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    report_path = reports / f"retrain-{params.model_name}-v{registration['version']}.md"
    report_path.write_text(markdown)
    create_markdown_artifact(markdown=markdown, key="retrain-report", description="retraining")
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in sorted(report["metrics"].items())],
        key="retrain-metrics",
        description=f"{params.model_name} version {registration['version']}",
    )
    sheet = Path(samples["out"]) / "contact_sheet.png"
    if sheet.is_file():  # image artifacts take a URL only; the sheet is a local file
        create_link_artifact(link=sheet.as_uri(), link_text="contact sheet", key="retrain-samples")
    print(f"retrain: report {report_path}", flush=True)
    return RetrainSummary(
        dataset_version=dataset["version"],
        dataset=dataset["path"],
        model_name=params.model_name,
        model_version=str(registration["version"]),
        promoted=bool(registration["promoted"]),
        reason=registration["reason"],
        metrics=report["metrics"],
        samples=samples["out"],
        report=str(report_path),
    )


def _unchanged(
    params: RetrainParams, dataset: dict[str, Any], champion: dict[str, Any], seconds: dict[str, float]
) -> RetrainSummary:
    """A warm-started run on the dataset the champion was trained on: nothing new to learn, so
    nothing is trained or registered (``retrain_unchanged=true`` trains a refinement anyway)."""
    reason = (
        f"no new data: the champion (version {champion['version']}) was trained on dataset "
        f"{dataset['version'][:16]}; nothing trained (retrain_unchanged=true trains anyway)"
    )
    print(f"retrain: {reason}", flush=True)
    markdown = (
        f"# Retraining of `{params.model_name}`: nothing to do\n\n{reason}.\n\n"
        f"Dataset `{dataset['path']}`; ingest {seconds.get('ingest', 0.0):.0f} s.\n"
    )
    reports = Path(params.workdir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    report_path = reports / f"retrain-{params.model_name}-unchanged-{dataset['version'][:12]}.md"
    report_path.write_text(markdown)
    create_markdown_artifact(markdown=markdown, key="retrain-report", description="retraining")
    return RetrainSummary(
        dataset_version=dataset["version"],
        dataset=dataset["path"],
        model_name=params.model_name,
        model_version=champion["version"],
        promoted=False,
        reason=reason,
        metrics=champion["metrics"],
        samples=str(Path(params.workdir) / "samples" / f"{params.model_name}-v{champion['version']}"),
        report=str(report_path),
    )


def _same_network(cascade_dir: str, preset: Any, stage: str) -> bool:
    """Whether the champion's ``stage`` has the network config this preset trains."""
    from diffusion_core.cascade import CascadeConfig

    path = Path(cascade_dir) / "cascade.json"
    champion = CascadeConfig.model_validate_json(path.read_text())
    theirs = {s.name: s.network for s in champion.stages}
    ours = {s.name: s.network for s in preset.cascade.stages}
    return theirs.get(stage) == ours.get(stage)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(retrain_flow(sources=sys.argv[1:-1], workdir=sys.argv[-1]))
