"""The promotion gate: does a candidate's evaluation beat the champion's? A pure decision.

Two :class:`~diffusion_core.evaluation.report.EvalReport` are compared only when they share
their :attr:`~diffusion_core.evaluation.report.EvalReport.identity` (dataset version, split,
sample count, sampler settings, seed): KID or FID measured on other data or another sample count
are different numbers, not better or worse ones. The comparison itself is MLflow's
(:class:`mlflow.models.MetricThreshold` + :func:`mlflow.validate_evaluation_results`), with a
strict improvement required by default (a tie keeps the champion).

What the registration does with a report of another identity (re-evaluate the champion on the
candidate's settings, or refuse) lives in :mod:`diffusion_core.registry.registration`; here an
identity mismatch is the decision ``not_comparable``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.evaluation.report import EvalReport

# The smallest improvement that counts when the gate names none: more than float noise.
STRICT = 1e-12

Decision = Literal[
    "first",  # no champion yet; the candidate's metrics are finite
    "better",  # beats the champion
    "worse",  # does not beat it (ties included)
    "not_finite",  # the candidate has a missing or non-finite metric
    "not_comparable",  # evaluated on something else than the champion (identity differs)
    "held",  # promotion not asked for (--no-promote)
    "manual",  # moved by `cascade promote`
]


class GateConfig(BaseModel):
    """Which metric decides and by how much the candidate must beat the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field("kid", description="the gate metric (a key of EvalReport.metrics)")
    greater_is_better: bool = Field(False, description="False for kid, fid, nll")
    min_absolute_change: float | None = Field(
        None, gt=0, description="beat the champion by at least this much (default: any amount)"
    )
    min_relative_change: float | None = Field(
        None, ge=0, le=1, description="... or by this fraction of the champion's value"
    )
    threshold: float | None = Field(
        None, description="an absolute bound the candidate must meet (<= when lower is better)"
    )

    def thresholds(self, with_baseline: bool) -> dict[str, Any]:
        """MLflow's :class:`MetricThreshold` for the gate metric (None: nothing to check)."""
        from mlflow.models import MetricThreshold

        change = {}
        if with_baseline:
            change = {
                "min_absolute_change": self.min_absolute_change,
                "min_relative_change": self.min_relative_change,
            }
            if self.min_absolute_change is None and self.min_relative_change is None:
                change["min_absolute_change"] = STRICT
        if self.threshold is None and not any(v is not None for v in change.values()):
            return {}
        return {
            self.metric: MetricThreshold(
                threshold=self.threshold, greater_is_better=self.greater_is_better, **change
            )
        }


class GateDecision(BaseModel):
    """The gate's verdict and the numbers behind it (written on the version as tags)."""

    promote: bool
    decision: Decision
    reason: str
    metric: str
    candidate: float | None = None
    baseline: float | None = None
    baseline_version: str | None = None
    identity_diff: dict[str, list[Any]] = Field(
        default_factory=dict, description="field: [candidate, champion] where they differ"
    )
    validation: str | None = Field(None, description="MLflow's validation message, if it failed")

    def tags(self) -> dict[str, str]:
        """``gate.*`` tags for the model version."""
        out = {
            "gate.decision": self.decision,
            "gate.promoted": str(self.promote).lower(),
            "gate.reason": self.reason,
            "gate.metric": self.metric,
        }
        for key in ("candidate", "baseline", "baseline_version"):
            value = getattr(self, key)
            if value is not None:
                out[f"gate.{key}"] = repr(value) if isinstance(value, float) else str(value)
        return out


def identity_diff(candidate: EvalReport, champion: EvalReport) -> dict[str, list[Any]]:
    """The identity fields where two reports differ: ``{field: [candidate, champion]}``."""
    a, b = candidate.identity, champion.identity
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def non_finite(report: EvalReport) -> list[str]:
    """Names of the report's metrics that are NaN or infinite."""
    return sorted(k for k, v in report.metrics.items() if not math.isfinite(v))


def decide(
    candidate: EvalReport,
    champion: EvalReport | None,
    gate: GateConfig | None = None,
    *,
    champion_version: str | None = None,
) -> GateDecision:
    """Whether ``candidate`` should become champion over ``champion`` (None: there is none)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models.evaluation import EvaluationResult

    gate = gate or GateConfig()
    m = gate.metric
    value = candidate.metrics.get(m)
    base = {"metric": m, "candidate": value, "baseline_version": champion_version}
    bad = non_finite(candidate)
    if value is None or bad:
        missing = f"has no {m!r} metric" if value is None else f"has non-finite {bad}"
        return GateDecision(
            promote=False, decision="not_finite", reason=f"the candidate {missing}", **base
        )
    if champion is not None:
        diff = identity_diff(candidate, champion)
        base_value = champion.metrics.get(m)
        if diff or base_value is None or not math.isfinite(base_value):
            if diff:
                changes = ", ".join(f"{k} {c!r} vs {h!r}" for k, (c, h) in diff.items())
                why = f"it was evaluated differently ({changes})"
            else:
                why = f"it has no finite {m!r} ({base_value!r})"
            return GateDecision(
                promote=False,
                decision="not_comparable",
                reason=f"cannot compare with champion v{champion_version}: {why}",
                baseline=base_value,
                identity_diff=diff,
                **base,
            )
        base["baseline"] = base_value
    thresholds = gate.thresholds(with_baseline=champion is not None)
    op = ">" if gate.greater_is_better else "<"
    if thresholds:
        try:
            import mlflow

            mlflow.validate_evaluation_results(
                thresholds,
                EvaluationResult(candidate.metrics, {}, run_id=""),
                EvaluationResult(champion.metrics, {}, run_id="") if champion else None,
            )
        except MlflowException as e:  # ModelValidationFailedException
            if champion is not None:
                against = f"{base['baseline']:.6g} of champion v{champion_version}"
            else:
                against = "the gate's threshold"
            return GateDecision(
                promote=False,
                decision="worse",
                reason=f"{m} {value:.6g} does not beat {against} "
                f"({_numbers(gate, base.get('baseline'))})",
                validation=e.message,
                **base,
            )
    if champion is None:
        return GateDecision(
            promote=True,
            decision="first",
            reason=f"first version with finite metrics ({m} {value:.6g})",
            **base,
        )
    return GateDecision(
        promote=True,
        decision="better",
        reason=f"{m} {value:.6g} {op} {base['baseline']:.6g} of champion v{champion_version} "
        f"on the same evaluation ({_numbers(gate, base['baseline'])})",
        **base,
    )


def _numbers(gate: GateConfig, baseline: float | None) -> str:
    parts = [f"{'higher' if gate.greater_is_better else 'lower'} is better"]
    if baseline is not None:
        if gate.min_absolute_change is not None:
            parts.append(f"by at least {gate.min_absolute_change:g}")
        if gate.min_relative_change is not None:
            parts.append(f"by at least {gate.min_relative_change:.0%}")
    if gate.threshold is not None:
        parts.append(f"threshold {gate.threshold:g}")
    return ", ".join(parts)
