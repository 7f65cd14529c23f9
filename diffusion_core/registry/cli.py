"""``cascade register`` and ``cascade promote`` (registered in :mod:`diffusion_core.cli`).

Progress goes to stderr; the last line on stdout is one JSON object with ``name``, ``version``,
``aliases``, ``promoted``, ``reason`` (and the rest of :class:`RegistrationResult`). Exit codes:
0 done (a refused promotion included: the version is registered), 2 a bad input (no cascade,
a report of other data, an unknown version), 1 a failure (the tracking server unreachable, ...;
a rerun completes an interrupted registration).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

HIGHER_IS_BETTER = {"faithfulness"}  # EvalReport: lower is better for kid, fid and nll_*


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def register_command(
    cascade: str = typer.Option(
        ...,
        "--cascade",
        help="Cascade folder (cascade.json + stages/, as `cascade train` exports), local or "
        "s3://bucket/prefix (fetched into $CASCADE_MODEL_CACHE).",
    ),
    data: Path = typer.Option(
        ..., "--data", help="Dataset folder (manifest.json) the cascade is evaluated on."
    ),
    name: str = typer.Option("cascade-diffusion", "--name", help="Registered model name."),
    metrics: Path = typer.Option(
        None,
        "--metrics",
        help="An evaluation report (EvalReport JSON, `cascade evaluate --out`) instead of "
        "evaluating here.",
    ),
    promote: bool = typer.Option(
        True, "--promote/--no-promote", help="Move `champion` when the gate passes."
    ),
    samples: int = typer.Option(
        None, "--samples", help="Held-out samples when evaluating here (EvalSettings default)."
    ),
    gate_metric: str = typer.Option("kid", "--gate-metric", help="The metric the gate compares."),
    min_change: float = typer.Option(
        None, "--min-change", help="Beat the champion by at least this much (default: any)."
    ),
    reevaluate: bool = typer.Option(
        True,
        "--reevaluate/--no-reevaluate",
        help="Evaluate the champion on the candidate's settings when its report differs.",
    ),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the training "
        "store named in the cascade's training.json, else sqlite:///mlflow.db).",
    ),
    experiment: str = typer.Option(
        "cascade-registry", "--experiment", help="MLflow experiment of the registration runs."
    ),
    flow_run_id: str = typer.Option(
        None,
        "--flow-run-id",
        help="Prefect flow-run id for the lineage (default: $PREFECT__FLOW_RUN_ID when set).",
    ),
) -> None:
    """Evaluate a cascade (or read --metrics), log it as an MLflow pyfunc model, register a new
    version tagged with its lineage, move `challenger` to it and `champion` if it beats the
    current champion on the gate metric. Registering the same content again returns the
    existing version; a rerun completes an interrupted registration."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from diffusion_core.data.format import DataError
    from diffusion_core.evaluation.report import EvalReport, EvalSettings
    from diffusion_core.registry.gate import GateConfig
    from diffusion_core.registry.registration import RegistryError, register

    try:
        report = EvalReport.model_validate_json(metrics.read_text()) if metrics else None
        gate = GateConfig(
            metric=gate_metric,
            greater_is_better=gate_metric in HIGHER_IS_BETTER,
            min_absolute_change=min_change,
        )
        settings = EvalSettings(num_samples=samples) if samples else None
    except (OSError, ValidationError) as e:
        raise _fail(f"bad option: {e}", 2) from None
    try:
        result = register(
            cascade,
            data,
            name=name,
            report=report,
            settings=settings,
            promote=promote,
            gate=gate,
            tracking_uri=tracking_uri,
            experiment=experiment,
            flow_run_id=flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID"),
            reevaluate_champion=reevaluate,
            progress=lambda phase, message: typer.echo(f"register: {message}", err=True),
        )
    except (RegistryError, DataError) as e:
        raise _fail(str(e), 2) from None
    except (MlflowException, OSError) as e:
        raise _fail(f"registration failed (rerun to complete it): {e}", 1) from None
    typer.echo(json.dumps(result.summary()))


def promote_command(
    name: str = typer.Option("cascade-diffusion", "--name", help="Registered model name."),
    version: str = typer.Option(..., "--version", help="The version to make `champion`."),
    reason: str = typer.Option(
        ..., "--reason", help="Why (recorded on the version and in champion.history)."
    ),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI)."
    ),
) -> None:
    """Move `champion` to a version by hand (a rollback or an override), recorded with the
    reason, who and when; the last line is the same JSON object as `cascade register`'s."""
    from mlflow.exceptions import MlflowException

    from diffusion_core.registry.registration import RegistryError, promote

    try:
        result = promote(name, version, reason, tracking_uri=tracking_uri)
    except RegistryError as e:
        raise _fail(str(e), 2) from None
    except (MlflowException, OSError) as e:
        raise _fail(f"promotion failed: {e}", 1) from None
    typer.echo(json.dumps(result.summary()))
