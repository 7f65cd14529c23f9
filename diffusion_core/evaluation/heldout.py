"""Held-out captions of the built-in shapes data, sampled and checked by the shapes checker.

The captions come from scenes drawn with a seed the training data did not use
(:data:`HELD_OUT_SEED`); :func:`sample_and_check` samples a cascade for them and scores each image
with :func:`diffusion_core.data.shapes.check_caption` (the demo's faithfulness).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.evaluation.grids import caption_grid

HELD_OUT_SEED = 1_000_003


def held_out_captions(n: int, train_count: int, train_seed: int = 0) -> list[tuple[str, bool]]:
    """``n`` captions of scenes drawn with a seed the training data did not use, each with
    whether the exact caption string also occurs in the training set."""
    from diffusion_core.data.shapes import sample_scene

    seen = {
        sample_scene(np.random.default_rng([train_seed, i]))[0].caption()
        for i in range(train_count)
    }
    out: list[tuple[str, bool]] = []
    i = 0
    while len(out) < n:
        caption = sample_scene(np.random.default_rng([HELD_OUT_SEED, i]))[0].caption()
        i += 1
        if caption not in (c for c, _ in out):
            out.append((caption, caption in seen))
    return out


def sample_and_check(
    cascade_dir: Path, out: Path, *, train_count: int, samples: int = 16, steps: int = 50
) -> list[dict[str, Any]]:
    """Sample the cascade for held-out captions (one seed each), check every image with the
    shapes checker, write ``grid.png`` (OK/NO and a green/red frame); return a row per caption."""
    from diffusion_core.cascade import Cascade
    from diffusion_core.data.shapes import check_caption

    cascade = Cascade.load(cascade_dir)
    held = held_out_captions(samples, train_count)
    captions = [c for c, _ in held]
    images = cascade.sample(captions, seed=list(range(len(captions))), steps=steps)
    images_np = images.numpy()  # type: ignore[union-attr]
    checks = [check_caption(img, cap) for img, cap in zip(images_np, captions, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    caption_grid(images_np, captions, [c.match for c in checks]).save(out / "grid.png")
    return [
        {"caption": cap, "in_training_set": seen, "match": c.match, "reason": c.reason}
        for (cap, seen), c in zip(held, checks, strict=True)
    ]
