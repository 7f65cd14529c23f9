"""What only a GPU runs in training: bf16 autocast in the step, NCCL all-reduce of the loss.

Skipped without CUDA (``tests/conftest.py``); the NCCL test needs two GPUs."""

from __future__ import annotations

import pytest
import torch

from diffusion_core.cascade import Stage
from diffusion_core.training import load_preset
from diffusion_core.training.optim import make_optimizer
from diffusion_core.training.step import training_step

pytestmark = pytest.mark.gpu


def _batch(stage: Stage, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    r = stage.resolution * 2 if stage.is_super_resolution else stage.resolution
    dim = stage.config.network.text_dim or 8
    return {
        "image": torch.randint(0, 256, (n, r, r, 3), dtype=torch.uint8, generator=g),
        "text_pooled": torch.randn(n, dim, generator=g),
        "text_tokens": torch.randn(n, 8, dim, generator=g),
        "text_mask": torch.ones(n, 8, dtype=torch.bool),
    }


@pytest.mark.parametrize("stage_name", ["base", "sr1"])
def test_bf16_autocast_step_is_finite_and_close_to_fp32(stage_name):
    cfg = load_preset("tiny").for_stage(stage_name)
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        stage = Stage(cfg.stage_config)
        stage.network.cuda()
        opt = make_optimizer(stage.network, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))
        out = training_step(
            stage,
            _batch(stage),
            opt,
            generator=torch.Generator().manual_seed(1),
            autocast_dtype=dtype,
        )
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["grad_norm"])
        assert out["loss"].dtype == torch.float32  # reported in fp32 whatever the autocast
        # the weights stay fp32 (autocast casts activations, not parameters)
        assert all(p.dtype == torch.float32 for p in stage.network.parameters())
        losses[dtype] = float(out["loss"])
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.05)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")
def test_nccl_all_reduce_of_the_loss_in_a_two_gpu_run(tmp_path, monkeypatch):
    """The loop all-reduces [loss, grad_norm] on the device (NCCL reduces CUDA tensors only)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from diffusion_core.data.ingest import IngestConfig, ingest
    from diffusion_core.data.shapes import write_shapes
    from diffusion_core.training import train

    write_shapes(tmp_path / "raw", 32, seed=1, size=32, shard_size=32)
    ingest(
        IngestConfig(
            sources=[str(tmp_path / "raw")],
            out=str(tmp_path / "data"),
            resolution=16,
            min_size=16,
            text_encoder="hash-test",
            max_tokens=8,
            eval_fraction=0.0,
        ),
        engine="local",
    )
    cfg = load_preset("tiny").for_stage(
        "base",
        storage_path=str(tmp_path / "runs"),
        steps=4,
        scaling={"num_workers": 2, "use_gpu": True},
    )
    r = train(cfg, str(tmp_path / "data"), export_dir=None)
    assert r.completed and r.metrics["loss"] > 0 and len(r.attempts[0]["workers"]) == 2
