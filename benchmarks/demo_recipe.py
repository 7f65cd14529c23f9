"""The demo recipe: faithfulness against training minutes, side by side, in one process.

Each recipe is a preset (``demo`` today, or a YAML file) plus overrides. Both stages are trained
here, in-process (no Ray: ``torch`` gets the machine's threads, as the two 1-thread Ray workers
of ``make demo`` do between them), on the built-in shapes rendered as ingest stores them (128 px
drawn, Lanczos to 32 px). EMA snapshots are taken at a few fractions of each stage's steps; each
snapshot pair (base at fraction f, sr1 at f) is one row: training minutes so far, faithfulness of
the shapes checker on ``--eval`` held-out captions (samples drawn from scene indices the training
data never uses), and diagnostics that split the error between the stages:

- ``base+bicubic``: the base stage's 16 px samples, upsampled bicubically (the base stage alone);
- ``real16+sr``: the real images' 16 px versions through the SR stage (the SR stage alone).

Faithfulness is a rate over captions: its standard error is ~6 points at 64 captions and ~1.6
at 1024 (the default; 1024 cost ~40 s with UniPC-10 on 2 threads). Two trainings compared on 64
captions can differ by 8 points by chance (docs/training.md, run 4).

Not run by the tests. Run it twice at once with ``--threads 1``, one recipe each, for a side by
side at equal load (what docs/training.md reports), or once with both recipes (the default);
``--score`` trains nothing and scores exported cascades (what ``make demo`` wrote) on the same
captions::

    .venv/bin/python benchmarks/demo_recipe.py --out out/benchmarks/demo_recipe.md
    .venv/bin/python benchmarks/demo_recipe.py --recipe "a=demo base.train.steps=2400" \\
        --fractions 0.5,1.0 --threads 1 --extra-samplers ddpm:50 --grids out/benchmarks/grids
    .venv/bin/python benchmarks/demo_recipe.py --score out/cascades/*/
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_core.cascade import Cascade, Stage
from diffusion_core.cascade.config import DEFAULT_SAMPLER, DEFAULT_STEPS
from diffusion_core.data.images import center_crop_resize
from diffusion_core.data.shapes import generate
from diffusion_core.evaluation.faithfulness import CHECKER_VERSION, check_caption
from diffusion_core.training.config import TrainConfig, TrainPreset, load_preset
from diffusion_core.training.optim import EMA, LRFactor, make_optimizer
from diffusion_core.training.step import training_step

EVAL_START = 1_000_000  # held-out scene indices: far from any training index
# the demo preset before issue 13 (as overrides of today's), then today's
RECIPES = [
    "before=demo base.stage.snr_gamma=null sr1.stage.snr_gamma=null "
    "sr1.network.attention_resolutions=[] base.train.steps=1200 sr1.train.steps=800",
    "demo=demo",
]


@dataclass
class Data:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    captions: list[str]
    text: dict[str, np.ndarray] = field(default_factory=dict)


def shapes_data(count: int, start: int, resolution: int) -> Data:
    """Scenes ``start..start+count-1`` of seed 0, as ingest stores them."""
    images, captions = [], []
    for _i, caption, img, _scene, _placed in generate(count, seed=0, size=128, start=start):
        images.append(np.asarray(center_crop_resize(img, resolution)))
        captions.append(caption)
    return Data(np.stack(images), captions)


def encode(data: Data, encoder: Any, cache: Path | None) -> None:
    """Text embeddings of every caption (cached per distinct caption in ``cache``)."""
    store: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            store = {k: z[k] for k in z.files}
    known = {c: i for i, c in enumerate(store.get("captions", np.array([], str)).tolist())}
    new = sorted({c for c in data.captions if c not in known})
    if new:
        enc = encoder.encode(new)
        rows = {"pooled": enc.pooled, "tokens": enc.tokens, "mask": enc.mask}
        if known:
            rows = {k: np.concatenate([store[k], v]) for k, v in rows.items()}
        store = {**rows, "captions": np.array([*known, *new])}
        known = {c: i for i, c in enumerate(store["captions"].tolist())}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **store)
    idx = np.array([known[c] for c in data.captions])
    data.text = {f"text_{k}": store[k][idx] for k in ("pooled", "tokens", "mask")}


def text_cache(prefix: str | None, encoder: str | None, max_tokens: int | None) -> Path | None:
    """The embedding cache file of one text encoder setting (None: no cache)."""
    return Path(f"{prefix}.{encoder or ''}.{max_tokens}.npz") if prefix else None


# ------------------------------------------------------------------------------ recipes


def apply_overrides(preset: TrainPreset, sets: list[str]) -> TrainPreset:
    """``STAGE.train.FIELD=V`` (a training setting of one stage), ``STAGE.stage.FIELD=V`` (the
    stage config), ``STAGE.network.FIELD=V``, ``cascade.FIELD=V``, ``train.FIELD=V`` (all
    stages); values are YAML."""
    import yaml

    raw = preset.model_dump(mode="json")
    for item in sets:
        key, value = item.split("=", 1)
        v = yaml.safe_load(value)
        parts = key.split(".")
        if parts[0] == "train":
            raw["train"][parts[1]] = v
        elif parts[0] == "cascade":
            raw["cascade"][parts[1]] = v
        else:
            name, where, fld = parts
            stage = next(s for s in raw["cascade"]["stages"] if s["name"] == name)
            if where == "train":
                raw["stages"].setdefault(name, {})[fld] = v
            elif where == "stage":
                stage[fld] = v
            elif where == "network":
                stage["network"][fld] = v
            else:
                raise ValueError(f"bad override {item!r}")
    return TrainPreset.model_validate(raw)


def train_stage(
    cfg: TrainConfig, data: Data, fractions: list[float], seed: int = 0
) -> list[tuple[float, float, dict[str, torch.Tensor]]]:
    """Train one stage; return ``(fraction, seconds so far, EMA state)`` at each fraction."""
    torch.manual_seed(cfg.seed + seed)
    stage = Stage(cfg.stage_config)
    opt = make_optimizer(stage.network, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         betas=cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRFactor(cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.lr_min_ratio)
    )
    ema = EMA(stage.network, cfg.ema_decay, cfg.ema_warmup)
    rng = np.random.default_rng(cfg.seed + seed)
    gen = torch.Generator().manual_seed(cfg.seed + seed)
    marks = sorted({max(1, round(f * cfg.steps)) for f in fractions})
    out, elapsed, n = [], 0.0, len(data.images)
    perm, pos = rng.permutation(n), 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        batch = {"image": data.images[idx], **{k: v[idx] for k, v in data.text.items()}}
        t = time.perf_counter()
        training_step(stage, batch, opt, generator=gen, max_grad_norm=cfg.grad_clip)
        sched.step()
        ema.update(stage.network)
        elapsed += time.perf_counter() - t
        if step in marks:
            out.append((step / cfg.steps, elapsed, copy.deepcopy(ema.state_dict())))
    return out


# ------------------------------------------------------------------------------ evaluation


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _score(images: np.ndarray, captions: list[str]) -> float:
    return float(np.mean([check_caption(i, c).match for i, c in zip(images, captions, strict=True)]))


def _reasons(images: np.ndarray, captions: list[str]) -> dict[str, int]:
    """Why samples fail, coarsely: wrong object count, wrong attributes, wrong relation."""
    out: dict[str, int] = {}
    for img, cap in zip(images, captions, strict=True):
        r = check_caption(img, cap)
        if not r.match:
            kind = ("count" if "objects, caption" in r.reason
                    else "relation" if "is not" in r.reason else "attributes")
            out[kind] = out.get(kind, 0) + 1
    return out


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), c), 128, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * (h + 2) : r * (h + 2) + h, q * (w + 2) : q * (w + 2) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), 0).save(path)


def evaluate_cascade(
    cascade: Cascade,
    held: Data,
    *,
    sampler: str,
    steps: int,
    guidance: float,
    diagnostics: bool = True,
    batch: int = 32,
    save: Path | None = None,
) -> dict[str, Any]:
    """Faithfulness of the cascade (and, with ``diagnostics``, of each stage alone) on the
    held-out captions; ``save``: write the samples (``.npz``, re-scorable) and a grid (``.png``)."""
    full, base_up, sr_real = [], [], []
    base, sr = cascade.stages
    kw: dict[str, Any] = {"sampler": sampler, "steps": steps, "guidance_scale": guidance}
    for lo in range(0, len(held.captions), batch):
        n = len(held.captions[lo : lo + batch])
        cond = {k: torch.as_tensor(v[lo : lo + batch]) for k, v in held.text.items()}
        gen = torch.Generator().manual_seed(lo)
        x16 = base.sample(cond, n, generator=gen, **kw)
        full.append(_to_uint8(sr.sample(cond, n, low_res=x16, generator=gen, **kw)))
        if diagnostics:
            real = torch.as_tensor(held.images[lo : lo + batch]).permute(0, 3, 1, 2) / 127.5 - 1
            real16 = F.interpolate(real.float(), size=(base.resolution,) * 2, mode="area")
            sr_real.append(_to_uint8(sr.sample(cond, n, low_res=real16, generator=gen, **kw)))
            base_up.append(_to_uint8(_upsample(x16, sr.resolution)))
    caps = held.captions
    arrays = {"full": np.concatenate(full)}
    if diagnostics:
        arrays.update({"base_bicubic": np.concatenate(base_up), "real16_sr": np.concatenate(sr_real)})
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(f"{save}.npz", captions=np.array(caps), **arrays)
        save_grid(arrays["full"][:32], Path(f"{save}.png"))
    out: dict[str, Any] = {"reasons": _reasons(arrays["full"], caps)}
    out["faithfulness"] = _score(arrays["full"], caps)
    if diagnostics:
        out["base+bicubic"] = _score(arrays["base_bicubic"], caps)
        out["real16+sr"] = _score(arrays["real16_sr"], caps)
    return out


def _parse_runs(text: str, guidance: float) -> list[tuple[str, int, float]]:
    """``sampler:steps[:guidance],...`` (the guidance scale defaults to ``--guidance``)."""
    out = []
    for r in filter(None, text.split(",")):
        sampler, steps, *g = r.split(":")
        out.append((sampler, int(steps), float(g[0]) if g else guidance))
    return out


def run_recipe(
    preset: TrainPreset, train: Data, held: Data, fractions: list[float], args: argparse.Namespace
) -> list[dict[str, Any]]:
    cfgs = {name: preset.for_stage(name) for name in preset.stage_names}
    snaps = {name: train_stage(cfg, train, fractions) for name, cfg in cfgs.items()}
    rows = []
    for i, f in enumerate(sorted(fractions)):
        stages = []
        seconds = 0.0
        for name, cfg in cfgs.items():
            _, sec, state = snaps[name][i]
            st = Stage(cfg.stage_config)
            st.network.load_state_dict(state)
            stages.append(st)
            seconds += sec
        cascade = Cascade(stages, text_encoder=preset.cascade.text_encoder,
                          text_max_tokens=preset.cascade.text_max_tokens)
        last = i == len(fractions) - 1
        if last and args.weights:
            Path(args.weights).parent.mkdir(parents=True, exist_ok=True)
            torch.save({n: snaps[n][i][2] for n in cfgs}, args.weights)
        runs = [(args.sampler, args.steps, args.guidance)]
        runs += _parse_runs(args.extra_samplers, args.guidance) if last else []
        for j, (sampler, steps, guidance) in enumerate(runs):
            t = time.perf_counter()
            stem = f"{args.tag}_f{round(100 * f)}_{sampler}{steps}_cfg{guidance:g}"
            save = Path(args.grids) / stem if args.grids else None
            m = evaluate_cascade(cascade, held, sampler=sampler, steps=steps,
                                 guidance=guidance, diagnostics=last and j == 0, save=save)
            rows.append({"fraction": f, "minutes": seconds / 60,
                         "sampler": f"{sampler}-{steps} CFG {guidance:g}",
                         **m, "eval_s": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def score_cascades(paths: list[str], held: Data, args: argparse.Namespace) -> str:
    """Faithfulness (and the per-stage diagnostics) of already exported cascades, e.g. the one
    ``make demo`` trained, on the same held-out captions as the recipes."""
    lines = [
        f"checker {CHECKER_VERSION}; {len(held.captions)} held-out captions from scene "
        f"{args.eval_start}; {args.sampler}-{args.steps}, CFG {args.guidance}",
        "",
        "| cascade | faithfulness | base+bicubic | real16+sr |",
        "|---|---:|---:|---:|",
    ]
    for path in paths:
        cascade = Cascade.load(path)
        cache = text_cache(args.cache, cascade.config.text_encoder, cascade.config.text_max_tokens)
        encode(held, cascade.text_encoder, cache)
        m = evaluate_cascade(cascade, held, sampler=args.sampler, steps=args.steps,
                             guidance=args.guidance)
        print(json.dumps({"cascade": path, **m}), flush=True)
        lines.append(f"| `{path}` | {m['faithfulness']:.1%} | {m['base+bicubic']:.1%} | "
                     f"{m['real16+sr']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--recipe", action="append", default=None,
        help="'LABEL=PRESET [override ...]' (repeatable; overrides as in apply_overrides)",
    )
    ap.add_argument("--set", action="append", default=[], help="override (every recipe)")
    ap.add_argument("--count", type=int, default=4000, help="training scenes")
    ap.add_argument("--eval", type=int, default=1024,
                    help="held-out captions (standard error ~1.6 points at 1024, ~6 at 64)")
    ap.add_argument("--eval-start", type=int, default=EVAL_START,
                    help="scene index of the first held-out caption")
    ap.add_argument("--fractions", default="0.25,0.5,1.0")
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--extra-samplers", default="",
                    help="sampler:steps[:guidance],... evaluated at the last point too")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="out/benchmarks/demo_recipe_text.npz")
    ap.add_argument("--grids", default=None, help="save a sample grid per row in this folder")
    ap.add_argument("--tag", default="run", help="grid file prefix")
    ap.add_argument("--weights", default=None, help="save the final EMA weights (torch.save)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--score", nargs="+", default=None, metavar="CASCADE",
                    help="train nothing: score these exported cascades (folders or URIs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]

    t = time.perf_counter()
    held = shapes_data(args.eval, args.eval_start, 32)
    if args.score:
        table = score_cascades(args.score, held, args)
        print(table)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(table + "\n")
        return
    train = shapes_data(args.count, 0, 32)
    labels, presets = [], []
    for spec in args.recipe or RECIPES:
        label, _, rest = spec.partition("=")
        name, *sets = rest.split()
        labels.append(label)
        presets.append(apply_overrides(load_preset(name), [*sets, *args.set]))
    from diffusion_core.text import load_text_encoder

    encoders: dict[tuple[str, int | None], Any] = {}
    for p in presets:
        key = (p.cascade.text_encoder or "", p.cascade.text_max_tokens)
        if key not in encoders:
            kw = {} if key[1] is None else {"max_tokens": key[1]}
            encoders[key] = load_text_encoder(key[0], **kw)
    print(f"data: {args.count} + {args.eval} scenes in {time.perf_counter() - t:.0f} s", flush=True)

    lines = [
        f"checker {CHECKER_VERSION}; {args.eval} held-out captions; {args.sampler}-{args.steps}, "
        f"CFG {args.guidance}; {args.count} training scenes; overrides {args.set or 'none'}",
        "",
        "| recipe | fraction | train min | sampler | faithfulness | base+bicubic | real16+sr |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for label, p in zip(labels, presets, strict=True):
        key = (p.cascade.text_encoder or "", p.cascade.text_max_tokens)
        cache = text_cache(args.cache, *key)
        encode(train, encoders[key], cache)
        encode(held, encoders[key], cache)
        for r in run_recipe(p, train, held, fractions, args):
            diag = [f"{r[k]:.0%}" if k in r else "–" for k in ("base+bicubic", "real16+sr")]
            lines.append(
                f"| {label} | {r['fraction']:.2f} | {r['minutes']:.1f} | "
                f"{r['sampler']} | {r['faithfulness']:.0%} | {' | '.join(diag)} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
