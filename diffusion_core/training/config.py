"""Training configs: one :class:`TrainConfig` per stage run, resolved from a preset.

A *preset* (YAML, :class:`TrainPreset`) holds the whole cascade (the stages' networks and
schedules, :class:`~diffusion_core.cascade.CascadeConfig`), the training settings shared by every
stage, per-stage overrides, and the Ray scaling. ``preset.for_stage("base")`` resolves it into the
:class:`TrainConfig` of one stage's job: that is what crosses every boundary (CLI, Ray workers,
Prefect parameters, MLflow params, checkpoints).

Built-in presets live beside this module (``presets/<name>.yaml``): ``tiny`` (tests), ``demo``
(a few minutes per stage on a 2-core CPU) and ``gpu`` (a real run on one or more GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from diffusion_core.cascade import CascadeConfig, StageConfig
from diffusion_core.storage import absolute, redact, strip_credentials

PRESET_DIR = Path(__file__).with_name("presets")


class ConfigError(ValueError):
    """A config that cannot be run: what was wrong, with what value, and what to do."""


class ScalingSpec(BaseModel):
    """How many Ray Train workers, and what each one gets (``ray.train.ScalingConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(2, ge=1, description="data-parallel workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker; NCCL instead of gloo")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="e.g. {CPU: 1}; default: 1 CPU (and 1 GPU with use_gpu)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per worker")


class TrainSettings(BaseModel):
    """Optimisation and bookkeeping of one stage's run (a preset's defaults or overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(1000, ge=1, description="total optimizer steps")
    batch_size: int = Field(64, ge=1, description="global batch (split evenly over workers)")
    lr: float = Field(2e-4, gt=0.0)
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant, or cosine decay to lr_min_ratio*lr"
    )
    lr_min_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW, on weights with ndim >= 2")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0.0, description="max global grad norm (None: off)")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+n)/(10+n)) early on")
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")
    keep: int = Field(2, ge=1, description="checkpoints kept (CheckpointConfig.num_to_keep)")
    log_every: int = Field(10, ge=1, description="steps between MLflow metric writes")
    sample_every: int = Field(0, ge=0, description="steps between sample grids (0: at the end)")
    sample_count: int = Field(8, ge=1, le=64, description="images in a sample grid")
    sample_steps: int = Field(25, ge=1, description="DDIM steps for sample grids")
    guidance_scale: float = Field(3.0, ge=0.0, description="CFG weight for sample grids")
    seed: int = Field(0, ge=0)
    init_weights: str | None = Field(
        None,
        description="warm start: a cascade folder whose weights for this stage initialise the "
        "network (its network config must match); None: random initialisation from the seed",
    )
    max_failures: int = Field(1, ge=0, description="worker-group restarts (FailureConfig)")
    prefetch: int = Field(4, ge=1, description="batches decoded ahead of the step")


class TrainConfig(TrainSettings):
    """Everything one stage's training job needs (besides the data directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = Field("custom", description="name of the preset this was resolved from")
    stage: str = Field(..., description="the stage of `cascade` to train")
    cascade: CascadeConfig
    scaling: ScalingSpec = ScalingSpec()
    storage_path: str = Field("out/runs", description="Ray run storage (a path or a URI)")
    experiment: str = Field("cascade-train", description="MLflow experiment")
    tracking_uri: str | None = Field(
        None, description="MLflow; default $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db"
    )

    @field_validator("init_weights")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        return None if v is None else absolute(v)  # workers and clusters run elsewhere

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        names = [s.name for s in self.cascade.stages]
        if self.stage not in names:
            raise ValueError(f"unknown stage {self.stage!r}; this cascade's stages are {names}")
        n = self.scaling.num_workers
        if self.batch_size % n:
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch and must be divisible by "
                f"scaling.num_workers={n}; use e.g. batch_size={n * max(1, self.batch_size // n)}"
            )
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} > steps={self.steps}")
        return self

    @property
    def stage_config(self) -> StageConfig:
        return next(s for s in self.cascade.stages if s.name == self.stage)

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.scaling.num_workers

    @property
    def top_resolution(self) -> int:
        return self.cascade.stages[-1].resolution

    def storage_uri(self) -> str:
        """``storage_path`` as Ray needs it: a URI, or an absolute local path."""
        return absolute(self.storage_path)

    def redacted(self) -> TrainConfig:
        """This config with no credential in its URIs: what run files, params, tags and job
        requests hold. The tracking URI loses its ``user:password@`` (still usable: MLflow takes
        the credentials from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``)."""
        uri = None if self.tracking_uri is None else strip_credentials(self.tracking_uri)[0]
        return self.model_copy(
            update={"tracking_uri": redact(uri), "storage_path": redact(self.storage_path)}
        )

    def resolved_tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI``, else ``tracking_uri``, else a sqlite store in storage."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking_uri:
            return self.tracking_uri
        storage = self.storage_uri()
        if "://" in storage:
            raise ConfigError(
                f"storage_path={storage!r} is remote: set tracking_uri (or MLFLOW_TRACKING_URI) "
                "to an MLflow server, a local sqlite store cannot live there"
            )
        return f"sqlite:///{storage}/mlflow.db"

    def mlflow_params(self) -> dict[str, str]:
        """The whole config as flat MLflow params (``network.base_channels`` etc.)."""
        data = self.redacted().model_dump(mode="json", exclude={"cascade"})
        data["stage_config"] = self.stage_config.model_dump(mode="json")
        data["cascade.stages"] = ",".join(s.name for s in self.cascade.stages)
        data["cascade.text_encoder"] = self.cascade.text_encoder
        flat: dict[str, str] = {}
        _flatten("", data, flat)
        return flat


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


