"""Batch sampling: a resumable, deterministic Ray Data job over a cascade folder or a registry
model (``docs/batch.md``).

``config.py`` the job's arguments; ``prompts.py`` prompt files → validated rows; ``model.py``
pinning the model; ``worker.py`` the sampler actor; ``job.py`` :func:`run_batch`; ``cli.py``
``cascade sample``.
"""

from diffusion_core.batch.config import BatchConfig, SamplerSettings
from diffusion_core.batch.job import BatchError, BatchResult, run_batch

__all__ = ["BatchConfig", "BatchError", "BatchResult", "SamplerSettings", "run_batch"]
