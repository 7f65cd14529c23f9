"""Training pieces without Ray: presets, the step-addressable data order, the shard reader, EMA,
the LR schedule, checkpoints and the cascade export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core.data.format import DataError, check_dataset_for_stage, read_manifest
from diffusion_core.training import ConfigError, available_presets, load_preset
from diffusion_core.training.checkpoint import (
    CHECKPOINT_FILES,
    load_checkpoint,
    save_checkpoint,
    seed_step,
)
from diffusion_core.training.export import export_stage
from diffusion_core.training.optim import EMA, LRFactor, lr_factor, make_optimizer
from diffusion_core.training.reader import ShardReader, StepSampler


# ============================================================================ configs
@pytest.mark.parametrize("name", ["tiny", "demo", "gpu"], ids=["tiny", "demo", "gpu-preset"])
def test_presets_resolve_for_every_stage(name):
    preset = load_preset(name)
    assert name in available_presets()
    for stage in preset.stage_names:
        cfg = preset.for_stage(stage)
        assert cfg.stage == stage and cfg.preset == name
        assert cfg.batch_size % cfg.scaling.num_workers == 0
        params = cfg.mlflow_params()
        assert params["stage"] == stage and "stage_config.network.image_size" in params
        assert all(len(v) <= 6000 for v in params.values())


def test_preset_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no config file 'nope' and no preset.*demo"):
        load_preset("nope")
    with pytest.raises(ConfigError, match="no config file 'x.yaml'"):
        load_preset("x.yaml")
    (tmp_path / "demo").mkdir()  # a folder named like a preset does not hide it
    monkeypatch.chdir(tmp_path)
    assert load_preset("demo").name == "demo"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncascade: {stages: []}\n")
    with pytest.raises(ConfigError, match="invalid preset"):
        load_preset(bad)
    with pytest.raises(ConfigError, match="unknown stage 'sr7'"):
        load_preset("tiny").for_stage("sr7")
    with pytest.raises(ConfigError, match="warmup_steps=50 > steps=10"):
        load_preset("tiny").for_stage("base", steps=10, warmup_steps=50)


def test_scaling_overrides_merge_into_the_preset():
    cfg = load_preset("tiny").for_stage("base", scaling={"num_workers": 1})
    assert cfg.scaling.num_workers == 1 and cfg.scaling.use_gpu is False


# ============================================================================ the data order
def test_step_sampler_covers_every_sample_once_per_epoch_across_ranks():
    s = StepSampler(num_samples=24, global_batch=8, world_size=2, seed=3)
    epoch = np.concatenate([s.indices(step, r) for step in (1, 2, 3) for r in (0, 1)])
    assert sorted(epoch) == list(range(24))
    epoch2 = np.concatenate([s.indices(step, r) for step in (4, 5, 6) for r in (0, 1)])
    assert sorted(epoch2) == list(range(24)) and list(epoch2) != list(epoch)


def test_step_sampler_is_a_pure_function_of_seed_step_rank():
    a = StepSampler(50, 12, 3, seed=7)
    b = StepSampler(50, 12, 3, seed=7)
    # b answers in another order (as a resumed run would): same batches
    for step in (9, 2, 5):
        for r in (2, 0, 1):
            assert list(b.indices(step, r)) == list(a.indices(step, r))
    assert list(StepSampler(50, 12, 3, seed=8).indices(1, 0)) != list(a.indices(1, 0))
    # a batch that crosses an epoch boundary (50 is not a multiple of 12)
    assert len(a.indices(5, 2)) == 4


def test_step_seeds_differ_by_step_and_rank():
    seeds = {(s, r): seed_step(0, s, r).initial_seed() for s in range(1, 4) for r in range(2)}
    assert len(set(seeds.values())) == 6
    assert seed_step(0, 2, 1).initial_seed() == seeds[(2, 1)]


# ============================================================================ the reader
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("tiny")
    write_shapes(root / "raw", 20, seed=5, size=32, shard_size=10)
    cfg = IngestConfig(
        sources=[str(root / "raw")],
        out=str(root / "data"),
        resolution=16,
        min_size=16,
        shard_size=8,
        text_encoder="hash-test",
        max_tokens=8,
    )
    ingest(cfg, engine="local")
    return root / "data"


def test_reader_returns_the_batch_the_training_step_takes(tiny_data):
    info = read_manifest(str(tiny_data))
    assert info.num_samples == 20 and info.resolution == 16 and len(info.shards) == 3
    reader = ShardReader(info)
    batch = reader.read_batch([0, 19, 7])
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == torch.uint8
    assert batch["text_pooled"].shape == (3, 384) and batch["text_pooled"].dtype == torch.float32
    assert batch["text_tokens"].shape == (3, 8, 384)
    assert batch["text_mask"].dtype == torch.bool
    # the mask covers exactly the caption's words (hash encoder: one token per word)
    for cap, mask in zip(batch["caption"], batch["text_mask"], strict=True):
        assert int(mask.sum()) == min(len(cap.split()), 8)
    # padding rows are zero, real rows are not
    tok, mask = batch["text_tokens"], batch["text_mask"]
    assert bool((tok[~mask] == 0).all()) and bool((tok[mask].abs().sum(-1) > 0).all())
    reader.close()


def test_dataset_checks(tiny_data, tmp_path):
    info = read_manifest(str(tiny_data))
    check_dataset_for_stage(info, stage="base", resolution=16, text_encoder="hash-test", text=True)
    check_dataset_for_stage(info, stage="base", resolution=8, text_encoder="hash-test", text=True)
    with pytest.raises(DataError, match="resolution mismatch.*32px.*16px"):
        check_dataset_for_stage(info, stage="sr", resolution=32, text_encoder=None, text=False)
    with pytest.raises(DataError, match="not a multiple"):
        check_dataset_for_stage(info, stage="b", resolution=12, text_encoder=None, text=False)
    with pytest.raises(DataError, match="text encoder mismatch.*all-MiniLM"):
        check_dataset_for_stage(
            info, stage="b", resolution=16, text_encoder="all-MiniLM-L6-v2", text=True
        )
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(str(tmp_path / "none"))


def test_reader_refuses_a_shard_that_changed(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 8 samples but the manifest says 9"):
        ShardReader(read_manifest(str(copy)))


# ============================================================================ state
def test_lr_schedule():
    assert lr_factor(0, steps=100, warmup=10, schedule="constant", min_ratio=0.1) == 0.1
    assert lr_factor(9, steps=100, warmup=10, schedule="constant", min_ratio=0.1) == 1.0
    assert lr_factor(50, steps=100, warmup=10, schedule="constant", min_ratio=0.1) == 1.0
    f = LRFactor(100, 10, "cosine", 0.1)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert 0.1 < f(55) < 1.0


def test_ema_tracks_the_weights_with_warmup():
    net = torch.nn.Linear(2, 2)
    init = net.weight.detach().clone()
    ema = EMA(net, decay=0.9, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.9
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # decay 0.1 at the first update
    assert torch.allclose(ema.shadow["weight"], 0.1 * init + 0.9)
    assert EMA(net, 0.9, warmup=False).decay_at(0) == 0.9


def test_checkpoint_round_trip(tmp_path):
    from diffusion_core.cascade import Stage

    cfg = load_preset("tiny").for_stage("base")
    stage = Stage(cfg.stage_config)
    opt = make_optimizer(stage.network, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(10, 2, "constant", 0.1))
    ema = EMA(stage.network, 0.9)
    for p in stage.network.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    ema.update(stage.network)
    save_checkpoint(
        tmp_path / "ck",
        network=stage.network,
        ema=ema,
        optimizer=opt,
        scheduler=sched,
        state={"step": 1, "dataset_version": "v"},
    )
    other = Stage(cfg.stage_config)
    opt2 = make_optimizer(other.network, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, LRFactor(10, 2, "constant", 0.1))
    ema2 = EMA(other.network, 0.9)
    state = load_checkpoint(
        tmp_path / "ck", network=other.network, ema=ema2, optimizer=opt2, scheduler=sched2
    )
    # no RNG state: every step's draws are seeded by (seed, step, rank), nothing to restore
    assert state["step"] == 1 and "rng" not in state
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(CHECKPOINT_FILES)
    for a, b in zip(stage.network.parameters(), other.network.parameters(), strict=True):
        assert torch.equal(a, b)
    assert ema2.updates == 1 and all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)
    assert (
        sched2.last_epoch == 1
        and opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    )


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_resume_with_more_steps_follows_the_new_lr_horizon(tmp_path, schedule):
    """Defect: LambdaLR restored the old LRFactor (steps=100), so a run grown to 200 steps kept
    decaying towards step 100 (factor 0.10 at step 150 instead of 0.245 here)."""
    from diffusion_core.cascade import Stage

    cfg = load_preset("tiny").for_stage("base")

    def make(steps: int):
        stage = Stage(cfg.stage_config)
        opt = make_optimizer(stage.network, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
        factor = LRFactor(steps, 10, schedule, 0.1)
        return stage, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    stage, opt, sched = make(100)
    for _ in range(100):
        opt.step()
        sched.step()
    ema = EMA(stage.network, 0.9)
    save_checkpoint(
        tmp_path / "ck", network=stage.network, ema=ema, optimizer=opt, scheduler=sched, state={"step": 100}
    )
    resumed_stage, resumed_opt, resumed = make(200)
    load_checkpoint(
        tmp_path / "ck", network=resumed_stage.network, ema=None, optimizer=resumed_opt, scheduler=resumed
    )
    _, fresh_opt, fresh = make(200)
    for _ in range(100):
        fresh_opt.step()
        fresh.step()
    for step in range(100, 200):  # the LR each step trains with, resumed vs fresh
        assert resumed_opt.param_groups[0]["lr"] == pytest.approx(fresh_opt.param_groups[0]["lr"])
        assert resumed.get_last_lr() == pytest.approx(fresh.get_last_lr())
        if step == 150 and schedule == "cosine":
            assert resumed.get_last_lr()[0] / 1e-3 == pytest.approx(0.2452, abs=1e-3)
        resumed_opt.step()
        resumed.step()
        fresh_opt.step()
        fresh.step()


def test_warm_start_takes_the_stage_weights_of_a_cascade_with_the_same_network(tmp_path):
    from diffusion_core.cascade import Cascade
    from diffusion_core.training.loop import warm_start_weights

    preset = load_preset("tiny")
    torch.manual_seed(5)
    source = Cascade.from_config(preset.cascade)
    source.save(tmp_path / "champion")
    cfg = preset.for_stage("sr1", init_weights=str(tmp_path / "champion"))
    weights = warm_start_weights(cfg)
    expected = source["sr1"].network.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    # another network (wider) cannot warm-start this one: say which fields differ
    wider = preset.cascade.model_copy(
        update={"stages": (preset.cascade.stages[0].model_copy(update={"network": preset.cascade.stages[0].network.model_copy(update={"base_channels": 16})}),) + preset.cascade.stages[1:]}
    )
    Cascade.from_config(wider).save(tmp_path / "wider")
    with pytest.raises(ValueError, match="cannot warm-start stage 'base'.*base_channels"):
        warm_start_weights(preset.for_stage("base", init_weights=str(tmp_path / "wider")))
    with pytest.raises(ValueError, match="cannot warm-start"):
        warm_start_weights(preset.for_stage("base", init_weights=str(tmp_path / "nothing")))


def test_export_writes_the_longest_loadable_prefix_of_stages(tmp_path):
    from diffusion_core.cascade import Cascade, Stage

    preset = load_preset("tiny")
    out = tmp_path / "cascade"
    ckpts = {}
    for name in preset.stage_names:
        stage = Stage(preset.for_stage(name).stage_config)
        d = tmp_path / name
        save_checkpoint(
            d,
            network=stage.network,
            ema=EMA(stage.network, 0.9),
            optimizer=make_optimizer(stage.network, lr=1e-3, weight_decay=0, betas=(0.9, 0.99)),
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), lambda s: 1.0
            ),
            state={"step": 1},
        )
        ckpts[name] = d
    # the SR stage first: not loadable yet (no base), so no cascade.json
    export_stage(ckpts["sr1"], out, cascade=preset.cascade, stage="sr1", lineage={"run": "b"})
    assert not (out / "cascade.json").exists()
    export_stage(ckpts["base"], out, cascade=preset.cascade, stage="base", lineage={"run": "a"})
    cascade = Cascade.load(out)
    assert [s.name for s in cascade] == ["base", "sr1"]
    training = json.loads((out / "training.json").read_text())
    assert training["stages"]["base"]["run"] == "a" and training["stages"]["sr1"]["run"] == "b"
    other = preset.cascade.model_copy(update={"text_max_tokens": 4})
    with pytest.raises(ValueError, match="different cascade"):
        export_stage(ckpts["base"], out, cascade=other, stage="base")
