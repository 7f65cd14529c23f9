"""``evaluate``: a trained cascade on a dataset's evaluation split → an :class:`EvalReport`.

What is measured (``docs/evaluation.md``):

1. the first ``num_samples`` held-out samples (the ``eval-*.tar`` split; never the training
   split), their images area-downsampled to the cascade's top resolution;
2. one cascade sample per held-out caption, image ``i`` from seed ``seed + i`` (each image its
   own generator: with a deterministic sampler an image depends on its caption and seed only);
   the captions' embeddings are the ingest's precomputed ones when the cascade's text encoder is
   the dataset's, else the cascade's encoder computes them;
3. ``kid``/``kid_std`` and ``fid`` between the samples' and the held-out images' Inception-v3
   features (the held-out side cached per dataset version, ``reference.py``);
4. ``nll_bpd_<stage>``: each stage's bound (eq. 18.25) on the first ``nll_samples`` images;
5. ``faithfulness``: the share of samples the shapes checker accepts, only when every held-out
   caption is in the built-in shapes grammar (the built-in data);
6. ``num_samples`` and ``seconds_per_image`` (sampling), and the time of every part.

Same cascade, data and settings → the same report (up to ``seconds``): every random draw is
seeded from ``settings.seed``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffusion_core.cascade import content_hash
from diffusion_core.evaluation.report import EvalReport, EvalSettings

Tensor = torch.Tensor
Progress = Callable[[str, int, int], None]  # (part, done, total)

METRICS = ("kid", "fid", "nll", "faithfulness")
GRID_IMAGES = 16


def _check_settings(settings: EvalSettings) -> None:
    from diffusion_core.sampling import METHODS

    unknown = sorted(set(settings.metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    if settings.sampler not in METHODS:
        raise ValueError(f"unknown sampler {settings.sampler!r}; choose one of {list(METHODS)}")


def _at_resolution(images: Tensor, size: int) -> Tensor:
    """uint8 [N, H, W, 3] → uint8 [N, size, size, 3] by area averaging (H a multiple of size)."""
    from diffusion_core.cascade import images_to_model, model_to_images, resize

    if images.shape[1] == size:
        return images
    return model_to_images(resize(images_to_model(images), size))


def _text_source(cascade: Any, info: Any) -> str:
    """``precomputed`` when the cascade's encoder is the dataset's (matched exactly, like
    training) and the dataset kept at least as many token states as the cascade uses;
    ``encoder`` otherwise; ``none`` for a cascade without text conditioning."""
    if not cascade.is_text_conditioned:
        return "none"
    names = {info.text_encoder_name, info.text_encoder_id} - {None}
    need = cascade.config.text_max_tokens or info.max_tokens
    if cascade.config.text_encoder in names and info.max_tokens and need <= info.max_tokens:
        return "precomputed"
    return "encoder"


def _sample(cascade: Any, captions: list[str], settings: EvalSettings, report: Progress) -> Tensor:
    out = []
    n, bs = len(captions), settings.batch_size
    report("sample", 0, n)
    for start in range(0, n, bs):
        caps = captions[start : start + bs]
        images = cascade.sample(
            caps,
            seed=[settings.seed + i for i in range(start, start + len(caps))],
            guidance_scale=settings.guidance_scale,
            sampler=settings.sampler,
            steps=settings.steps,
        )
        out.append(images.cpu())
        report("sample", start + len(caps), n)
    return torch.cat(out)


def evaluate(
    cascade_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    settings: EvalSettings = EvalSettings(),
    *,
    progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    grid: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> EvalReport:
    """Evaluate the cascade in ``cascade_dir`` on the evaluation split of the dataset in
    ``data_dir`` (see the module docstring).

    ``progress(part, done, total)`` is called as each part advances; ``cache_dir`` holds the
    reference features (default :func:`~diffusion_core.evaluation.reference.default_cache_dir`);
    ``grid`` writes a PNG of the first 16 samples with their captions (and the checker's
    verdicts); ``device`` defaults to CUDA when available. Raises
    :class:`~diffusion_core.data.format.DataError` for a dataset that cannot be evaluated on,
    ``ValueError`` for bad settings.
    """
    from diffusion_core.cascade import Cascade
    from diffusion_core.data.format import (
        DataError,
        check_dataset_for_stage,
        dataset_info,
        load_manifest,
    )
    from diffusion_core.evaluation.heldout import HeldOutTextEncoder, read_heldout

    _check_settings(settings)
    report: Progress = progress or (lambda part, done, total: None)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    t = time.perf_counter()
    cascade = Cascade.load(cascade_dir, device=dev)
    info = dataset_info(str(data_dir), load_manifest(str(data_dir)))
    res = cascade.resolution
    check_dataset_for_stage(
        info, stage=cascade[-1].name, resolution=res, text_encoder=None, text=False
    )
    available = info.eval_split().num_samples
    n = min(settings.num_samples, available)
    if n < 2:
        raise DataError(
            f"dataset {info.path!r} holds {available} held-out sample(s); FID/KID need at least "
            "2: re-ingest with a larger --eval-fraction"
        )
    report("read", 0, n)
    held = read_heldout(info, n)
    report("read", n, n)
    real = _at_resolution(held.images, res)
    text = _text_source(cascade, info)
    if text == "precomputed":
        enc_id = info.text_encoder_id or info.text_encoder_name or "dataset"
        cascade.set_text_encoder(
            HeldOutTextEncoder(held, encoder_id=enc_id, max_tokens=cascade.config.text_max_tokens)
        )
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = _sample(cascade, held.captions, settings, report)
    seconds["sample"] = time.perf_counter() - t

    metrics: dict[str, float] = {
        "num_samples": float(n),
        "seconds_per_image": seconds["sample"] / n,
    }
    details: dict[str, Any] = {
        "cascade": {
            "dir": str(cascade_dir),
            "sha256": content_hash(cascade_dir),
            "stages": [f"{s.name}:{s.resolution}px" for s in cascade],
            "text_encoder": cascade.config.text_encoder,
        },
        "data": str(data_dir),
        "resolution": res,
        "device": str(dev),
        "text_embeddings": text,
        "eval_samples_available": available,
        "num_samples_requested": settings.num_samples,
        "keys": held.keys,
    }

    if {"kid", "fid"} & set(settings.metrics):
        _distances(
            real,
            samples,
            held.keys,
            info,
            settings,
            metrics,
            details,
            seconds,
            dev,
            cache_dir,
            report,
        )

    if "nll" in settings.metrics:
        m = min(settings.nll_samples, n)
        cond = cascade.encode_prompts(held.captions[:m])
        details["nll_samples"] = m
        for stage in cascade:
            t = time.perf_counter()
            part = f"nll {stage.name}"
            report(part, 0, m)
            bpd = _stage_nll(stage, real[:m], cond, settings.seed, part, report)
            seconds[f"nll_{stage.name}"] = time.perf_counter() - t
            metrics[f"nll_bpd_{stage.name}"] = float(bpd.mean())
            details[f"nll_bpd_{stage.name}_std"] = float(bpd.std()) if m > 1 else 0.0

    matches: list[bool] | None = None
    if "faithfulness" in settings.metrics:
        matches = _faithfulness(real, samples, held.captions, held.keys, metrics, details, seconds)

    if grid is not None:
        from diffusion_core.evaluation.grids import caption_grid

        k = min(GRID_IMAGES, n)
        path = Path(grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        caption_grid(
            samples[:k].numpy(), held.captions[:k], None if matches is None else matches[:k]
        ).save(path)
        details["grid"] = str(path)

    seconds["total"] = time.perf_counter() - t_start
    return EvalReport(
        dataset_version=info.version,
        split="eval",
        settings=settings,
        metrics=metrics,
        seconds=seconds,
        details=details,
    )


def _distances(
    real: Tensor,
    samples: Tensor,
    keys: list[str],
    info: Any,
    settings: EvalSettings,
    metrics: dict[str, float],
    details: dict[str, Any],
    seconds: dict[str, float],
    device: torch.device,
    cache_dir: Any,
    report: Progress,
) -> None:
    """KID and FID of the samples against the held-out images (Inception-v3 features)."""
    from diffusion_core.evaluation.fid import fid, kid, kid_subset_size
    from diffusion_core.evaluation.inception import InceptionFeatures
    from diffusion_core.evaluation.reference import reference_features

    n = real.shape[0]
    extractor = InceptionFeatures(device)
    t = time.perf_counter()
    ref = reference_features(
        real,
        keys,
        version=info.version,
        resolution=real.shape[1],
        extractor=extractor,
        extractor_id=extractor.id,
        cache_dir=cache_dir,
        progress=lambda done, total: report("reference features", done, total),
    )
    seconds["reference_features"] = time.perf_counter() - t
    t = time.perf_counter()
    fake = extractor(samples, progress=lambda done, total: report("features", done, total))
    seconds["features"] = time.perf_counter() - t
    details["inception"] = extractor.id
    details["inception_seconds_per_image"] = seconds["features"] / n
    details["reference_cache"] = {"status": ref.status, "computed": ref.computed, "path": ref.path}
    if "kid" in settings.metrics:
        t = time.perf_counter()
        metrics["kid"], metrics["kid_std"] = kid(ref.features, fake, seed=settings.seed)
        seconds["kid"] = time.perf_counter() - t
        details["kid_subset_size"] = kid_subset_size(n)
    if "fid" in settings.metrics:
        t = time.perf_counter()
        metrics["fid"] = fid(ref.features, fake)
        seconds["fid"] = time.perf_counter() - t
        details["fid_note"] = (
            f"FID at {n} samples is biased upwards (below ~2k samples): compare cascades at the "
            "same num_samples only; KID is the gate metric"
        )


def _stage_nll(
    stage: Any, real: Tensor, cond: dict[str, Tensor], seed: int, part: str, report: Progress
) -> Tensor:
    from diffusion_core.evaluation.nll import stage_nll_bpd

    return stage_nll_bpd(
        stage, real, cond, seed=seed, progress=lambda done, total: report(part, done, total)
    )


def _faithfulness(
    real: Tensor,
    samples: Tensor,
    captions: list[str],
    keys: list[str],
    metrics: dict[str, float],
    details: dict[str, Any],
    seconds: dict[str, float],
) -> list[bool] | None:
    """The shapes checker on every sample (and, for reference, on the held-out images)."""
    from diffusion_core.evaluation.faithfulness import (
        CHECKER_VERSION,
        check_caption,
        is_shapes_caption,
    )

    if not is_shapes_caption(captions):
        details["faithfulness"] = (
            "not computed: the held-out captions are not all in the built-in shapes grammar"
        )
        return None
    t = time.perf_counter()
    checks = [check_caption(img, c) for img, c in zip(samples.numpy(), captions, strict=True)]
    real_ok = [check_caption(img, c).match for img, c in zip(real.numpy(), captions, strict=True)]
    metrics["faithfulness"] = sum(c.match for c in checks) / len(checks)
    details["faithfulness_checker"] = CHECKER_VERSION  # scores of different versions differ
    details["faithfulness_real"] = sum(real_ok) / len(real_ok)
    details["faithfulness_rows"] = [
        {"key": k, "caption": c, "match": r.match, "reason": r.reason}
        for k, c, r in zip(keys, captions, checks, strict=True)
    ]
    seconds["faithfulness"] = time.perf_counter() - t
    return [c.match for c in checks]
