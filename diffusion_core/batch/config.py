"""The batch-sampling job's configuration (a CLI / Prefect / job-record boundary object)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffusion_core.cascade.config import DEFAULT_SAMPLER, DEFAULT_STEPS, Sampler
from diffusion_core.storage import absolute, is_uri, redact

PROMPT_EXTENSIONS = ("txt", "jsonl", "csv", "parquet")


class SamplerSettings(BaseModel):
    """How every image is sampled: with the model, what each image is a pure function of."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: Sampler = DEFAULT_SAMPLER
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, le=1000, description="network calls per stage")
    guidance_scale: float = Field(3.0, ge=0.0, le=50.0, description="classifier-free guidance")


class BatchConfig(BaseModel):
    """``cascade sample`` / the ``sample-batch`` flow: prompts in, one image per prompt (or K)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="a cascade folder, or a registry URI (models:/name@alias, models:/name/3)"
    )
    tracking_uri: str | None = Field(
        None, description="the MLflow registry of a models:/ URI (default: $MLFLOW_TRACKING_URI)"
    )
    prompts: list[str] = Field(min_length=1, description="prompt files (.txt .jsonl .csv .parquet)")
    out: str = Field(
        description="output folder: a local path (a shared filesystem on a cluster) or an fsspec "
        "URI (s3://bucket/prefix; credentials from the environment)"
    )
    images_per_prompt: int = Field(1, ge=1, le=1000)
    seed: int = Field(0, ge=0, description="job seed: a row without its own seed derives one")
    settings: SamplerSettings = SamplerSettings()
    batch_size: int = Field(8, ge=1, description="prompts per actor call (throughput only)")
    format: Literal["png", "webdataset"] = Field(
        "png", description="images/<id>.png, or webdataset shards (shards/shard-NNNNNN.tar)"
    )
    shard_size: int = Field(
        1000, ge=1, le=1_000_000, description="images per webdataset shard (part of the job)"
    )
    num_actors: int = Field(1, ge=1, description="sampler actors (each loads the model once)")
    actor_cpus: float = Field(
        0.5, gt=0, description="CPUs per actor; fractional on a small machine (whole-CPU actors "
        "starve the read tasks and hang on 2 cores)"
    )
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per actor (a GPU cluster)")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per actor (default: its CPUs, rounded "
        "down, at least 1: threads beyond the cores it gets spin and slow everything)"
    )
    contact_sheet: int = Field(16, ge=0, le=256, description="images on contact_sheet.png")

    @field_validator("out")
    @classmethod
    def _out(cls, v: str) -> str:
        v = absolute(v)  # file:// becomes a local path; another URI stays as it is
        if is_uri(v) and not v.split("://", 1)[1].strip("/"):
            raise ValueError(f"out={v!r}: give a bucket or folder after the scheme")
        if is_uri(v) and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(f"out={redact(v)!r}: put credentials in the environment, not the URI")
        return v.rstrip("/") if is_uri(v) else v

    @field_validator("prompts")
    @classmethod
    def _known_formats(cls, files: list[str]) -> list[str]:
        for f in files:
            ext = f.rsplit(".", 1)[-1].lower() if "." in f.rsplit("/", 1)[-1] else ""
            if ext not in PROMPT_EXTENSIONS:
                raise ValueError(
                    f"prompts file {f!r}: unknown format {ext!r}; use one of {list(PROMPT_EXTENSIONS)}"
                )
        return [absolute(f) for f in files]
