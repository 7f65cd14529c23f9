"""The cascade (section 18.6.4): stage and cascade configs, stages (noise-conditioning
augmentation, sampling), their training losses, and the :class:`Cascade` (sample, save, load).

``config.py`` the serialisable configs; ``images.py`` uint8 <-> model tensors; ``stage.py`` one
level; ``losses.py`` a stage's training losses on a batch; ``cascade.py`` the whole cascade.
The optimiser step that uses the losses lives with the training job
(:func:`diffusion_core.training.step.training_step`).
"""

from diffusion_core.cascade.cascade import Cascade, cascade_files, content_hash
from diffusion_core.cascade.config import (
    CASCADE_JSON,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    FORMAT_VERSION,
    TEXT_KEYS,
    CascadeConfig,
    Sampler,
    StageConfig,
)
from diffusion_core.cascade.images import images_to_model, model_to_images, png_bytes, resize
from diffusion_core.cascade.losses import stage_losses
from diffusion_core.cascade.stage import Stage

__all__ = [
    "CASCADE_JSON",
    "FORMAT_VERSION",
    "TEXT_KEYS",
    "Cascade",
    "cascade_files",
    "content_hash",
    "CascadeConfig",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "Sampler",
    "Stage",
    "StageConfig",
    "images_to_model",
    "model_to_images",
    "png_bytes",
    "resize",
    "stage_losses",
]
