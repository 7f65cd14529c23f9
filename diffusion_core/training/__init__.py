"""Training: one Ray Train job per cascade stage.

``config`` (TrainConfig + YAML presets), ``runs`` (names, run files, resume rules), ``tracking``
(MLflow), ``trainer`` (the driver: :func:`train`), ``submit``/``job`` (the Ray Jobs API path),
``loop`` (the per-worker loop), ``step`` (the optimiser step), ``optim`` (AdamW, LR schedule,
EMA), ``checkpoint``, ``export`` (into a cascade folder), ``reader`` (the shard reader),
``faults`` (fault injection for recovery tests).

- :func:`train` runs a stage's job (locally, on ``RAY_ADDRESS``, or through the Ray Jobs API).
- :func:`load_preset` reads a YAML preset (``tiny``, ``demo``, ``gpu`` or a file) and
  ``preset.for_stage(name)`` gives that stage's :class:`TrainConfig`.
"""

from diffusion_core.data.format import DataError
from diffusion_core.training.config import (
    ConfigError,
    ScalingSpec,
    TrainConfig,
    TrainPreset,
    TrainSettings,
    available_presets,
    load_preset,
)
from diffusion_core.training.loop import NonFiniteLossError
from diffusion_core.training.runs import TrainingError, TrainResult
from diffusion_core.training.trainer import train

__all__ = [
    "ConfigError",
    "DataError",
    "NonFiniteLossError",
    "ScalingSpec",
    "TrainConfig",
    "TrainPreset",
    "TrainResult",
    "TrainSettings",
    "TrainingError",
    "available_presets",
    "load_preset",
    "train",
]
