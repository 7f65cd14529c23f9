"""Noise for the samplers: drawn on the generator's device, moved to the data's, fixed by the seed.

CUDA refuses ``torch.randn(..., generator=g, device=d)`` when ``g`` lives elsewhere than ``d``.
These tests run without a GPU: they check where the helper draws, and run every sampler on the
``meta`` device under a ``torch.randn`` that enforces CUDA's rule
(``tests/gpu/test_sampling_gpu.py`` runs the real thing).
"""

from __future__ import annotations

import pytest
import torch

from diffusion_core.sampling import run_sampler, sample
from diffusion_core.sampling.noise import randn, randn_like
from diffusion_core.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(100)
SAMPLERS = [  # (method, options, stochastic)
    ("ddpm", {}, True),
    ("ddpm", {"variance": "beta"}, True),
    ("ddpm", {"variance": "learned"}, True),
    ("ddim", {"eta": 0.0}, False),
    ("ddim", {"eta": 0.5}, True),
    ("dpmsolver++", {}, False),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o, _ in SAMPLERS]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(z_t, t):
    return 0.1 * z_t + 1e-3 * t.to(z_t.dtype).reshape(-1, *([1] * (z_t.ndim - 1)))


def _learned(z_t, t):
    return torch.cat([_model(z_t, t), torch.tanh(z_t)], dim=1)


def _model_for(options):
    return _learned if options.get("variance") == "learned" else _model


@pytest.fixture
def draws(monkeypatch):
    """Record every ``torch.randn`` call's (generator device, device it draws on), and refuse a
    draw on another device than its generator's, as CUDA does."""
    real, seen = torch.randn, []

    def strict(*args, generator=None, device=None, **kwargs):
        where = torch.device("cpu") if device is None else torch.device(device)
        if generator is not None:
            seen.append((generator.device, where))
            if where != generator.device:
                raise RuntimeError(f"a generator on {generator.device} cannot draw on {where}")
        return real(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", strict)
    return seen


def test_noise_is_drawn_on_the_generators_device_then_moved(draws):
    x = randn((3, 2), _gen(0), device="meta", dtype=torch.float64)
    assert draws == [(torch.device("cpu"), torch.device("cpu"))]
    assert x.device.type == "meta" and x.dtype == torch.float64 and x.shape == (3, 2)
    # Without a device the draw stays on the generator's; without a generator on the device.
    assert randn((2,), _gen(0)).device == torch.device("cpu")
    assert randn((2,), None, device="meta").device.type == "meta"
    like = randn_like(torch.empty(4, 1, device="meta", dtype=torch.float16), _gen(1))
    assert like.device.type == "meta" and like.dtype == torch.float16 and like.shape == (4, 1)


def test_noise_is_a_function_of_the_seed():
    expected = torch.randn(5, 3, generator=_gen(7), dtype=torch.float64)
    assert torch.equal(randn((5, 3), _gen(7), device="cpu", dtype=torch.float64), expected)
    assert torch.equal(randn_like(expected, _gen(7)), expected)
    assert not torch.equal(randn((5, 3), _gen(8), dtype=torch.float64), expected)


@pytest.mark.parametrize("method, options, stochastic", SAMPLERS, ids=IDS)
def test_every_sampler_takes_a_generator_on_another_device(method, options, stochastic, draws):
    """The CUDA failure, reproduced on CPU: data on 'meta', a CPU generator, CUDA's rule."""
    model = _model_for(options)
    kw = dict(method=method, steps=5, generator=_gen(0), **options)
    x = sample(model, (4, 2, 3, 3), SCHEDULE, device="meta", **kw)
    assert x.device.type == "meta" and x.shape == (4, 2, 3, 3)
    # z_T, then one draw per stochastic step but the last (Algorithm 18.2 returns the mean).
    assert len(draws) == 1 + (4 if stochastic else 0)
    draws.clear()
    z = torch.empty(4, 2, 3, 3, device="meta")
    assert run_sampler(model, z, SCHEDULE, **kw).device.type == "meta"
    assert len(draws) == (4 if stochastic else 0)
    assert all(gen == where for gen, where in draws)


@pytest.mark.parametrize("method, options, stochastic", SAMPLERS, ids=IDS)
def test_deterministic_per_seed(method, options, stochastic):
    model = _model_for(options)

    def run(z_seed, step_seed):
        z = torch.randn(8, 2, 3, 3, generator=_gen(z_seed), dtype=torch.float64)
        return run_sampler(
            model, z, SCHEDULE, method=method, steps=6, generator=_gen(step_seed), **options
        )

    a = run(0, 1)
    assert torch.equal(a, run(0, 1))
    assert not torch.equal(a, run(2, 1))  # another z_T
    assert torch.equal(a, run(0, 3)) is not stochastic  # the steps' noise matters iff stochastic
    # sample() draws z_T from the generator first, then the steps' noise from the same one.
    g = _gen(4)
    z = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    expected = run_sampler(model, z, SCHEDULE, method=method, steps=6, generator=g, **options)
    drawn = sample(model, (8, 2, 3, 3), SCHEDULE, method=method, steps=6, generator=_gen(4),
                   dtype=torch.float64, **options)  # fmt: skip
    assert torch.equal(drawn, expected)
