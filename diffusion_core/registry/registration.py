"""Registration: a cascade folder → a version of the registered model, its lineage, the gate.

:func:`register` evaluates the cascade (or takes a report), logs it as the pyfunc model of
:mod:`diffusion_core.registry.model` with the metrics attached to the LoggedModel, registers a
version tagged with its lineage, moves ``challenger`` to it and ``champion`` if the gate
(:mod:`diffusion_core.registry.gate`) says so. :func:`promote` moves ``champion`` by hand.

Idempotent and restartable, keyed by the cascade's **content hash** (sha256 of the files
``Cascade.load`` reads):

1. a version tagged with the hash and ``registration=complete`` → returned as it is;
2. else a READY LoggedModel with the hash is reused (its files are complete: MLflow marks a
   LoggedModel READY only after the upload), else the model is logged;
3. the version is created from it with every lineage tag in the same request, so a version
   never exists without its files or its lineage; an incomplete version found by its hash is
   completed, with the report stored on it (not evaluated again);
4. the gate's decision is written on the version (``gate.*``), then the aliases are moved, then
   ``registration=complete`` is the last tag: a rerun after an interruption at any point (the
   server gone) finishes the same version.

Credentials: a tracking URI's ``user:password@`` is handed to MLflow through its own variables
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``) and never reaches a tag, a param or
a log line (URIs are shown through :func:`diffusion_core.storage.redact`).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from diffusion_core.cascade import CASCADE_JSON, CascadeConfig, cascade_files
from diffusion_core.cascade import content_hash as cascade_content_hash
from diffusion_core.cascade.fetch import local_cascade
from diffusion_core.data.format import DatasetInfo, read_manifest
from diffusion_core.evaluation.report import EvalReport, EvalSettings
from diffusion_core.registry.gate import GateConfig, GateDecision, decide
from diffusion_core.storage import absolute, is_uri, redact, strip_credentials
from diffusion_core.training.export import TRAINING_JSON

REGISTERED_MODEL = "cascade-diffusion"
EXPERIMENT = "cascade-registry"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_NAME = "cascade"  # the LoggedModel's name (``log_model(name=...)``)
HASH_TAG = "content_hash"
COMPLETE_TAG = "registration"  # "complete": the last tag a registration writes
REPORT_TAG = "eval.report"  # the EvalReport (without per-caption details) as JSON; re-evaluations
# of a champion on other settings add eval.report.<identity key>
HISTORY_TAG = "champion.history"  # on the registered model: every move of champion
HISTORY_KEEP = 50
REPORT_FILE = "eval_report.json"

Evaluator = Callable[[str, str, EvalSettings], EvalReport]
Progress = Callable[[str, str], None]  # (phase, message)


class RegistryError(ValueError):
    """A registration or promotion that cannot be done as asked: what was wrong, what to do."""


class RegistrationResult(BaseModel):
    """What :func:`register` / :func:`promote` did (the CLI prints :meth:`summary` as JSON)."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    reason: str
    status: Literal["registered", "completed", "existing", "promoted", "unchanged"]
    content_hash: str | None = None
    model_uri: str
    model_id: str | None = None
    decision: GateDecision | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-safe dict, the issue's keys first (non-finite numbers become null)."""
        data = self.model_dump(mode="json")
        head = {k: data.pop(k) for k in ("name", "version", "aliases", "promoted", "reason")}
        return _json_safe({**head, **data})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ============================================================================ the cascade folder


def model_files(cascade_dir: str | Path) -> list[str]:
    """The files of the cascade that a version holds (:func:`diffusion_core.cascade.cascade_files`)."""
    try:
        return cascade_files(cascade_dir)
    except (ValueError, FileNotFoundError) as e:
        raise RegistryError(str(e)) from e


def content_hash(cascade_dir: str | Path) -> str:
    """The cascade's content hash (:func:`diffusion_core.cascade.content_hash`): a registration's
    identity."""
    model_files(cascade_dir)  # the registry's error for a folder that is not a cascade
    return cascade_content_hash(cascade_dir)


