"""Saving and loading networks as ``model.safetensors`` + ``config.json`` (no pickle).

``config.json`` is ``{"format_version": 1, "kind": "unet" | "classifier", "config": {...}}``; the
same JSON is stored in the safetensors metadata so a weights file describes itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_core.nn.config import ClassifierConfig, UNetConfig
from diffusion_core.nn.unet import NoisyClassifier, UNet

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

_KINDS: dict[str, tuple[type[nn.Module], type[BaseModel]]] = {
    "unet": (UNet, UNetConfig),
    "classifier": (NoisyClassifier, ClassifierConfig),
}

Network = UNet | NoisyClassifier


def _kind_of(model: nn.Module) -> str:
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"cannot save a {type(model).__name__}; expected one of UNet, NoisyClassifier")


def config_diff(a: BaseModel, b: BaseModel) -> dict[str, tuple[object, object]]:
    """Fields whose values differ between two configs: ``{field: (a_value, b_value)}``."""
    da, db = a.model_dump(), b.model_dump()
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}


def save_network(model: Network, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {
        "format_version": FORMAT_VERSION,
        "kind": _kind_of(model),
        "config": model.config.model_dump(mode="json"),
    }
    text = json.dumps(header, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"cascade_diffusion": text})
    (directory / CONFIG).write_text(text + "\n")
    return directory


def read_network_config(directory: str | Path) -> tuple[str, BaseModel]:
    """The kind and the validated config stored in ``directory/config.json``."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {directory}: not a saved network directory")
    header = json.loads(path.read_text())
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r}; this code reads version {FORMAT_VERSION}"
        )
    kind = header.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path} has kind={kind!r}; expected one of {sorted(_KINDS)}")
    return kind, _KINDS[kind][1].model_validate(header["config"])


def load_network(
    directory: str | Path,
    *,
    expected_config: BaseModel | None = None,
    device: str | torch.device = "cpu",
) -> Network:
    """Build the network described by ``config.json`` and load its safetensors weights.

    ``expected_config``: fail with the differing fields if the saved config is not this one.
    Every parameter and buffer must be present with the right shape (strict loading).
    """
    directory = Path(directory)
    kind, config = read_network_config(directory)
    if expected_config is not None:
        if type(expected_config) is not type(config):
            raise ValueError(
                f"{directory} holds a {kind} ({type(config).__name__}) but a "
                f"{type(expected_config).__name__} was expected"
            )
        diff = config_diff(config, expected_config)
        if diff:
            lines = ", ".join(f"{k}: saved={a!r} expected={b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"config mismatch for the network in {directory}: {lines}")
    model = _KINDS[kind][0](config)
    state = load_file(str(directory / WEIGHTS), device=str(device))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: saved {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights in {directory / WEIGHTS} do not fit the network of its {CONFIG}: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} shape mismatches={wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device)
