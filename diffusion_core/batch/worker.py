"""The sampler actor of the batch job: loads the cascade once, writes one PNG per plan row.

Every image is sampled alone (``Cascade.sample(..., per_image=True)``), from its own seed, so it
is a pure function of (model version, prompt, negative prompt, seed, sampler settings) — byte for
byte, whatever the batch size, the actor count or the order (``docs/batch.md``). Files are
written atomically (``storage.write_bytes_atomic``), and a row whose image already exists is not
sampled again (its file is hashed instead): that is how a killed job resumes.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import pyarrow as pa

from diffusion_core.cascade.images import png_bytes
from diffusion_core.storage import write_bytes_atomic

RESULT_SCHEMA = pa.schema(
    [
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


def image_path(out: str, image_id: str) -> str:
    return os.path.join(out, "images", f"{image_id}.png")


class CascadeSampler:
    """A Ray Data callable class (``map_batches(CascadeSampler, compute=ActorPoolStrategy(...))``)."""

    def __init__(self, model_dir: str, out: str, settings: dict[str, Any], torch_threads: int = 1):
        import torch

        from diffusion_core.cascade import Cascade

        torch.set_num_threads(torch_threads)
        self.cascade = Cascade.load(model_dir)
        self.out = out
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
            path = image_path(self.out, r["id"])
            t0 = time.perf_counter()
            resumed = os.path.exists(path)
            if resumed:
                with open(path, "rb") as f:
                    png = f.read()
            else:
                png = self.generate(r["prompt"], r["negative_prompt"], int(r["seed"]))
                write_bytes_atomic(path, png)
            out.append(
                {
                    "id": r["id"],
                    "prompt": r["prompt"],
                    "negative_prompt": r["negative_prompt"],
                    "seed": int(r["seed"]),
                    "file": os.path.relpath(path, self.out),
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
