"""Training: one Ray Train job per cascade stage (configs, data reader, loop, checkpoints, export).

- :func:`train` runs a stage's job (locally, on ``RAY_ADDRESS``, or through the Ray Jobs API).
- :func:`load_preset` reads a YAML preset (``tiny``, ``demo``, ``gpu`` or a file) and
  ``preset.for_stage(name)`` gives that stage's :class:`TrainConfig`.
"""

from diffusion_core.training.config import (
    ConfigError,
    ScalingSpec,
    TrainConfig,
    TrainPreset,
    TrainSettings,
    available_presets,
    load_preset,
)
from diffusion_core.training.data import DataError
from diffusion_core.training.loop import NonFiniteLossError
from diffusion_core.training.run import TrainingError, TrainResult, train

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
