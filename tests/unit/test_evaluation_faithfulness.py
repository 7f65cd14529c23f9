"""The shapes checker (diffusion_core/evaluation/faithfulness.py): captions parse back, rendered
images pass, mismatched captions fail near chance, and each kind of mistake is noticed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffusion_core.data import shapes as S
from diffusion_core.evaluation import faithfulness as C


def _resized(img: Image.Image, size: int) -> Image.Image:
    return img if img.size[0] == size else img.resize((size, size), Image.Resampling.LANCZOS)


def test_captions_parse_back_and_others_do_not():
    caps = [c for _, c, _, _, _ in S.generate(200, seed=0, size=32)]
    for c in caps:
        scene = C.parse_caption(c)
        assert scene is not None and scene.caption() == c
    assert C.parse_caption("a photo of a dog") is None
    assert C.is_shapes_caption(caps) and not C.is_shapes_caption([*caps, "a photo of a dog"])
    assert not C.is_shapes_caption([])


@pytest.mark.parametrize(("size", "at_least"), [(32, 0.97), (64, 0.98), (128, 0.99)])
def test_checker_accepts_rendered_images(size, at_least):
    n = {32: 150, 64: 150, 128: 40}[size]
    images, captions = [], []
    for _, cap, img, _, _ in S.generate(n, seed=11, size=128):
        images.append(_resized(img, size))
        captions.append(cap)
    assert C.faithfulness(images, captions) >= at_least


def test_checker_rejects_mismatched_captions_near_chance():
    images, captions = [], []
    for _, cap, img, _, _ in S.generate(150, seed=12, size=64):
        images.append(img)
        captions.append(cap)
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    assert C.faithfulness(images, shuffled) <= 0.05


def _one(caption_filter, seed=0):
    for _, cap, img, scene, _ in S.generate(300, seed=seed, size=64):
        if caption_filter(scene):
            return cap, img, scene
    raise AssertionError("no such scene")


def test_checker_notices_each_kind_of_mistake():
    cap, img, scene = _one(lambda s: s.relation is not None)
    assert C.check_caption(img, cap).match
    a, b = scene.objects
    opposite = {
        "above": "below",
        "below": "above",
        "to the left of": "to the right of",
        "to the right of": "to the left of",
    }
    swapped_relation = cap.replace(scene.relation, opposite[scene.relation])
    assert not C.check_caption(img, swapped_relation).match
    other_colour = next(c for c in S.COLOURS if c not in (a.colour, b.colour))
    assert not C.check_caption(img, cap.replace(a.colour, other_colour, 1)).match
    other_shape = next(s for s in S.SHAPES if s != a.shape)
    wrong_shape = S.Scene((S.Obj(a.colour, other_shape, a.size), b), scene.relation)
    assert not C.check_caption(img, wrong_shape.caption()).match
    other_size = "large" if a.size == "small" else "small"
    wrong_size = S.Scene((S.Obj(a.colour, a.shape, other_size), b), scene.relation)
    assert not C.check_caption(img, wrong_size.caption()).match
    # one object only: the second one is extra
    assert not C.check_caption(img, f"a {a.size} {a.colour} {a.shape}").match

    cap, img, scene = _one(lambda s: s.counted and len(s.objects) == 2)
    assert C.check_caption(img, cap).match
    assert not C.check_caption(img, cap.replace("two ", "three ", 1)).match
    assert "not in the shapes grammar" in C.check_caption(img, "a cat").reason




def _degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """What a sampler's output suffers from, applied to a crisp render."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(0.5))
    if kind == "jpeg":  # 4:4:4: at 32 px, 4:2:0 chroma leaves a small shape ~2 colour pixels
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75, subsampling=0)
        return Image.open(buf).convert("RGB")
    a = np.asarray(img).astype(np.float32)
    if kind == "noise":
        a = a + rng.normal(0.0, 12.0, a.shape)
    elif kind == "speckle":  # isolated palette-coloured pixels and 2-pixel specks
        palette = list(S.COLOURS.values())
        for _ in range(4):
            y, x = rng.integers(0, a.shape[0] - 1, 2)
            a[y, x : x + int(rng.integers(1, 3))] = palette[int(rng.integers(len(palette)))]
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("kind", ["noise", "blur", "jpeg", "speckle"])
def test_checker_accepts_degraded_renders_and_still_rejects_shuffled_captions(kind):
    rng = np.random.default_rng(7)
    images, captions = [], []
    for _, cap, img, _, _ in S.generate(120, seed=21, size=128):
        images.append(_degrade(_resized(img, 32), kind, rng))
        captions.append(cap)
    assert C.faithfulness(images, captions) >= 0.95
    shuffled = [captions[i] for i in rng.permutation(len(captions))]
    assert C.faithfulness(images, shuffled) <= 0.05


def test_template_fit_recovers_shape_and_side():
    # a lone shape of known side: the fitted side is within a pixel and the fit is near-exact
    for shape in S.SHAPES:
        for side in (0.18, 0.36):
            placed = [S.Placed(S.Obj("blue", shape, "small"), 0.5, 0.5, side)]
            (blob,) = C.find_blobs(S.render(placed, 64))
            assert blob.shape == shape and abs(blob.side - side) < 1 / 64
            assert blob.fit_error < 0.1 and abs(blob.cx - 0.5) < 0.02


def test_speckle_is_not_an_object_but_a_small_shape_is():
    img = np.full((32, 32, 3), 255, np.uint8)
    img[3:5, 3:5] = S.COLOURS["red"]  # 4 px: under a third of the smallest object's area
    assert C.find_blobs(img) == []
    smallest = [S.Placed(S.Obj("red", "triangle", "small"), 0.5, 0.5, S.SIZES["small"][0])]
    (blob,) = C.find_blobs(S.render(smallest, 32))
    assert (blob.shape, blob.size) == ("triangle", "small")
    assert C.CHECKER_VERSION == "shapes-2"
