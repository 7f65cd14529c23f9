"""Gaussian noise for the samplers, drawn from a generator on whichever device it lives.

``torch.randn(..., generator=g, device=d)`` needs ``g`` on ``d``. The samplers draw on the
generator's own device and move the draw to the data's device, so a CPU ``torch.Generator`` works
with a model on CUDA (and a CUDA generator with CUDA data draws in place). Either way the noise is
a deterministic function of the generator's seed; a CPU generator gives the same numbers on every
device, a CUDA generator its own (CUDA's random stream differs from the CPU's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Norm[0, I] noise of ``shape`` on ``device``, drawn on ``generator``'s device.

    Without a generator the draw uses the global random state of ``device``.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device) if device is not None else noise


def randn_like(z: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise shaped like ``z``, on its device and in its dtype (see :func:`randn`)."""
    return randn(z.shape, generator, device=z.device, dtype=z.dtype)
