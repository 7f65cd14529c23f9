"""Pieces of the evaluation that need no dataset: the reference-feature cache, the NLL bound of a
stage on held-out images, the report's identity and the settings' checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.cascade import Cascade
from diffusion_core.evaluation import EvalReport, EvalSettings
from diffusion_core.evaluation.nll import stage_data, stage_nll_bpd, to_8bit_grid
from diffusion_core.evaluation.reference import cache_path, reference_features


class _CountingExtractor:
    """A cheap stand-in for the Inception: the mean colour, and how many images it saw."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images, progress=None):
        self.seen += images.shape[0]
        if progress is not None:
            progress(images.shape[0], images.shape[0])
        return images.float().mean(dim=(1, 2))


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def test_reference_features_are_computed_once_and_extended_on_demand(tmp_path):
    images, keys = _images(6), [f"k{i}" for i in range(6)]
    ex = _CountingExtractor()
    kw = dict(version="v1", resolution=8, extractor=ex, extractor_id="fake", cache_dir=tmp_path)
    first = reference_features(images[:4], keys[:4], **kw)
    assert (first.status, first.computed, ex.seen) == ("computed", 4, 4)
    hit = reference_features(images[:3], keys[:3], **kw)
    assert (hit.status, ex.seen) == ("hit", 4)
    assert torch.equal(hit.features, first.features[:3])
    more = reference_features(images, keys, **kw)
    assert (more.status, more.computed, ex.seen) == ("extended", 2, 6)
    assert torch.equal(more.features, ex(images))
    assert more.path == str(cache_path(tmp_path, "v1", "fake", 8))
    # another extractor, another resolution, another dataset version: other entries
    other = reference_features(images[:2], keys[:2], **{**kw, "extractor_id": "other"})
    assert other.status == "computed"
    # a file whose keys do not match is recomputed, never trusted
    wrong = reference_features(images[:2], ["x0", "x1"], **kw)
    assert wrong.status == "computed"


def _tiny_cascade() -> Cascade:
    from diffusion_core.training import load_preset

    torch.manual_seed(0)
    return Cascade.from_config(load_preset("tiny").cascade)


def test_8bit_grid_and_stage_data():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2])
    y = to_8bit_grid(x)
    assert torch.allclose((y + 1) * 127.5, torch.round((y + 1) * 127.5))
    assert y[0] == -1 and y[-1] == 1
    imgs = _images(2)
    assert stage_data(imgs, 4).shape == (2, 3, 4, 4)
    assert torch.equal(stage_data(imgs, 8), (imgs.permute(0, 3, 1, 2).float() / 127.5 - 1))


def test_stage_nll_is_per_image_deterministic_and_finite():
    cascade = _tiny_cascade()
    images = _images(3, size=16)
    cond = cascade.encode_prompts(["a small red circle", "two large blue squares", "a cat"])
    for stage in cascade:
        bpd = stage_nll_bpd(stage, images, cond, seed=5)
        assert bpd.shape == (3,) and bool(torch.isfinite(bpd).all()) and bool((bpd > 0).all())
        again = stage_nll_bpd(stage, images, cond, seed=5)
        assert torch.equal(bpd, again)
        # image i's bound does not depend on the images evaluated with it
        alone = stage_nll_bpd(stage, images[1:2], {k: v[1:2] for k, v in cond.items()}, seed=6)
        assert torch.allclose(alone, bpd[1:2], rtol=1e-5)


def test_report_identity_and_settings():
    s = EvalSettings(num_samples=8, steps=4)
    r = EvalReport(dataset_version="v", settings=s, metrics={"kid": 0.1})
    ident = r.identity
    assert ident["dataset_version"] == "v" and ident["split"] == "eval"
    assert ident["num_samples"] == 8 and ident["nll_samples"] == 16
    assert "batch_size" not in ident and "metrics" not in ident
    assert r.finite("kid") and not r.finite("fid")
    from diffusion_core.evaluation.evaluator import _check_settings

    with pytest.raises(ValueError, match="unknown metrics"):
        _check_settings(EvalSettings(metrics=("kid", "clip")))
    with pytest.raises(ValueError, match="unknown sampler"):
        _check_settings(EvalSettings(sampler="euler"))
    assert np.isclose(EvalReport.model_validate_json(r.model_dump_json()).metrics["kid"], 0.1)
