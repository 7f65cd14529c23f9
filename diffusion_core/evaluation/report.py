"""What an evaluation of a cascade says: the metrics, and exactly what they were measured on.

The registry's gate compares two cascades only on the same :attr:`EvalReport.identity`: the
same dataset version, split, sample count, sampler settings and seed (``docs/evaluation.md``).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.cascade.config import DEFAULT_SAMPLER, DEFAULT_STEPS


class EvalSettings(BaseModel):
    """How a cascade is evaluated (a CLI / Prefect / MLflow boundary object)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_samples: int = Field(64, ge=2, description="held-out captions sampled (and real images)")
    sampler: str = Field(DEFAULT_SAMPLER, description="sampler of every stage")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="network calls per stage")
    guidance_scale: float = Field(3.0, ge=0.0, description="classifier-free guidance weight")
    seed: int = Field(0, ge=0, description="seed of the first image (image i uses seed + i)")
    batch_size: int = Field(16, ge=1, description="images sampled per batch")
    nll_samples: int = Field(
        16, ge=1, description="held-out images the NLL bound is computed on (T steps per image)"
    )
    metrics: tuple[str, ...] = Field(
        ("kid", "fid", "nll", "faithfulness"),
        description="which metrics to compute (faithfulness only for the built-in shapes data)",
    )


class EvalReport(BaseModel):
    """The result of :func:`diffusion_core.evaluation.evaluate` (written as JSON by
    ``cascade evaluate --out``, read by ``cascade register --metrics``)."""

    model_config = ConfigDict(extra="forbid")

    dataset_version: str
    split: str = "eval"
    settings: EvalSettings
    metrics: dict[str, float] = Field(
        description="e.g. kid, kid_std, fid, nll_bpd_<stage>, faithfulness; lower is better for "
        "kid, fid and nll, higher for faithfulness"
    )
    seconds: dict[str, float] = Field(default_factory=dict, description="time of each part")
    details: dict[str, Any] = Field(default_factory=dict, description="per-caption rows etc.")

    @property
    def identity(self) -> dict[str, Any]:
        """What two reports must share to be compared (gate): data, split and settings."""
        s = self.settings.model_dump(mode="json", exclude={"batch_size", "metrics"})
        return {"dataset_version": self.dataset_version, "split": self.split, **s}

    def finite(self, name: str) -> bool:
        value = self.metrics.get(name)
        return value is not None and math.isfinite(value)
