"""Networks of the chapter's section 18.6: the denoising U-Net (fig. 18.9) and the noisy-image
classifier of classifier guidance (eq. 18.40), with their configs and safetensors I/O."""

from diffusion_core.nn.config import BackboneConfig, ClassifierConfig, UNetConfig
from diffusion_core.nn.io import config_diff, load_network, read_network_config, save_network
from diffusion_core.nn.unet import NoisyClassifier, UNet

__all__ = [
    "BackboneConfig",
    "ClassifierConfig",
    "NoisyClassifier",
    "UNet",
    "UNetConfig",
    "config_diff",
    "load_network",
    "read_network_config",
    "save_network",
]
