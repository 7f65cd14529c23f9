"""Every sampler on CUDA, with a CPU or a CUDA ``torch.Generator`` (skipped without a GPU).

The model is the exact noise predictor of Gaussian data N(MU, S^2 I), written with device-agnostic
tensor ops: E[eps | z_t] = sqrt(1-ab) (z_t - sqrt(ab) MU) / (ab S^2 + 1 - ab) (eq. 18.8).
"""

from __future__ import annotations

import pytest
import torch

from diffusion_core.sampling import (
    classifier_free_guidance,
    run_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmsolver_pp,
)
from diffusion_core.sampling.noise import randn
from diffusion_core.schedule import NoiseSchedule

pytestmark = pytest.mark.gpu

SCHEDULE = NoiseSchedule.linear(1000)
MU, S = 0.3, 0.5
SHAPE = (8, 3, 4, 4)
SAMPLERS = [  # (method, options, stochastic)
    ("ddpm", {}, True),
    ("ddpm", {"variance": "learned"}, True),
    ("ddim", {}, False),
    ("ddim", {"eta": 0.5}, True),
    ("dpmsolver++", {}, False),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o, _ in SAMPLERS]


def _eps(z_t, t, y=None):
    ab = SCHEDULE.alpha_bar.to(z_t.device)[t].to(z_t.dtype).reshape(-1, 1, 1, 1)
    mu = MU if y is None else MU + 0.1 * torch.as_tensor(y, device=z_t.device).reshape(-1, 1, 1, 1)
    return (1 - ab).sqrt() * (z_t - ab.sqrt() * mu) / (ab * S**2 + 1 - ab)


def _learned(z_t, t):
    return torch.cat([_eps(z_t, t), torch.tanh(z_t)], dim=1)


def _model_for(options):
    return _learned if options.get("variance") == "learned" else _eps


def _cpu_gen(seed):
    return torch.Generator().manual_seed(seed)


def _cuda_gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


GENERATORS = pytest.mark.parametrize(
    "make_gen", [_cpu_gen, _cuda_gen], ids=["cpu-generator", "cuda-generator"]
)


@GENERATORS
@pytest.mark.parametrize("method, options, stochastic", SAMPLERS, ids=IDS)
def test_cuda_sampling_is_deterministic_per_seed(make_gen, method, options, stochastic):
    """A CPU generator with a CUDA model does not raise; either generator fixes the result."""
    model = _model_for(options)
    kw = dict(method=method, steps=10, device="cuda", **options)
    x = sample(model, SHAPE, SCHEDULE, generator=make_gen(0), **kw)
    assert x.device.type == "cuda" and x.shape == SHAPE and bool(x.isfinite().all())
    assert torch.equal(x, sample(model, SHAPE, SCHEDULE, generator=make_gen(0), **kw))
    assert not torch.equal(x, sample(model, SHAPE, SCHEDULE, generator=make_gen(1), **kw))
    # From given CUDA noise, the steps' noise from the generator.
    del kw["device"]
    z = randn(SHAPE, make_gen(2), device="cuda")
    y = run_sampler(model, z, SCHEDULE, generator=make_gen(3), **kw)
    assert torch.equal(y, run_sampler(model, z, SCHEDULE, generator=make_gen(3), **kw))
    if stochastic:
        assert not torch.equal(y, run_sampler(model, z, SCHEDULE, generator=make_gen(4), **kw))


def test_a_cuda_generator_sets_the_default_device():
    x = sample(_eps, SHAPE, SCHEDULE, method="ddpm", steps=3, generator=_cuda_gen(0))
    assert x.device.type == "cuda"


@pytest.mark.parametrize("method, options, stochastic", SAMPLERS, ids=IDS)
def test_cpu_generator_gives_the_cpu_result_on_cuda(method, options, stochastic):
    """A CPU generator draws the same numbers for either device, so CUDA and CPU agree up to
    float rounding."""
    model = _model_for(options)
    kw = dict(method=method, steps=10, dtype=torch.float64, **options)
    on_cpu = sample(model, SHAPE, SCHEDULE, generator=_cpu_gen(5), device="cpu", **kw)
    on_cuda = sample(model, SHAPE, SCHEDULE, generator=_cpu_gen(5), device="cuda", **kw)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-9, atol=1e-9)


@GENERATORS
def test_sample_functions_and_guidance_on_cuda(make_gen):
    z = torch.randn(SHAPE, generator=_cpu_gen(6)).cuda()
    guided = classifier_free_guidance(_eps, 2.0, {"y": 0})
    y = torch.ones(SHAPE[0], device="cuda")
    grad = lambda z_t, t, **_: -z_t  # noqa: E731  (the score of N(0, I), any device)
    for fn in (sample_ddpm, sample_ddim, sample_dpmsolver_pp):
        extra = {"eta": 1.0} if fn is sample_ddim else {}
        gen = {} if fn is sample_dpmsolver_pp else {"generator": make_gen(7)}
        x = fn(guided, z, SCHEDULE, 6, y=y, grad_log_prob=grad, classifier_scale=0.5,
               clip_x=1.0, **gen, **extra)  # fmt: skip
        assert x.device.type == "cuda" and bool(x.isfinite().all()) and x.abs().max() <= 1.0
