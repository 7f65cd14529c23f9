"""Training and DDIM-50 sampling throughput of our U-Net against diffusers' ``UNet2DModel``.

Both networks are built to the same widths, depths, attention resolutions, head width and FiLM
("scale_shift") time conditioning, so their forward FLOPs per image agree (checked: within 10%,
both counts printed, counted with ``torch.utils.flop_counter.FlopCounterMode``). They are measured
side by side in one process, in interleaved rounds (ours, theirs, ours, ...), with the same
training step (MSE to the noise, backward, AdamW) and the same inputs; the table reports the best
round of each, and the ratios ours/diffusers.

Sampling: ours through ``diffusion_core.sampling.sample(method="ddim", steps=50)``, diffusers
through its ``DDIMScheduler`` loop (50 steps), both under ``torch.inference_mode``.

Peak memory of a training step: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU (whose
allocator keeps no statistics) parameters + optimizer state + the peak of the live tensors the step
allocates, tracked op by op with a dispatch mode (:class:`TensorMemory`).

    python benchmarks/unet_throughput.py                         # CPU preset, a few seconds each
    python benchmarks/unet_throughput.py --preset ddpm-cifar --device cuda --bf16 \
        --channels-last --compile                                # the H100 reference setting

diffusers is a benchmark-only dependency (``pip install -e '.[bench]'``); the library never
imports it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from diffusion_core.nn import UNet, UNetConfig
from diffusion_core.sampling import sample as ddim_sample
from diffusion_core.schedule import NoiseSchedule

PRESETS: dict[str, dict] = {
    # Small enough for two shared CPU cores: ~0.76 GFLOP per 32x32 image.
    "cpu": dict(
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        head_channels=32,
        norm_groups=32,
        batch=8,
        sample_batch=4,
        iters=2,
        rounds=5,
    ),
    # diffusers' DDPM-CIFAR10 network (Ho et al.): 128-256-256-256, attention at 16x16, one head.
    "ddpm-cifar": dict(
        image_size=32,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        head_channels=256,
        norm_groups=32,
        batch=128,
        sample_batch=512,
        iters=10,
        rounds=5,
    ),
}


@dataclass
class Net:
    name: str
    module: torch.nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_ours(cfg: UNetConfig) -> torch.nn.Module:
    return UNet(cfg)


def build_diffusers(cfg: UNetConfig) -> torch.nn.Module:
    from diffusers import UNet2DModel

    down = tuple(
        "AttnDownBlock2D" if cfg.attention_at(i) else "DownBlock2D" for i in range(cfg.levels)
    )
    up = tuple(
        "AttnUpBlock2D" if cfg.attention_at(i) else "UpBlock2D" for i in reversed(range(cfg.levels))
    )
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=cfg.widths,
        layers_per_block=cfg.depths[0],
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.head_channels,
        norm_num_groups=cfg.norm_groups,
        resnet_time_scale_shift="scale_shift",
        add_attention=cfg.mid_attention,
        dropout=cfg.dropout,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def wrap(name: str, module: torch.nn.Module, compile_: bool) -> Net:
    fn = torch.compile(module) if compile_ else module
    if name == "ours":
        return Net(name, module, lambda z, t: fn(z, t))
    return Net(name, module, lambda z, t: fn(z, t, return_dict=False)[0])


def count_flops(net: Net, cfg: UNetConfig, device: str) -> int:
    z = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.module(z, t) if net.name == "ours" else net.module(z, t, return_dict=False)
    return counter.get_total_flops()


def clock(args) -> float:
    return time.process_time() if args.clock == "process" else time.perf_counter()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(args) -> object:
    if not args.bf16:
        return nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)


def make_batch(cfg: UNetConfig, batch: int, args, seed: int):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    z, noise, t = z.to(args.device), noise.to(args.device), t.to(args.device)
    if args.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
        noise = noise.contiguous(memory_format=torch.channels_last)
    return z, t, noise


def train_steps(net: Net, opt: torch.optim.Optimizer, data, n: int, args) -> None:
    z, t, noise = data
    for _ in range(n):
        with autocast(args):
            out = net.forward(z, t)
        loss = F.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def prepare(name: str, cfg: UNetConfig, args) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = (build_ours if name == "ours" else build_diffusers)(cfg).to(args.device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    module.train()
    net = wrap(name, module, args.compile)
    return net, torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)


def peak_memory_cuda(net: Net, opt, data, args) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_steps(net, opt, data, 2, args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


class TensorMemory(TorchDispatchMode):
    """Bytes of tensors allocated under this mode that are still alive, and their peak.

    Counts every new (non-aliasing) output of every op, forward and backward, and subtracts it
    when its storage is freed: the tensor memory a training step needs beyond what existed
    before it. Only used on the CPU, where the allocator keeps no statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliased = [r.alias_info is not None for r in func._schema.returns]
        seen: set[int] = set()
        for i, t in enumerate(tree_leaves(out)):
            if not isinstance(t, torch.Tensor) or (i < len(aliased) and aliased[i]):
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes


