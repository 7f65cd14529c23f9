"""Export: a run's EMA weights as one stage of a :class:`~diffusion_core.cascade.Cascade` folder.

:func:`export_stage` writes ``stages/<name>/`` and the index files ``cascade.json`` and
``training.json`` that ``Cascade.load`` and the registry read. Stages trained separately (even
concurrently) are exported into the same folder; ``cascade.json`` always lists the longest prefix
of the configured stages that is present, so the folder loads at every point and holds the whole
cascade once every stage is trained.

No read-modify-write of a shared file: each stage writes its own record,
``exports/<name>.json`` (the cascade config, the stage's lineage, the size and sha256 of each of
its files), after its weights. The index files are then *derived* from all the records present
(:func:`derive_index`) and written, and read back: a writer that finds them different from what
the records say (another stage's writer overwrote them with an older view) writes them again
(:func:`publish_index`). Every writer re-reads after its own last write, and publishes its record
before its first index write, so whichever index write lands last was followed by a check that
saw every record: the index converges to all stages present. This needs only what every
S3-compatible store guarantees (strong read-after-write consistency, last writer wins: AWS S3
since 2020, MinIO, SeaweedFS, Ceph RGW; also GCS and local disks), no lock and no conditional
write (``docs/deploy.md``, "Cascades on object storage"). A local folder is also serialised by a
file lock, as before.

``export_dir`` may be an object-store URI (``s3://bucket/cascade``): the stage is written into a
local staging folder and uploaded file by file (each object whole), then its record, then the
index: a reader never finds a ``cascade.json`` naming a stage whose weights are not all there.
Two exports of the *same* stage at once are not made safe (the weights of one and the record of
the other may remain: a loader then refuses the sha256 mismatch).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from diffusion_core.cascade import CASCADE_JSON, CascadeConfig, Stage
from diffusion_core.cascade.fetch import EXPORTS_DIR, RECORD_VERSION, TRAINING_JSON, record_name
from diffusion_core.nn import UNet, save_network
from diffusion_core.storage import (
    exists,
    is_uri,
    join,
    listdir,
    read_json,
    upload_dir,
    write_json_atomic,
)
from diffusion_core.training.checkpoint import EMA_FILE


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _different(export_dir: str | Path, held: Mapping[str, Any]) -> ValueError:
    names = [st.get("name") for st in held.get("stages", [])]
    return ValueError(
        f"export folder {export_dir} already holds stages {names} of a different cascade "
        "config; export into an empty folder (--export) or the one of this cascade"
    )


def _records(export_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The per-stage export records under ``exports/`` ({stage name: record})."""
    out: dict[str, dict[str, Any]] = {}
    for name in listdir(join(str(export_dir), EXPORTS_DIR)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            record = read_json(join(str(export_dir), EXPORTS_DIR, name))
        except FileNotFoundError:
            continue
        if isinstance(record, dict) and record.get("stage") == name.removesuffix(".json"):
            out[record["stage"]] = record
    return out


def check_export_dir(export_dir: str | Path, cascade: CascadeConfig) -> None:
    """Refuse an export folder that holds stages of a different cascade config (its
    ``training.json`` or any stage's export record says so)."""
    full = cascade.model_dump(mode="json")
    path = join(str(export_dir), TRAINING_JSON)
    if exists(path):
        held = read_json(path).get("cascade")
        if held not in (None, full):
            raise _different(export_dir, held)
    for record in _records(export_dir).values():
        if record.get("cascade") != full:
            raise _different(export_dir, record.get("cascade") or {})


def derive_index(
    export_dir: str | Path, cascade: CascadeConfig
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(training.json, cascade.json or None)`` as the stage records in ``export_dir`` say:
    ``training.json`` holds the cascade config and every recorded stage's lineage (stages in a
    ``training.json`` written before records existed are kept), ``cascade.json`` the longest
    prefix of the configured stages that has been exported (None: not even the first one)."""
    full = cascade.model_dump(mode="json")
    stages: dict[str, Any] = {}
    tpath = join(str(export_dir), TRAINING_JSON)
    if exists(tpath):
        held = read_json(tpath)
        if held.get("cascade") not in (None, full):
            raise _different(export_dir, held["cascade"])
        stages.update(held.get("stages") or {})  # legacy entries; the records override them
    for name, record in _records(export_dir).items():
        if record.get("cascade") != full:
            raise _different(export_dir, record.get("cascade") or {})
        stages[name] = dict(record.get("lineage") or {})
    present = []
    for s in cascade.stages:
        if s.name not in stages:
            break
        present.append(s)
    index = None
    if present:
        partial = cascade.model_copy(update={"stages": tuple(present)})
        index = CascadeConfig.model_validate(partial.model_dump()).model_dump(mode="json")
    return {"cascade": full, "stages": dict(sorted(stages.items()))}, index


def _read_or_none(uri: str) -> Any:
    try:
        return read_json(uri)
    except FileNotFoundError:
        return None


PUBLISH_ROUNDS = 20


def publish_index(export_dir: str | Path, cascade: CascadeConfig) -> dict[str, Any] | None:
    """Write ``training.json`` then ``cascade.json`` as :func:`derive_index` says, until a read
    back after this writer's last write agrees with the records (see the module docstring).
    Returns the cascade.json written (None when the first stage is not exported yet)."""
    root = str(export_dir)
    for _ in range(PUBLISH_ROUNDS):
        training, index = derive_index(root, cascade)
        held_training = _read_or_none(join(root, TRAINING_JSON))
        held_index = _read_or_none(join(root, CASCADE_JSON))
        if held_training == training and (index is None or held_index == index):
            return index
        if held_training != training:
            write_json_atomic(join(root, TRAINING_JSON), training)
        if index is not None and held_index != index:
            write_json_atomic(join(root, CASCADE_JSON), index)
    raise RuntimeError(
        f"the index of export folder {root} did not settle in {PUBLISH_ROUNDS} rounds: other "
        "exports keep rewriting it (or the store is not read-after-write consistent)"
    )


def _file_records(root: Path, folder: str) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(p for p in (root / folder).iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[f"{folder}/{f.name}"] = {"size": f.stat().st_size, "sha256": digest.hexdigest()}
    return out


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
    (``lineage``: run name, step, dataset version, MLflow run id, ...); ``exports/<stage>.json``
    the same plus the size and sha256 of the stage's files (what a loader checks them against).
    Refuses to mix stages of different cascades in one directory. Returns ``export_dir`` (a
    Path, or the URI as given).
    """
    remote = is_uri(export_dir)
    root: str | Path = str(export_dir).rstrip("/") if remote else Path(export_dir)
    check_export_dir(root, cascade)
    stage_cfg = next(s for s in cascade.stages if s.name == stage)
    network = UNet(stage_cfg.network)
    network.load_state_dict(load_file(str(Path(checkpoint_dir) / EMA_FILE)), strict=True)
    Stage(stage_cfg, network=network)  # cross-checks network and stage configs
    folder = f"stages/{stage}"
    record: dict[str, Any] = {
        "format_version": RECORD_VERSION,
        "stage": stage,
        "cascade": cascade.model_dump(mode="json"),
        "lineage": {
            **dict(lineage or {}),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    if remote:
        with tempfile.TemporaryDirectory(prefix="cascade-export-") as staging:
            save_network(network, Path(staging) / folder)
            record["files"] = _file_records(Path(staging), folder)
            upload_dir(staging, str(root))  # the weights, each object whole
        write_json_atomic(join(str(root), record_name(stage)), record)  # then the record
        publish_index(root, cascade)  # then the index, cascade.json last
        return str(root)
    assert isinstance(root, Path)
    with _locked(root):
        check_export_dir(root, cascade)
        save_network(network, root / folder)
        record["files"] = _file_records(root, folder)
        write_json_atomic(root / record_name(stage), record)
        publish_index(root, cascade)
    return root
