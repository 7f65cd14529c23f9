"""A cascade of diffusion models: a base stage, then super-resolution stages (section 18.6.4).

Figure 18.11: the base U-Net generates a small image from the text condition; each later stage
generates an image of twice (or more) the resolution conditioned on the text and on the previous
stage's output, upsampled and concatenated to its input.

Layout on disk (no pickle)::

    <dir>/cascade.json                      CascadeConfig (stage configs, text encoder id)
    <dir>/stages/<name>/model.safetensors   weights of each stage's network
    <dir>/stages/<name>/config.json         its UNetConfig (checked against cascade.json)
    <dir>/training.json, exports/<name>.json  lineage, per-stage export records (the export's;
                                            not part of the model, not read by load)

``<dir>`` may be an object-store URI: :mod:`diffusion_core.cascade.fetch` makes it local.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_core.cascade.config import (
    CASCADE_JSON,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    TEXT_KEYS,
    CascadeConfig,
    Sampler,
)
from diffusion_core.cascade.fetch import folder_files, folder_hash, local_cascade
from diffusion_core.cascade.images import model_to_images
from diffusion_core.cascade.stage import Stage
from diffusion_core.nn import load_network, save_network

Tensor = torch.Tensor


class Cascade:
    """Ordered stages (base, then super-resolution) sharing one text encoder."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        text_encoder: str | None = "all-MiniLM-L6-v2",
        text_max_tokens: int | None = None,
    ):
        self.stages = list(stages)
        self._config = CascadeConfig(
            stages=tuple(s.config for s in self.stages),
            text_encoder=text_encoder,
            text_max_tokens=text_max_tokens,
        )
        self._encoder: Any = None

    @classmethod
    def from_config(cls, config: CascadeConfig | Mapping[str, Any]) -> Cascade:
        """A cascade with freshly initialised networks."""
        config = CascadeConfig.model_validate(config)
        return cls(
            [Stage(s) for s in config.stages],
            text_encoder=config.text_encoder,
            text_max_tokens=config.text_max_tokens,
        )

    @property
    def config(self) -> CascadeConfig:
        return self._config

    @property
    def resolution(self) -> int:
        return self.stages[-1].resolution

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].network.parameters()).device

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, key: int | str) -> Stage:
        if isinstance(key, int):
            return self.stages[key]
        for s in self.stages:
            if s.name == key:
                return s
        raise KeyError(f"no stage named {key!r}; stages are {[s.name for s in self.stages]}")

    def __repr__(self) -> str:
        chain = " → ".join(f"{s.name}:{s.resolution}px" for s in self.stages)
        return f"Cascade({chain}, text_encoder={self.config.text_encoder!r})"

    def to(self, device: torch.device | str) -> Cascade:
        for s in self.stages:
            s.network.to(device)
        return self

    # ------------------------------------------------------------------ text
    @property
    def is_text_conditioned(self) -> bool:
        return any(s.config.network.text_dim for s in self.stages)

    @property
    def text_encoder(self) -> Any:
        """The text encoder (loaded on first use from ``config.text_encoder``)."""
        if self._encoder is None and self.config.text_encoder is not None:
            from diffusion_core.text import load_text_encoder

            kw = (
                {}
                if self.config.text_max_tokens is None
                else {"max_tokens": self.config.text_max_tokens}
            )
            self.set_text_encoder(load_text_encoder(self.config.text_encoder, **kw))
        return self._encoder

    def set_text_encoder(self, encoder: Any) -> None:
        """Use an already loaded encoder (``.dim``, ``.encode(list[str])``)."""
        dims = {s.config.network.text_dim for s in self.stages} - {None}
        if dims and encoder.dim not in dims:
            raise ValueError(f"text encoder has dim {encoder.dim}, the stages expect {dims.pop()}")
        self._encoder = encoder

    def encode_prompts(self, prompts: Sequence[str], device: Any = None) -> dict[str, Tensor]:
        """``text_pooled``, ``text_tokens``, ``text_mask`` for the prompts ("" is the null condition)."""
        if not self.is_text_conditioned:
            return {}
        enc = self.text_encoder.encode(list(prompts))
        device = self.device if device is None else device
        return {
            key: torch.as_tensor(getattr(enc, key.removeprefix("text_"))).to(device)
            for key in TEXT_KEYS
        }

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        seed: int | Sequence[int] = 0,
        guidance_scale: float | Sequence[float] = 3.0,
        sampler: Sampler = DEFAULT_SAMPLER,
        steps: int | Sequence[int] = DEFAULT_STEPS,
        eta: float = 0.0,
        clip_x: float | None = 1.0,
        labels: Tensor | Sequence[int] | None = None,
        negative_prompts: Sequence[str] | None = None,
        per_image: bool = False,
        return_all_stages: bool = False,
        progress: bool = False,
    ) -> Tensor | list[Tensor]:
        """Generate one image per prompt through every stage; uint8 [N, H, W, 3].

        - ``seed``: one int for the whole batch, or one per prompt. Per-prompt seeds draw each
          image's initial noise and augmentation noise from its own generator, so with a
          deterministic sampler (``ddim`` with ``eta=0``, ``dpmsolver++``) an image depends only
          on its prompt and seed, not on the rest of the batch (up to float rounding).
        - ``guidance_scale``: classifier-free guidance weight s (one, or one per stage):
          eps = eps_null + s (eps_cond - eps_null); 1 is the plain conditional model (one forward
          per step), 0 the unconditional one.
        - ``sampler``/``steps``/``eta``: the samplers of :mod:`diffusion_core.sampling`
          (``steps`` one, or one per stage).
        - ``clip_x``: clamp each step's data prediction to [-clip_x, clip_x] (images live in
          [-1, 1]; without it an eps-predictor's x-estimate at the noisiest steps, divided by a
          tiny sqrt(alpha_bar), can throw the trajectory off). ``None`` disables it.
        - ``labels``: class labels for class-conditional stages (-1 = none).
        - ``negative_prompts``: one per prompt; guidance then steers away from it
          (eps = eps_neg + s (eps_cond - eps_neg)); ``""`` or ``None`` is the learned null.
        - ``per_image``: run every image through the networks alone (with its own seed, from
          ``seed``: one per prompt). Batched kernels round differently for different batch
          sizes (measured: a few uint8 pixels differ between a batch of 1 and of 6), so only
          this makes an image a pure function of (prompt, seed, settings), byte for byte,
          whatever else is sampled with it: what the registry model and the batch job use. On
          a CPU it costs ~10% of throughput (``docs/batch.md``).
        - ``return_all_stages``: return every stage's images (a list, base first).
        """
        if per_image:
            if isinstance(seed, int) or isinstance(labels, Tensor):
                raise ValueError("per_image sampling takes one seed per prompt (a list)")
            if len(list(seed)) != len(prompts):
                raise ValueError(f"got {len(list(seed))} seeds for {len(prompts)} prompts")
            negs = list(negative_prompts) if negative_prompts is not None else None
            parts = [
                self.sample(
                    [prompts[i]],
                    seed=[int(list(seed)[i])],
                    guidance_scale=guidance_scale,
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    clip_x=clip_x,
                    labels=None if labels is None else [list(labels)[i]],
                    negative_prompts=None if negs is None else [negs[i]],
                    return_all_stages=True,
                    progress=progress,
                )
                for i in range(len(prompts))
            ]
            stacked = [torch.cat([p[k] for p in parts]) for k in range(len(self.stages))]
            return stacked if return_all_stages else stacked[-1]
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts is empty: give one prompt per image ('' for unconditional)")
        scales = self._per_stage(guidance_scale, "guidance_scale")
        step_counts = self._per_stage(steps, "steps")
        device = self.device
        seeds = [seed] * n if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
        if isinstance(seed, int):
            gens: list[torch.Generator] = [torch.Generator(device).manual_seed(seed)]
        else:
            gens = [torch.Generator(device).manual_seed(s) for s in seeds]
        cond: dict[str, Tensor] = self.encode_prompts(prompts, device)
        if labels is not None:
            cond["label"] = torch.as_tensor(labels, device=device).long()
        null_cond = None
        if negative_prompts is not None:
            if len(negative_prompts) != n:
                raise ValueError(f"got {len(negative_prompts)} negative prompts for {n} prompts")
            if any(p for p in negative_prompts):  # all empty: the learned null, as without them
                null_cond = self.encode_prompts(list(negative_prompts), device)
        outputs: list[Tensor] = []
        low: Tensor | None = None
        for stage, scale, n_steps in zip(self.stages, scales, step_counts, strict=True):
            low = stage.sample(
                cond,
                n,
                low_res=low,
                sampler=sampler,
                steps=n_steps,
                guidance_scale=scale,
                eta=eta,
                clip_x=clip_x,
                generator=gens if len(gens) > 1 else gens[0],
                null_cond=null_cond,
                progress=progress,
            )
            outputs.append(low)
        images = [model_to_images(x) for x in outputs]
        return images if return_all_stages else images[-1]

    def _per_stage(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, Sequence):
            return [value] * len(self.stages)
        if len(value) != len(self.stages):
            raise ValueError(
                f"{name} takes one value or one per stage ({len(self.stages)}), got {list(value)}"
            )
        return list(value)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``cascade.json`` and every stage's safetensors + config into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            save_network(stage.network, directory / "stages" / stage.name)
        text = json.dumps(self.config.model_dump(mode="json"), indent=2, sort_keys=True)
        (directory / CASCADE_JSON).write_text(text + "\n")
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> Cascade:
        """Load a cascade written by :meth:`save` or the export (no pickle); configs are
        cross-checked. ``directory`` may be a URI (``s3://bucket/cascade``): it is fetched into
        a verified local cache first (:func:`diffusion_core.cascade.fetch.local_cascade`;
        ``cache_dir`` default ``$CASCADE_MODEL_CACHE``, else ~/.cache/cascade-diffusion/cascades)."""
        directory = local_cascade(directory, cache_dir=cache_dir)
        path = directory / CASCADE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"no {CASCADE_JSON} in {directory}: not a saved cascade")
        config = CascadeConfig.model_validate_json(path.read_text())
        stages = []
        for sc in config.stages:
            net = load_network(
                directory / "stages" / sc.name, expected_config=sc.network, device=device
            )
            stages.append(Stage(sc, network=net))  # type: ignore[arg-type]
        return cls(stages, text_encoder=config.text_encoder, text_max_tokens=config.text_max_tokens)


def cascade_files(directory: str | Path) -> list[str]:
    """The files of a cascade folder that :meth:`Cascade.load` reads, relative and sorted:
    ``cascade.json`` and ``stages/<name>/*`` of every stage it lists (``ValueError`` if any is
    missing). A URI is fetched first (:func:`~diffusion_core.cascade.fetch.local_cascade`)."""
    return folder_files(local_cascade(directory))


def content_hash(directory: str | Path) -> str:
    """sha256 over the (path, sha256) of every file :func:`cascade_files` lists: names the
    weights and configs, not where they lie or when they were exported (the registry's identity
    of a cascade, and what an evaluation report records). A URI is fetched first."""
    return folder_hash(local_cascade(directory))