def read_training(cascade_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-stage lineage from ``training.json`` (written by the export; {} when absent)."""
    path = Path(cascade_dir) / TRAINING_JSON
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("stages") or {})
    except (ValueError, AttributeError) as e:
        raise RegistryError(f"{path} cannot be read: {e}") from e


def _stage_files(cascade_dir: Path, out: Path) -> Path:
    """Copy the model files (and training.json) into ``out``: the model's ``cascade`` artifact."""
    for rel in model_files(cascade_dir):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cascade_dir / rel, out / rel)
    if (cascade_dir / TRAINING_JSON).is_file():
        shutil.copy2(cascade_dir / TRAINING_JSON, out / TRAINING_JSON)
    return out


# ============================================================================ lineage


def lineage_tags(
    cascade_dir: str | Path,
    data: DatasetInfo,
    report: EvalReport,
    *,
    digest: str,
    flow_run_id: str | None = None,
) -> dict[str, str]:
    """Every tag a new version carries: content hash, dataset, code, training runs, metrics."""
    from diffusion_core.training.tracking import git_commit

    config = CascadeConfig.model_validate_json((Path(cascade_dir) / CASCADE_JSON).read_text())
    tags = {
        HASH_TAG: digest,
        "dataset_version": data.version,
        "dataset_path": redact(absolute(data.path)) or "",
        "cascade.stages": ",".join(f"{s.name}:{s.resolution}px" for s in config.stages),
        "cascade.resolution": str(config.stages[-1].resolution),
        "cascade.text_encoder": str(config.text_encoder),
        "eval.identity": json.dumps(report.identity, sort_keys=True),
        REPORT_TAG: report.model_dump_json(exclude={"details"}),
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if flow_run_id:
        tags["prefect.flow_run_id"] = str(flow_run_id)
    for key, value in sorted(report.metrics.items()):
        tags[f"metric.{key}"] = repr(float(value))
    training = read_training(cascade_dir)
    for stage in config.stages:
        info = training.get(stage.name, {})
        for key in ("run_name", "mlflow_run_id", "dataset_version", "step"):
            if info.get(key) is not None:
                tags[f"training.{stage.name}.{key}"] = str(info[key])
    trained_on = {s: i["dataset_version"] for s, i in training.items() if i.get("dataset_version")}
    if any(v != data.version for v in trained_on.values()):
        tags["lineage.warning"] = (
            f"stages trained on other datasets than the evaluation's {data.version[:16]}: "
            + ", ".join(f"{s} {v[:16]}" for s, v in sorted(trained_on.items()))
        )
    if not training:
        tags["lineage.warning"] = f"no {TRAINING_JSON} in the cascade folder: training unknown"
    return tags


# ============================================================================ MLflow plumbing


def resolve_tracking_uri(tracking_uri: str | None, cascade_dir: str | Path | None = None) -> str:
    """Where to register: the argument, else ``$MLFLOW_TRACKING_URI``, else the local sqlite
    store the stages were trained in (from ``training.json``, when it exists), else MLflow's
    default (``sqlite:///mlflow.db`` in the working directory)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cascade_dir is not None:
        uris = {i.get("tracking_uri") for i in read_training(cascade_dir).values()}
        if len(uris) == 1:
            uri = uris.pop()
            if isinstance(uri, str) and uri.startswith("sqlite:///"):
                if Path(uri.removeprefix("sqlite:///")).is_file():
                    return uri
    import mlflow

    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def _mlflow_at(tracking_uri: str) -> Iterator[str]:
    """Point MLflow's fluent API at ``tracking_uri`` (credentials in its own variables) for the
    duration; yields the URI without credentials."""
    import mlflow

    clean, user, password = strip_credentials(tracking_uri)
    saved_env = {
        k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    if user and password:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if clean.startswith("sqlite:///"):
        Path(clean.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_registry = mlflow.get_registry_uri() if previous else None
    mlflow.set_tracking_uri(clean)
    mlflow.set_registry_uri(clean)
    try:
        yield clean
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]
        mlflow.set_registry_uri(previous_registry)  # type: ignore[arg-type]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    from diffusion_core.training.tracking import artifact_location

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def _version_by_hash(client: Any, name: str, digest: str) -> Any | None:
    """The oldest version of ``name`` tagged with ``digest`` (None when there is none)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    found = client.search_model_versions(f"name = '{name}' and tags.{HASH_TAG} = '{digest}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _ready_logged_model(experiment_id: str, digest: str) -> Any | None:
    """A READY LoggedModel of this content (its upload finished), the newest first."""
    import mlflow

    models = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.{HASH_TAG} = '{digest}'",
        output_format="list",
    )
    ready = [m for m in models if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    return max(ready, key=lambda m: m.creation_timestamp) if ready else None


def _aliases_of(client: Any, name: str, version: str) -> list[str]:
    # search_model_versions returns aliases=[] in MLflow 3.17: read them off the registered model
    aliases = client.get_registered_model(name).aliases
    return sorted(a for a, v in aliases.items() if str(v) == str(version))


def identity_key(report: EvalReport) -> str:
    """A short name of a report's identity (what it was measured on)."""
    raw = json.dumps(report.identity, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _champion(
    client: Any, name: str, candidate: EvalReport
) -> tuple[str | None, EvalReport | None]:
    """The champion's version and its report measured like ``candidate`` (its registration
    report, or a re-evaluation stored as ``eval.report.<identity>``), else its registration's."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None, None
    tags = client.get_model_version(name, str(version)).tags
    raw = tags.get(f"{REPORT_TAG}.{identity_key(candidate)}") or tags.get(REPORT_TAG)
    return str(version), (EvalReport.model_validate_json(raw) if raw else None)


def _model_id(mv: Any) -> str | None:
    # ModelVersion.model_id is None in 3.17: parse it from the source "models:/m-..."
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = str(mv.source or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _dataset(data: DatasetInfo) -> Any:
    """The dataset as an MLflow dataset: metadata only (its location, name and version)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    path = redact(absolute(data.path)) or data.path
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(path)
    except Exception:  # noqa: BLE001 - a scheme MLflow has no source for
        source = HTTPDatasetSource(path)
    # the digest column holds 36 characters: the first 36 of the dataset version (sha256 hex)
    return MetaDataset(source, name=f"cascade-data-{data.version[:12]}", digest=data.version[:36])


def _default_evaluator() -> Evaluator | None:
    """``diffusion_core.evaluation.evaluate`` when it is installed (None otherwise)."""
    try:
        from diffusion_core.evaluation import evaluate  # type: ignore[attr-defined]
    except ImportError:
        return None
    return evaluate


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ============================================================================ register


def register(
    cascade_dir: str | Path,
    data_dir: str | Path,
    *,
    name: str = REGISTERED_MODEL,
    report: EvalReport | None = None,
    settings: EvalSettings | None = None,
    promote: bool = True,
    gate: GateConfig | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    flow_run_id: str | None = None,
    evaluator: Evaluator | None = None,
    reevaluate_champion: bool = True,
    progress: Progress | None = None,
) -> RegistrationResult:
    """Register the cascade in ``cascade_dir`` as a new version of ``name`` (see the module
    docstring). ``report``: its evaluation on ``data_dir`` (else ``evaluator`` runs, by default
    :func:`diffusion_core.evaluation.evaluate` with ``settings``). ``promote=False`` registers
    without moving ``champion``. ``reevaluate_champion``: when the champion's report was measured
    differently (another identity), evaluate the champion on the candidate's settings and data.
    """
    from mlflow.tracking import MlflowClient

    say = progress or (lambda phase, message: None)
    gate = gate or GateConfig()
    if not name or "'" in name or '"' in name:
        raise RegistryError(f"model name {name!r}: give a non-empty name without quotes")
    source = str(cascade_dir)
    try:  # a folder on an object store (s3://...) is fetched into the verified local cache
        cascade_dir = local_cascade(cascade_dir).resolve()
    except (ValueError, FileNotFoundError) as e:
        raise RegistryError(str(e)) from e
    if source != str(cascade_dir) and is_uri(source):
        say("fetch", f"{redact(source)} is cached at {cascade_dir}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    digest = content_hash(cascade_dir)
    data = read_manifest(str(data_dir))
    evaluator = evaluator or _default_evaluator()
    uri = resolve_tracking_uri(tracking_uri, cascade_dir)
    say("start", f"registering {cascade_dir} (content {digest[:12]}) as {name!r} in {redact(uri)}")
    with _mlflow_at(uri) as clean_uri:
        client = MlflowClient(clean_uri, registry_uri=clean_uri)
        mv = _version_by_hash(client, name, digest)
        if mv is not None and mv.tags.get(COMPLETE_TAG) == "complete":
            say("existing", f"content {digest[:12]} is already version {mv.version} of {name!r}")
            return _existing(client, name, mv, digest)
        status: Literal["registered", "completed"] = "registered" if mv is None else "completed"
        _close_interrupted_runs(client, experiment, digest)
        if mv is not None:  # an interrupted registration: finish it with what it stored
            say("resume", f"completing the interrupted registration of version {mv.version}")
            report = EvalReport.model_validate_json(mv.tags[REPORT_TAG])
        if report is None:
            if evaluator is None:
                raise RegistryError(
                    "diffusion_core.evaluation is not available to evaluate the cascade: pass "
                    "an evaluation report (--metrics FILE, written by `cascade evaluate --out`)"
                )
            say("evaluate", f"evaluating on {redact(str(data_dir))}")
            t = time.perf_counter()
            report = evaluator(str(cascade_dir), str(data_dir), settings or EvalSettings())
            seconds["evaluate"] = time.perf_counter() - t
        if report.dataset_version != data.version:
            raise RegistryError(
                f"the report was measured on dataset {report.dataset_version[:16]} but --data "
                f"{data.path} is dataset {data.version[:16]}: pass the data it was evaluated on"
            )
        if mv is None:
            t = time.perf_counter()
            mv = _new_version(
                client,
                name=name,
                experiment=experiment,
                cascade_dir=cascade_dir,
                data=data,
                report=report,
                digest=digest,
                flow_run_id=flow_run_id,
                tracking_uri=clean_uri,
                say=say,
            )
            seconds["log_and_register"] = time.perf_counter() - t
        version = str(mv.version)
        decision = _stored_decision(mv) or _gate(
            client,
            name=name,
            version=version,
            report=report,
            gate=gate,
            promote=promote,
            data=data,
            evaluator=evaluator,
            reevaluate=reevaluate_champion,
            say=say,
        )
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        if decision.promote:
            _move_champion(client, name, version, by="gate", reason=decision.reason)
        client.set_model_version_tag(name, version, COMPLETE_TAG, "complete")
        seconds["total"] = time.perf_counter() - t0
        say("done", f"version {version}: {decision.decision}: {decision.reason}")
        return RegistrationResult(
            name=name,
            version=version,
            aliases=_aliases_of(client, name, version),
            promoted=decision.promote,
            reason=decision.reason,
            status=status,
            content_hash=digest,
            model_uri=f"models:/{name}/{version}",
            model_id=_model_id(mv),
            decision=decision,
            metrics=report.metrics,
            seconds=seconds,
        )


def _close_interrupted_runs(client: Any, experiment: str, digest: str) -> None:
    """Mark FAILED the registration runs of this content an interruption left RUNNING."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    query = f"tags.{HASH_TAG} = '{digest}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([exp.experiment_id], query):
        client.set_terminated(run.info.run_id, status="FAILED")


def _existing(client: Any, name: str, mv: Any, digest: str) -> RegistrationResult:
    raw = mv.tags.get(REPORT_TAG)
    return RegistrationResult(
        name=name,
        version=str(mv.version),
        aliases=_aliases_of(client, name, mv.version),
        promoted=False,
        reason=f"already registered: version {mv.version} holds this content ({digest[:12]}); "
        f"its gate decision was {mv.tags.get('gate.decision')!r}",
        status="existing",
        content_hash=digest,
        model_uri=f"models:/{name}/{mv.version}",
        model_id=_model_id(mv),
        decision=_stored_decision(mv),
        metrics=EvalReport.model_validate_json(raw).metrics if raw else {},
    )


def _stored_decision(mv: Any) -> GateDecision | None:
    """The gate decision an interrupted registration already wrote on the version."""
    tags = mv.tags
    if "gate.decision" not in tags:
        return None

    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    return GateDecision(
        promote=tags.get("gate.promoted") == "true",
        decision=tags["gate.decision"],
        reason=tags.get("gate.reason", ""),
        metric=tags.get("gate.metric", ""),
        candidate=number("gate.candidate"),
        baseline=number("gate.baseline"),
        baseline_version=tags.get("gate.baseline_version"),
    )


def _new_version(
    client: Any,
    *,
    name: str,
    experiment: str,
    cascade_dir: Path,
    data: DatasetInfo,
    report: EvalReport,
    digest: str,
    flow_run_id: str | None,
    tracking_uri: str,
    say: Progress,
) -> Any:
    """Log the model (or reuse a READY one of this content) and register a version of it."""
    import mlflow


    exp_id = _experiment_id(client, experiment, tracking_uri)
    dataset = _dataset(data)
    config = CascadeConfig.model_validate_json((cascade_dir / CASCADE_JSON).read_text())
    tags = lineage_tags(cascade_dir, data, report, digest=digest, flow_run_id=flow_run_id)
    run_tags = {
        "mlflow.runName": f"register-{digest[:12]}",
        HASH_TAG: digest,
        "registered_model": name,
        "dataset_version": data.version,
        **({"prefect.flow_run_id": str(flow_run_id)} if flow_run_id else {}),
    }
    run = client.create_run(exp_id, run_name=run_tags["mlflow.runName"], tags=run_tags)
    run_id = run.info.run_id
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_input(dataset, context="evaluation")
            mlflow.log_params(
                {f"eval.{k}": v for k, v in report.settings.model_dump(mode="json").items()}
            )
            logged = _ready_logged_model(exp_id, digest)
            if logged is not None:
                say("reuse", f"reusing the uploaded model {logged.model_id} of this content")
                model_id = logged.model_id
                if not logged.metrics:
                    mlflow.log_metrics(report.metrics, model_id=model_id, dataset=dataset)
            else:
                with tempfile.TemporaryDirectory(prefix="cascade-register-") as tmp:
                    files = _stage_files(cascade_dir, Path(tmp) / "cascade")
                    (Path(tmp) / REPORT_FILE).write_text(report.model_dump_json(indent=2))
                    size = sum(p.stat().st_size for p in files.rglob("*") if p.is_file())
                    say("log", f"logging the model ({size / 2**20:.1f} MiB of cascade files)")
                    with warnings.catch_warnings():
                        # the signature is explicit (the diffusers convention); MLflow still
                        # suggests type hints and an input example on every log
                        warnings.filterwarnings("ignore", message=".*type hints.*")
                        warnings.filterwarnings("ignore", message=".*input example.*")
                        info = _log_pyfunc(config, files, Path(tmp) / REPORT_FILE, digest, data)
                model_id = info.model_id
                mlflow.log_metrics(report.metrics, model_id=model_id, dataset=dataset)
            say("logged", f"model {model_id} is uploaded")
            say("version", f"registering a version of {name!r}")
            mv = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
            say("registered", f"version {mv.version} of {name!r} created")
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        with contextlib.suppress(Exception):  # the server may be what failed
            client.set_terminated(run_id, status="FAILED")
        raise
    return client.get_model_version(name, str(mv.version))


def _gate(
    client: Any,
    *,
    name: str,
    version: str,
    report: EvalReport,
    gate: GateConfig,
    promote: bool,
    data: DatasetInfo,
    evaluator: Evaluator | None,
    reevaluate: bool,
    say: Progress,
) -> GateDecision:
    champ_version, champ_report = _champion(client, name, report)
    if champ_version == version:  # cannot happen for a new version; be safe
        champ_version, champ_report = None, None
    decision = decide(report, champ_report, gate, champion_version=champ_version)
    if decision.decision == "not_comparable" and champ_version is not None:
        decision = _reevaluated(
            client,
            name=name,
            champ_version=champ_version,
            report=report,
            refused=decision,
            gate=gate,
            data=data,
            evaluator=evaluator,
            reevaluate=reevaluate,
            say=say,
        )
    if decision.promote and not promote:
        decision = decision.model_copy(
            update={
                "promote": False,
                "decision": "held",
                "reason": f"not promoted (--no-promote); the gate said: {decision.reason}",
            }
        )
    return decision


def _reevaluated(
    client: Any,
    *,
    name: str,
    champ_version: str,
    report: EvalReport,
    refused: GateDecision,
    gate: GateConfig,
    data: DatasetInfo,
    evaluator: Evaluator | None,
    reevaluate: bool,
    say: Progress,
) -> GateDecision:
    """Evaluate the champion on the candidate's data and settings, then decide again."""
    import mlflow

    if not reevaluate or evaluator is None:
        why = "not asked for" if not reevaluate else "diffusion_core.evaluation is not available"
        return refused.model_copy(
            update={"reason": f"{refused.reason}; not re-evaluating the champion ({why})"}
        )
    say("reevaluate", f"evaluating champion v{champ_version} on the candidate's settings")
    try:
        with tempfile.TemporaryDirectory(prefix="cascade-champion-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                f"models:/{name}/{champ_version}", dst_path=tmp
            )
            cascade = _cascade_artifact(Path(local))
            champ = evaluator(str(cascade), data.path, report.settings)
    except Exception as e:  # noqa: BLE001 - the candidate's registration goes on, refused
        return refused.model_copy(
            update={"reason": f"{refused.reason}; re-evaluating the champion failed: {e}"}
        )
    decision = decide(report, champ, gate, champion_version=champ_version)
    model_id = _model_id(client.get_model_version(name, champ_version))
    if model_id:
        _log_model_metrics(
            client, model_id, champ, _dataset(data), run_name=f"reevaluate-v{champ_version}"
        )
    client.set_model_version_tag(
        name,
        champ_version,
        f"{REPORT_TAG}.{identity_key(champ)}",
        champ.model_dump_json(exclude={"details"}),
    )
    return decision.model_copy(
        update={"reason": f"{decision.reason} (champion re-evaluated on the candidate's settings)"}
    )


def _log_model_metrics(
    client: Any, model_id: str, report: EvalReport, dataset: Any, *, run_name: str
) -> str:
    """Log a report's metrics on a LoggedModel (with the dataset) from a run of its own."""
    from mlflow.entities import DatasetInput, InputTag, Metric

    exp_id = client.get_logged_model(model_id).experiment_id
    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    context = InputTag(key="mlflow.data.context", value="evaluation")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [context])])
    ts = int(time.time() * 1000)
    metrics = [
        Metric(
            k,
            float(v),
            ts,
            0,
            model_id=model_id,
            dataset_name=dataset.name,
            dataset_digest=dataset.digest,
        )
        for k, v in report.metrics.items()
    ]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _cascade_artifact(model_dir: Path) -> Path:
    """The cascade folder inside a downloaded model (from its MLmodel's artifact map)."""
    from mlflow.models import Model

    from diffusion_core.registry.model import CASCADE_ARTIFACT

    flavor = Model.load(str(model_dir)).flavors["python_function"]
    return model_dir / flavor["artifacts"][CASCADE_ARTIFACT]["path"]


# ============================================================================ champion moves


def _move_champion(client: Any, name: str, version: str, *, by: str, reason: str) -> str | None:
    """Point ``champion`` at ``version`` and record the move on both versions and the model."""
    previous = client.get_registered_model(name).aliases.get(CHAMPION)
    previous = None if previous is None else str(previous)
    if previous == version:  # already moved (a completed interrupted registration)
        return previous
    at = _now()
    record = {"champion.since": at, "champion.by": by, "champion.reason": reason}
    if previous and previous != version:
        record["champion.previous"] = previous
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous and previous != version:
        client.set_model_version_tag(name, previous, "champion.replaced_by", version)
        client.set_model_version_tag(name, previous, "champion.replaced_at", at)
    rm = client.get_registered_model(name)
    history = json.loads(rm.tags.get(HISTORY_TAG, "[]"))
    history.append({"version": version, "previous": previous, "by": by, "reason": reason, "at": at})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
    return previous


def promote(
    name: str,
    version: str | int,
    reason: str,
    *,
    tracking_uri: str | None = None,
    actor: str | None = None,
) -> RegistrationResult:
    """Move ``champion`` to ``version`` by hand (a rollback, an override), with the reason
    recorded on the version (``champion.*`` tags) and in the model's ``champion.history``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    version = str(version)
    if not reason or not reason.strip():
        raise RegistryError("a manual promotion needs a --reason (it is recorded on the version)")
    uri = resolve_tracking_uri(tracking_uri)
    with _mlflow_at(uri) as clean_uri:
        client = MlflowClient(clean_uri, registry_uri=clean_uri)
        try:
            mv = client.get_model_version(name, version)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(
                    f"no version {version} of {name!r} in {redact(uri)}: check --name/--version"
                ) from None
            raise
        if mv.tags.get(COMPLETE_TAG) != "complete":
            raise RegistryError(
                f"version {version} of {name!r} did not finish registering; rerun `cascade "
                "register` on its cascade to complete it before promoting it"
            )
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        common = {
            "name": name,
            "version": version,
            "content_hash": mv.tags.get(HASH_TAG),
            "model_uri": f"models:/{name}/{version}",
            "model_id": _model_id(mv),
        }
        if current is not None and str(current) == version:
            return RegistrationResult(
                **common,
                aliases=_aliases_of(client, name, version),
                promoted=False,
                reason=f"version {version} is already the champion",
                status="unchanged",
            )
        by = f"manual:{actor or getpass.getuser()}"
        previous = _move_champion(client, name, version, by=by, reason=reason.strip())
        return RegistrationResult(
            **common,
            aliases=_aliases_of(client, name, version),
            promoted=True,
            reason=f"{reason.strip()} (by {by}; champion was v{previous})"
            if previous
            else f"{reason.strip()} (by {by}; there was no champion)",
            status="promoted",
        )


def _log_pyfunc(config: CascadeConfig, files: Path, report_file: Path, digest: str, data: DatasetInfo):
    """``mlflow.pyfunc.log_model`` of the staged cascade folder (models from code: no pickle)."""
    import mlflow

    from diffusion_core.registry import model as pyfunc_model

    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=pyfunc_model.__file__,
        artifacts={pyfunc_model.CASCADE_ARTIFACT: str(files), "eval_report": str(report_file)},
        signature=pyfunc_model.signature(),
        pip_requirements=pyfunc_model.pip_requirements(config.text_encoder),
        model_config=dict(pyfunc_model.DEFAULT_CONFIG),
        metadata={
            HASH_TAG: digest,
            "resolution": config.stages[-1].resolution,
            "stages": [s.name for s in config.stages],
            "text_encoder": config.text_encoder,
        },
        tags={HASH_TAG: digest, "dataset_version": data.version},
    )


def champion_lineage(name: str, tracking_uri: str) -> dict[str, Any] | None:
    """The champion's version, the dataset version it was trained on and its metrics (from its
    lineage tags); None when the model or its champion does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with _mlflow_at(tracking_uri) as clean:
        client = MlflowClient(clean)
        try:
            version = client.get_registered_model(name).aliases.get(CHAMPION)
            if version is None:
                return None
            tags = client.get_model_version(name, str(version)).tags
        except MlflowException:  # no such model yet
            return None
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    return {"version": str(version), "dataset_version": tags.get("dataset_version"), "metrics": metrics}
