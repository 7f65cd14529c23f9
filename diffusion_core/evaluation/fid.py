"""FID and KID between two sets of features, with torchmetrics (``docs/evaluation.md``).

- FID (Heusel et al., 2017): the Fréchet distance between Gaussians fitted to the two feature
  sets, ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``. Biased upwards at small sample
  counts (and its covariances are singular below 2049 samples for 2048-d features): compare
  models only at the same N, and prefer KID below ~2k samples.
- KID (Bińkowski et al., 2018): the squared maximum mean discrepancy under the polynomial kernel
  ``k(a, b) = (a·b / d + 1)^3``, estimated without bias; the mean over ``subsets`` random subsets
  of ``subset_size`` samples, with its standard deviation over the subsets.

The statistics are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
(no hand-written matrix square root). They are fed features already extracted
(:class:`~diffusion_core.evaluation.inception.InceptionFeatures`, or cached reference features)
through an identity "feature module". KID's subsets are drawn from a seeded RNG, so the result is
a function of the features and the seed.
"""

from __future__ import annotations

import warnings

import torch

Tensor = torch.Tensor

KID_SUBSETS = 100
KID_MAX_SUBSET = 1000


class _GivenFeatures(torch.nn.Module):
    """A torchmetrics feature module for features computed beforehand: the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: Tensor) -> Tensor:
        return features


def kid_subset_size(n: int) -> int:
    """Half the smaller set (at most 1000, at least 2): subsets then differ from one another, so
    ``kid_std`` says how much the estimate moves; with subsets of all n samples every subset
    would give the same value."""
    return max(2, min(KID_MAX_SUBSET, n // 2))


def _features(x: Tensor, name: str) -> Tensor:
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} features must be [N >= 2, dim], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} features hold NaN or Inf")
    return x.detach().to("cpu", torch.float64)


def fid(real: Tensor, fake: Tensor) -> float:
    """FID between feature sets [N, d] and [M, d] (N, M >= 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    r, f = _features(real, "real"), _features(fake, "generated")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(r.shape[1]))
    metric.update(r, real=True)
    metric.update(f, real=False)
    return float(metric.compute())


def kid(
    real: Tensor,
    fake: Tensor,
    *,
    seed: int = 0,
    subsets: int = KID_SUBSETS,
    subset_size: int | None = None,
) -> tuple[float, float]:
    """(KID, its standard deviation over subsets) between feature sets [N, d] and [M, d].

    ``subset_size`` defaults to :func:`kid_subset_size` of the smaller set.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _features(real, "real"), _features(fake, "generated")
    size = subset_size or kid_subset_size(min(r.shape[0], f.shape[0]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(r.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(r, real=True)
    metric.update(f, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