def _state_bytes(module: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(module.parameters()) + [
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_cpu(net: Net, opt: torch.optim.Optimizer, data, args) -> float:
    """Parameters + optimizer state + the peak of everything a training step allocates (MiB)."""
    train_steps(net, opt, data, 1, args)  # optimizer state exists from here on
    for p in net.module.parameters():
        p.grad = None
    with TensorMemory() as mem:
        train_steps(net, opt, data, 1, args)
    return (_state_bytes(net.module, opt) + mem.peak) / 2**20


def ddim_ours(net: Net, cfg: UNetConfig, n: int, args) -> torch.Tensor:
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator(args.device).manual_seed(0)
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    return ddim_sample(
        lambda z, t: net.forward(z, t), shape, schedule, method="ddim", steps=50, generator=g
    )


def ddim_diffusers(net: Net, cfg: UNetConfig, n: int, args) -> torch.Tensor:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(50, device=args.device)
    g = torch.Generator(args.device).manual_seed(0)
    z = torch.randn(
        n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=args.device
    )
    for t in scheduler.timesteps:
        eps = net.forward(z, t.expand(n))
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


def time_sampling(net: Net, cfg: UNetConfig, args) -> float:
    fn = ddim_ours if net.name == "ours" else ddim_diffusers
    net.module.eval()
    with torch.inference_mode(), autocast(args):
        if args.compile or args.device.startswith("cuda"):
            fn(net, cfg, args.sample_batch, args)  # warm-up (compilation, cuDNN autotuning)
        sync(args.device)
        start = clock(args)
        fn(net, cfg, args.sample_batch, args)
        sync(args.device)
    net.module.train()
    return args.sample_batch / (clock(args) - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="network and batch sizes (default: cpu, or ddpm-cifar on CUDA)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="training batch (default: the preset's)")
    p.add_argument("--sample-batch", type=int, help="DDIM-50 batch (default: the preset's)")
    p.add_argument("--iters", type=int, help="training steps per timed round")
    p.add_argument("--rounds", type=int, help="interleaved timed rounds per network")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall time, or this process's CPU time (robust on a CPU shared with other jobs; "
        "img/s are then per CPU-second of all threads)",
    )
    p.add_argument("--no-sampling", action="store_true", help="skip the DDIM-50 measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = p.parse_args()
    preset = dict(
        PRESETS[args.preset or ("ddpm-cifar" if args.device.startswith("cuda") else "cpu")]
    )
    for key in ("batch", "sample_batch", "iters", "rounds"):
        value = preset.pop(key)
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = UNetConfig(**preset)

    names = ("ours", "diffusers")
    nets, opts = {}, {}
    for name in names:
        nets[name], opts[name] = prepare(name, cfg, args)
    flops = {n: count_flops(nets[n], cfg, args.device) for n in names}
    params = {n: sum(q.numel() for q in nets[n].module.parameters()) for n in names}
    flop_ratio = flops["ours"] / flops["diffusers"]
    print(
        f"device={args.device} threads={torch.get_num_threads()} clock={args.clock} bf16={args.bf16} "
        f"channels_last={args.channels_last} compile={args.compile} batch={args.batch}"
    )
    print(f"config: {cfg.model_dump_json()}")
    print(
        f"forward FLOPs per image: ours {flops['ours'] / 1e9:.3f} G, diffusers "
        f"{flops['diffusers'] / 1e9:.3f} G (ratio {flop_ratio:.3f})"
    )
    if abs(flop_ratio - 1.0) > 0.10:
        raise SystemExit("FLOPs per image differ by more than 10%: the comparison is not fair")

    data = make_batch(cfg, args.batch, args, seed=0)
    for name in names:  # warm-up (and compilation)
        train_steps(nets[name], opts[name], data, 2 if args.compile else 1, args)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            sync(args.device)
            start = clock(args)
            train_steps(nets[name], opts[name], data, args.iters, args)
            sync(args.device)
            times[name].append((clock(args) - start) / args.iters)
    train_ips = {n: args.batch / min(times[n]) for n in names}
    train_med = {n: args.batch / statistics.median(times[n]) for n in names}

    memory = {n: float("nan") for n in names}
    if not args.no_memory:
        for name in names:
            if args.device.startswith("cuda"):
                memory[name] = peak_memory_cuda(nets[name], opts[name], data, args)
            else:
                memory[name] = peak_memory_cpu(nets[name], opts[name], data, args)
    sample_ips = {n: float("nan") for n in names}
    if not args.no_sampling:
        for name in names:
            sample_ips[name] = time_sampling(nets[name], cfg, args)

    rows = [
        ("params (M)", {n: params[n] / 1e6 for n in names}, "{:.3f}"),
        ("forward GFLOP / image", {n: flops[n] / 1e9 for n in names}, "{:.3f}"),
        ("train img/s (best round)", train_ips, "{:.1f}"),
        ("train img/s (median)", train_med, "{:.1f}"),
        ("train step peak memory (MiB)", memory, "{:.0f}"),
        (f"DDIM-50 img/s (batch {args.sample_batch})", sample_ips, "{:.2f}"),
    ]
    print()
    print(f"| {'measure':34} | {'ours':>10} | {'diffusers':>10} | {'ours/diffusers':>14} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 16}|")
    for label, values, fmt in rows:
        a, b = values["ours"], values["diffusers"]
        ratio = a / b if b == b and b else float("nan")
        print(f"| {label:34} | {fmt.format(a):>10} | {fmt.format(b):>10} | {ratio:>14.3f} |")


if __name__ == "__main__":
    main()
