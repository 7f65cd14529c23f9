"""Export: a run's EMA weights as one stage of a :class:`~diffusion_core.cascade.Cascade` folder.

:func:`export_stage` writes ``cascade.json`` + ``stages/<name>/`` that ``Cascade.load`` reads.
Stages trained separately (even concurrently) are exported into the same directory;
``cascade.json`` always lists the longest prefix of the configured stages that is present, so the
directory loads at every point and holds the whole cascade once every stage is trained.

``export_dir`` may be an object-store URI (``s3://bucket/cascade``): the stage is written into a
local staging folder and uploaded file by file (each object whole), ``training.json`` and
``cascade.json`` last, so a reader never finds a ``cascade.json`` naming a stage whose weights
are not there yet. The local file lock that serialises concurrent exports does not reach an
object store: there, export the stages of one folder one at a time (``docs/deploy.md``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from diffusion_core.cascade import CASCADE_JSON, CascadeConfig, Stage
from diffusion_core.nn import UNet, save_network
from diffusion_core.storage import exists, is_uri, join, read_json, upload_dir, write_json_atomic
from diffusion_core.training.checkpoint import EMA_FILE

TRAINING_JSON = "training.json"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_export_dir(export_dir: str | Path, cascade: CascadeConfig) -> None:
    """Refuse an export folder that holds stages of a different cascade config."""
    path = join(str(export_dir), TRAINING_JSON)
    if not exists(path):
        return
    held = read_json(path).get("cascade")
    if held not in (None, cascade.model_dump(mode="json")):
        names = [s["name"] for s in held.get("stages", [])]
        raise ValueError(
            f"export folder {export_dir} already holds stages {names} of a different cascade "
            "config; export into an empty folder (--export) or the one of this cascade"
        )


def export_stage(
    checkpoint_dir: str | Path,
    export_dir: str | Path,
    *,
    cascade: CascadeConfig,
    stage: str,
    lineage: Mapping[str, Any] | None = None,
) -> Path | str:
    """Write a checkpoint's EMA weights as stage ``stage`` of the cascade directory ``export_dir``.

    ``training.json`` beside ``cascade.json`` records, per stage, where the weights came from
    (``lineage``: run name, step, dataset version, MLflow run id, ...). Refuses to mix stages of
    different cascades in one directory. Returns ``export_dir`` (a Path, or the URI as given).
    """
    if is_uri(export_dir):
        uri = str(export_dir).rstrip("/")
        check_export_dir(uri, cascade)
        with tempfile.TemporaryDirectory(prefix="cascade-export-") as staging:
            if exists(join(uri, TRAINING_JSON)):  # the other stages' lineage is kept
                write_json_atomic(Path(staging) / TRAINING_JSON, read_json(join(uri, TRAINING_JSON)))
            export_stage(checkpoint_dir, staging, cascade=cascade, stage=stage, lineage=lineage)
            Path(staging, ".export.lock").unlink(missing_ok=True)
            upload_dir(staging, uri, last=(TRAINING_JSON, CASCADE_JSON))
        return uri
    export_dir = Path(export_dir)
    check_export_dir(export_dir, cascade)
    stage_cfg = next(s for s in cascade.stages if s.name == stage)
    network = UNet(stage_cfg.network)
    network.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)), strict=True)
    Stage(stage_cfg, network=network)  # cross-checks network and stage configs
    full = cascade.model_dump(mode="json")
    with _locked(export_dir):
        tpath = export_dir / TRAINING_JSON
        training = json.loads(tpath.read_text()) if tpath.is_file() else {}
        check_export_dir(export_dir, cascade)
        save_network(network, export_dir / "stages" / stage)
        training["cascade"] = full
        training.setdefault("stages", {})[stage] = {
            **dict(lineage or {}),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        present = []
        for s in cascade.stages:
            if s.name not in training["stages"]:
                break
            present.append(s)
        write_json_atomic(tpath, training)
        if present:
            partial = cascade.model_copy(update={"stages": tuple(present)})
            CascadeConfig.model_validate(partial.model_dump())
            write_json_atomic(export_dir / CASCADE_JSON, partial.model_dump(mode="json"))
    return export_dir