class TrainPreset(BaseModel):
    """A YAML preset: the cascade, shared training settings, per-stage overrides, scaling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    cascade: CascadeConfig
    train: TrainSettings = TrainSettings()
    stages: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-stage overrides of `train` fields"
    )
    scaling: ScalingSpec = ScalingSpec()
    storage_path: str = "out/runs"
    experiment: str = "cascade-train"
    tracking_uri: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainPreset:
        names = [s.name for s in self.cascade.stages]
        unknown = sorted(set(self.stages) - set(names))
        if unknown:
            raise ValueError(f"overrides for unknown stages {unknown}; stages are {names}")
        return self

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.cascade.stages]

    def for_stage(self, stage: str, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of one stage (``overrides``: any TrainConfig field)."""
        if stage not in self.stage_names:
            raise ConfigError(
                f"unknown stage {stage!r}; preset {self.name!r} has stages {self.stage_names}"
            )
        data: dict[str, Any] = self.train.model_dump()
        data.update(self.stages.get(stage, {}))
        data.update(
            preset=self.name,
            stage=stage,
            cascade=self.cascade,
            scaling=self.scaling,
            storage_path=self.storage_path,
            experiment=self.experiment,
            tracking_uri=self.tracking_uri,
        )
        if "scaling" in overrides and isinstance(overrides["scaling"], Mapping):
            overrides["scaling"] = self.scaling.model_copy(update=dict(overrides["scaling"]))
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return TrainConfig.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"preset {self.name!r}, stage {stage!r}: {e}") from None


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> TrainPreset:
    """A built-in preset by name (``tiny``, ``demo``, ``gpu``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = PRESET_DIR / f"{name_or_path}.yaml"
        if path.suffix or not builtin.is_file():
            raise ConfigError(
                f"no config file {str(name_or_path)!r} and no preset of that name: give a YAML "
                f"file or one of {available_presets()}"
            )
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must hold a mapping (name, cascade, train, ...)")
    raw = dict(raw)
    raw.setdefault("name", path.stem)
    try:
        return TrainPreset.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid preset: {e}") from None
