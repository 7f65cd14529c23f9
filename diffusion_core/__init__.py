"""cascade-diffusion: the model science of a cascaded text-to-image diffusion pipeline."""

__version__ = "0.1.0"
