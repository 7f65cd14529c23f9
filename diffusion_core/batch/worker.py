"""The sampler actor of the batch job: loads the cascade once, writes one PNG per plan row.

Every image is sampled alone (``Cascade.sample(..., per_image=True)``), from its own seed, so it
is a pure function of (model version, prompt, negative prompt, seed, sampler settings) — byte for
byte, whatever the batch size, the actor count or the order (``docs/batch.md``). Files are
written atomically (:class:`~diffusion_core.batch.output.Output`: a local folder or an object
store), and a row whose image already exists is not sampled again (its file is hashed instead):
that is how a killed job resumes. With ``--format webdataset`` the images go to ``.staging/``
until the driver packs their shard (:mod:`~diffusion_core.batch.shards`).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pyarrow as pa

from diffusion_core.batch.output import Output
from diffusion_core.cascade.images import png_bytes

RESULT_SCHEMA = pa.schema(
    [
        ("index", pa.uint64()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.uint64()),
        ("file", pa.string()),
        ("sha256", pa.string()),
        ("seconds", pa.float64()),
        ("resumed", pa.bool_()),
        ("warning", pa.string()),
    ]
)


def image_name(image_id: str, folder: str = "images") -> str:
    """Where an image is written, relative to the output (``images/`` or ``.staging/``)."""
    return f"{folder}/{image_id}.png"


class CascadeSampler:
    """A Ray Data callable class (``map_batches(CascadeSampler, compute=ActorPoolStrategy(...))``)."""

    def __init__(
        self,
        model_dir: str,
        out: str,
        settings: dict[str, Any],
        torch_threads: int = 1,
        folder: str = "images",
    ):
        import torch

        from diffusion_core.cascade import Cascade

        # One intra-op thread per CPU of the actor's share: more threads than cores make
        # actors (and the driver) fight over the same cores (docs/batch.md, "Speed").
        torch.set_num_threads(torch_threads)
        self.cascade = Cascade.load(model_dir)
        self.output = Output(out)
        self.folder = folder
        self.settings = dict(settings)
        enc = self.cascade.text_encoder if self.cascade.is_text_conditioned else None
        self.max_tokens = getattr(enc, "max_tokens", None)

    def _warning(self, prompt: str) -> str:
        if self.max_tokens is None or not prompt:
            return ""
        n = int(self.cascade.text_encoder.encode([prompt]).lengths[0])
        if n > self.max_tokens:
            return f"prompt truncated: the text encoder keeps {self.max_tokens} of {n} tokens"
        return ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = []
        for r in rows:
            name = image_name(r["id"], self.folder)
            t0 = time.perf_counter()
            resumed = self.output.exists(name)
            if resumed:
                png = self.output.read_bytes(name)
            else:
                png = self.generate(r["prompt"], r["negative_prompt"], int(r["seed"]))
                self.output.write_bytes(name, png)
            out.append(
                {
                    "index": int(r["index"]),
                    "id": r["id"],
                    "prompt": r["prompt"],
                    "negative_prompt": r["negative_prompt"],
                    "seed": int(r["seed"]),
                    "file": name,
                    "sha256": hashlib.sha256(png).hexdigest(),
                    "seconds": time.perf_counter() - t0,
                    "resumed": resumed,
                    "warning": self._warning(r["prompt"]),
                }
            )
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def generate(self, prompt: str, negative_prompt: str, seed: int) -> bytes:
        s = self.settings
        images = self.cascade.sample(
            [prompt],
            seed=[seed],
            negative_prompts=[negative_prompt] if negative_prompt else None,
            sampler=s["sampler"],
            steps=s["num_inference_steps"],
            guidance_scale=s["guidance_scale"],
            per_image=True,
        )
        return png_bytes(images[0])  # type: ignore[index]
