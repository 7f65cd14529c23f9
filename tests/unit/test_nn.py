"""The U-Net of figure 18.9, its conditioning, the noisy classifier and safetensors I/O."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_core.nn import (
    ClassifierConfig,
    NoisyClassifier,
    UNet,
    UNetConfig,
    load_network,
    save_network,
)

D, L = 12, 5  # text width and tokens: random tensors shaped like the MiniLM encoder's output
TINY = dict(
    image_size=8,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_channels=8,
    norm_groups=4,
)
FULL = UNetConfig(**TINY, num_classes=3, text_dim=D, low_res_size=4, learn_sigma=True)

CONFIGS = {
    "plain": UNetConfig(**TINY),
    "learned-variance": UNetConfig(**TINY, learn_sigma=True),
    "class": UNetConfig(**TINY, num_classes=3),
    "text": UNetConfig(**TINY, text_dim=D),
    "text-pooled-only": UNetConfig(**TINY, text_dim=D, text_cross_attention=False),
    "super-resolution": UNetConfig(**TINY, low_res_size=4),
    "everything": FULL,
    "three-levels-per-level-depth": UNetConfig(
        image_size=8,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=(1, 2, 1),
        attention_resolutions=(8, 2),
        head_channels=4,
        norm_groups=4,
        dropout=0.1,
    ),
    "no-attention": UNetConfig(**{**TINY, "attention_resolutions": ()}, mid_attention=False),
    "grey-one-level": UNetConfig(
        image_size=4,
        in_channels=1,
        base_channels=8,
        channel_mult=(1,),
        norm_groups=4,
        attention_resolutions=(4,),
        head_channels=8,
    ),
}


def inputs(cfg: UNetConfig, B: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    S, C = cfg.image_size, cfg.in_channels
    z = torch.randn(B, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    kw: dict = {}
    if cfg.num_classes:
        kw["label"] = torch.arange(B) % cfg.num_classes
    if cfg.text_dim:
        kw["text_pooled"] = torch.randn(B, D, generator=g)
        kw["text_tokens"] = torch.randn(B, L, D, generator=g)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, -2:] = False  # padding
        kw["text_mask"] = mask
    if cfg.low_res_size:
        r = cfg.low_res_size
        kw["low_res"] = torch.randn(B, C, r, r, generator=g)
        kw["aug_level"] = torch.randint(0, 300, (B,), generator=g)
    return z, t, kw


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the zero initialisations (output convs, attention projections) by random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def build(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize_(UNet(cfg), seed).eval()


# --------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_for_every_configuration(name):
    cfg = CONFIGS[name]
    model = UNet(cfg).eval()
    z, t, kw = inputs(cfg, B=3)
    out = model(z, t, **kw)
    C = cfg.in_channels
    assert out.shape == (3, 2 * C if cfg.learn_sigma else C, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()


def test_channels_last_input_gives_the_same_output_in_channels_last():
    model = build(FULL)
    z, t, kw = inputs(FULL)
    ref = model(z, t, **kw)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(z.contiguous(memory_format=torch.channels_last), t, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_scalar_timestep_is_broadcast():
    model = build(CONFIGS["plain"])
    z, t, _ = inputs(CONFIGS["plain"])
    torch.testing.assert_close(model(z, torch.tensor(7)), model(z, torch.full((2,), 7)))


def test_examples_are_independent_of_the_rest_of_the_batch():
    """GroupNorm, attention and conditioning act per example (CFG batches cond and null)."""
    model = build(FULL)
    z, t, kw = inputs(FULL, B=3)
    whole = model(z, t, **kw)
    one = model(z[1:2], t[1:2], **{k: v[1:2] for k, v in kw.items()})
    torch.testing.assert_close(one, whole[1:2], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------- gradients
def test_gradient_reaches_every_parameter():
    model = build(FULL).train()
    z, t, kw = inputs(FULL, B=4)
    kw["cond_drop"] = torch.tensor([False, True, False, False])  # trains the null embeddings too
    model(z, t, **kw).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"


def test_zero_initialised_output_and_residual_branches():
    """Every residual branch and the output start at zero (blocks start as identities)."""
    model = UNet(FULL)
    z, t, kw = inputs(FULL)
    assert model(z, t, **kw).abs().max() == 0


# --------------------------------------------------------------------- conditioning
def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


@pytest.mark.parametrize(
    "key", ["t", "label", "text_pooled", "text_tokens", "low_res", "aug_level"]
)
def test_every_condition_changes_the_output(key):
    model = build(FULL)
    z, t, kw = inputs(FULL)
    ref = model(z, t, **kw)
    g = torch.Generator().manual_seed(1)
    if key == "t":
        t = (t + 100) % 1000
    elif key == "label":
        kw["label"] = (kw["label"] + 1) % 3
    elif key == "aug_level":
        kw["aug_level"] = kw["aug_level"] + 200
    else:
        kw[key] = torch.randn(kw[key].shape, generator=g)
    assert differs(model(z, t, **kw), ref)


def test_masked_text_tokens_are_ignored():
    model = build(FULL)
    z, t, kw = inputs(FULL)
    ref = model(z, t, **kw)
    tokens = kw["text_tokens"].clone()
    tokens[:, -2:] = 100.0  # the padded positions
    torch.testing.assert_close(model(z, t, **{**kw, "text_tokens": tokens}), ref)


def test_dropped_condition_uses_the_learned_null_embedding():
    model = build(FULL)
    z, t, kw = inputs(FULL)
    drop = torch.ones(2, dtype=torch.bool)
    dropped = model(z, t, **kw, cond_drop=drop)
    # Under dropout the label and text no longer matter ...
    other = dict(kw, label=(kw["label"] + 1) % 3, text_pooled=torch.randn(2, D))
    other["text_tokens"] = torch.randn(2, L, D)
    torch.testing.assert_close(model(z, t, **other, cond_drop=drop), dropped)
    # ... and it equals the explicit null condition: the empty caption and label -1.
    empty = dict(kw, label=torch.full((2,), -1), text_pooled=torch.zeros(2, D))
    empty["text_mask"] = torch.zeros(2, L, dtype=torch.bool)
    torch.testing.assert_close(model(z, t, **empty), dropped)
    # ... and equals leaving the condition out.
    low = {k: kw[k] for k in ("low_res", "aug_level")}
    torch.testing.assert_close(model(z, t, **low), dropped)
    # The null embeddings are parameters that drive the output of dropped rows only.
    with torch.no_grad():
        model.null_text_pooled.add_(1.0)
        model.null_text_token.add_(1.0)
        model.label_embed.weight[-1].add_(1.0)
    assert differs(model(z, t, **kw, cond_drop=drop), dropped)
    mixed = torch.tensor([True, False])
    before = build(FULL)(z, t, **kw, cond_drop=mixed)
    after = model(z, t, **kw, cond_drop=mixed)
    assert differs(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])


def test_condition_dropout_flag_must_match_the_batch():
    model = build(FULL)
    z, t, kw = inputs(FULL)
    with pytest.raises(ValueError, match="cond_drop must have shape"):
        model(z, t, **kw, cond_drop=torch.ones(3, dtype=torch.bool))


def test_super_resolution_network_requires_the_low_resolution_image():
    cfg = CONFIGS["super-resolution"]
    z, t, _ = inputs(cfg)
    with pytest.raises(ValueError, match="low_res"):
        UNet(cfg)(z, t)


# --------------------------------------------------------------------- config
def test_config_serialises_and_round_trips():
    text = FULL.model_dump_json()
    assert UNetConfig.model_validate_json(text) == FULL
    assert UNetConfig.model_validate(json.loads(text)) == FULL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(attention_resolutions=(3,)), "not resolutions of this network"),
        (dict(norm_groups=3), "norm_groups=3 must divide"),
        (dict(head_channels=5), "head_channels=5 must divide"),
        (dict(image_size=6, channel_mult=(1, 2, 2)), "divisible by 2"),
        (dict(num_res_blocks=(1, 1, 1)), "3 entries but channel_mult has 2"),
        (dict(low_res_size=8), "must be smaller than image_size"),
        (dict(unknown=1), "Extra inputs"),
    ],
)
def test_config_errors_say_what_is_wrong(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**TINY, **change})


# --------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = build(FULL)
    save_network(model, tmp_path / "net")
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_network(tmp_path / "net", expected_config=FULL).eval()
    assert isinstance(loaded, UNet) and loaded.config == FULL
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    z, t, kw = inputs(FULL)
    assert torch.equal(model(z, t, **kw), loaded(z, t, **kw))


def test_load_with_a_different_config_is_a_clear_error(tmp_path):
    save_network(UNet(FULL), tmp_path)
    other = FULL.model_copy(update={"base_channels": 16})
    with pytest.raises(ValueError, match=r"config mismatch.*base_channels: saved=8 expected=16"):
        load_network(tmp_path, expected_config=other)
    with pytest.raises(ValueError, match="ClassifierConfig was expected"):
        load_network(tmp_path, expected_config=ClassifierConfig(**TINY, num_classes=2))


def test_weights_that_do_not_fit_the_config_are_a_clear_error(tmp_path):
    save_network(UNet(CONFIGS["plain"]), tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    header["config"]["base_channels"] = 16
    (tmp_path / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="do not fit the network"):
        load_network(tmp_path)


def test_loading_needs_a_saved_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved network directory"):
        load_network(tmp_path)


# --------------------------------------------------------------------- classifier (eq. 18.40)
def test_noisy_classifier_logits_gradient_and_round_trip(tmp_path):
    cfg = ClassifierConfig(**TINY, num_classes=4)
    torch.manual_seed(0)
    clf = NoisyClassifier(cfg).eval()
    z = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    logits = clf(z, t)
    assert logits.shape == (3, 4)
    y = torch.tensor([0, 1, 3])
    grad = clf.log_prob_grad(z, t, y)
    assert grad.shape == z.shape and grad.abs().sum() > 0
    # A small step along the gradient raises log Pr(y|z_t).
    lp = lambda x: torch.log_softmax(clf(x, t), -1).gather(1, y[:, None]).squeeze(1)  # noqa: E731
    assert (lp(z + 1e-2 * grad) > lp(z)).all()
    randomize_(clf).train()
    clf(z, t).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clf.parameters())
    clf.eval()
    logits = clf(z, t)
    save_network(clf, tmp_path)
    loaded = load_network(tmp_path, expected_config=cfg)
    assert isinstance(loaded, NoisyClassifier)
    assert torch.equal(loaded(z, t), logits)


# --------------------------------------------------------------------- compile
def test_forward_compiles_without_graph_breaks():
    """torch._dynamo traces the whole conditioned forward as one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    model = build(FULL)
    z, t, kw = inputs(FULL)
    kw["cond_drop"] = torch.tensor([True, False])
    explanation = torch._dynamo.explain(model)(z, t, **kw)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
