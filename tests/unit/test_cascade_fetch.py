"""Loading a cascade from a URI (:mod:`diffusion_core.cascade.fetch`) and the export's per-stage
records and derived index (:mod:`diffusion_core.training.export`), on fsspec's in-memory
filesystem (``memory://``: a URI like ``s3://``, in this process). The same against a real S3
server: ``tests/integration/test_object_storage_cascade.py``."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from diffusion_core import storage
from diffusion_core.cascade import Cascade, Stage, cascade_files, content_hash
from diffusion_core.cascade import fetch as fetch_mod
from diffusion_core.cascade.fetch import MANIFEST, CascadeFetchError, local_cascade
from diffusion_core.training import load_preset
from diffusion_core.training.checkpoint import EMA_FILE
from diffusion_core.training.export import derive_index, export_stage, publish_index

PRESET = load_preset("tiny")
PROMPTS = ["a small red circle", "two blue squares"]


def _memory_uri(name: str = "c") -> str:
    return f"memory://fetch-{name}-{secrets.token_hex(4)}"


def _checkpoints(root: Path, seed: int = 0) -> dict[str, Path]:
    """An ``ema.safetensors`` per stage of the tiny preset, weights drawn from ``seed``."""
    torch.manual_seed(seed)
    out = {}
    for name in PRESET.stage_names:
        stage = Stage(PRESET.for_stage(name).stage_config)
        with torch.no_grad():
            for p in stage.network.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = root / f"ckpt-{name}-{seed}"
        d.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in stage.network.state_dict().items()}, str(d / EMA_FILE)
        )
        out[name] = d
    return out


@pytest.fixture
def exported(tmp_path) -> tuple[str, dict[str, Path]]:
    """A whole tiny cascade exported (both stages) into a fresh memory:// folder."""
    ckpts = _checkpoints(tmp_path)
    uri = _memory_uri()
    for name in PRESET.stage_names:
        export_stage(ckpts[name], uri, cascade=PRESET.cascade, stage=name, lineage={"run": name})
    return uri, ckpts


def _sample(cascade: Cascade) -> torch.Tensor:
    return cascade.sample(PROMPTS, seed=[1, 2], steps=3, per_image=True)


def test_a_uri_loads_as_its_downloaded_copy_and_the_cache_is_reused(
    exported, tmp_path, monkeypatch
):
    uri, _ = exported
    cache = tmp_path / "cache"
    local = storage.download(uri, tmp_path / "copy")
    first = local_cascade(uri, cache_dir=cache)
    assert first.parent == cache and (first / MANIFEST).is_file()
    assert content_hash(first) == content_hash(local)
    assert json.loads((first / MANIFEST).read_text())["content_hash"] == content_hash(local)
    assert torch.equal(_sample(Cascade.load(uri, cache_dir=cache)), _sample(Cascade.load(local)))

    opened: list[str] = []
    real_open = storage.open_file
    monkeypatch.setattr(
        storage, "open_file", lambda u, *a, **k: opened.append(u) or real_open(u, *a, **k)
    )
    assert local_cascade(uri, cache_dir=cache) == first
    assert opened == [], "an unchanged export is not downloaded again"
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_a_changed_export_gets_a_new_cache_folder(exported, tmp_path):
    uri, _ = exported
    cache = tmp_path / "cache"
    first = local_cascade(uri, cache_dir=cache)
    other = _checkpoints(tmp_path, seed=7)
    export_stage(other["sr1"], uri, cascade=PRESET.cascade, stage="sr1")
    second = local_cascade(uri, cache_dir=cache)
    assert second != first and content_hash(second) != content_hash(first)
    assert content_hash(second) == content_hash(storage.download(uri, tmp_path / "copy"))


def test_a_damaged_cache_folder_is_replaced_and_a_partial_one_never_used(exported, tmp_path):
    uri, _ = exported
    cache = tmp_path / "cache"
    first = local_cascade(uri, cache_dir=cache)
    want = content_hash(first)
    weights = first / "stages" / "sr1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated in place
    again = local_cascade(uri, cache_dir=cache)
    assert again == first and content_hash(again) == want
    # a download killed half-way leaves a hidden folder, never the keyed one
    (cache / f".tmp-{first.name}-dead").mkdir()
    import shutil

    shutil.rmtree(first)
    assert local_cascade(uri, cache_dir=cache) == first and content_hash(first) == want


def test_an_unfinished_export_is_refused(tmp_path):
    ckpts = _checkpoints(tmp_path)
    uri = _memory_uri("unfinished")
    export_stage(ckpts["sr1"], uri, cascade=PRESET.cascade, stage="sr1")  # no base yet
    assert not storage.exists(storage.join(uri, "cascade.json"))
    with pytest.raises(FileNotFoundError, match="export has not finished"):
        Cascade.load(uri, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no cascade.json"):
        local_cascade(_memory_uri("nothing"), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_a_stage_folder_missing_is_refused(exported, tmp_path):
    uri, _ = exported
    fs, path = storage.filesystem(uri)
    fs.rm(path + "/stages/sr1", recursive=True)
    fs.rm(path + "/exports/sr1.json")
    with pytest.raises(CascadeFetchError, match="stage 'sr1' .* has no files"):
        local_cascade(uri, cache_dir=tmp_path / "cache")


def test_weights_that_do_not_match_their_record_are_refused(exported, tmp_path):
    uri, _ = exported
    fs, path = storage.filesystem(uri)
    key = path + "/stages/base/model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF  # same size, other bytes
    fs.pipe_file(key, bytes(data))
    with pytest.raises(CascadeFetchError, match="changed while it was downloaded"):
        local_cascade(uri, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


@pytest.mark.parametrize(
    "key",
    ["stages/base/../../../escaped", "stages/base/./x", "stages/base/..", "stages/base/a\\..\\b"],
)
def test_hostile_object_keys_are_refused_and_nothing_escapes(exported, tmp_path, key):
    uri, _ = exported
    fs, path = storage.filesystem(uri)
    fs.pipe_file(f"{path}/{key}", b"evil")
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(CascadeFetchError, match="refusing the object name"):
        local_cascade(uri, cache_dir=cache)
    with pytest.raises(ValueError, match="refusing the object name"):
        storage.download(uri, tmp_path / "copy")
    assert not list(tmp_path.rglob("escaped")) and not list(tmp_path.rglob("*evil*"))
    assert [p.name for p in cache.iterdir()] == []


def test_a_hostile_stage_name_or_record_is_refused(exported, tmp_path):
    uri, _ = exported
    fs, path = storage.filesystem(uri)
    config = json.loads(fs.cat_file(path + "/cascade.json"))
    bad = json.loads(json.dumps(config))
    bad["stages"][0]["name"] = ".."  # the name pattern allows dots
    fs.pipe_file(path + "/cascade.json", json.dumps(bad).encode())
    with pytest.raises(CascadeFetchError, match=r"stage name '\.\.' refused"):
        local_cascade(uri, cache_dir=tmp_path / "cache")
    fs.pipe_file(path + "/cascade.json", json.dumps(config).encode())
    record = json.loads(fs.cat_file(path + "/exports/base.json"))
    record["files"]["/etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    fs.pipe_file(path + "/exports/base.json", json.dumps(record).encode())
    with pytest.raises(ValueError, match="absolute"):
        local_cascade(uri, cache_dir=tmp_path / "cache")
    del record["files"]["/etc/passwd"]
    record["files"]["training.json"] = {"size": 1, "sha256": "0" * 64}
    fs.pipe_file(path + "/exports/base.json", json.dumps(record).encode())
    with pytest.raises(CascadeFetchError, match="outside stages/base/"):
        local_cascade(uri, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("rel", ["", "/abs", "a/../b", "..", "./a", "a//b", "a\\b", "C:x", "a\x00"])
def test_safe_relpath_refuses_names_that_could_escape(rel, tmp_path):
    with pytest.raises(ValueError, match="refusing the object name"):
        storage.safe_relpath(rel)
    assert storage.safe_relpath("stages/base/model.safetensors") == "stages/base/model.safetensors"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="resolves outside"):
        storage.local_target(tmp_path / "root", "link/x")


def test_the_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(fetch_mod.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch_mod.default_cache_dir() == tmp_path / "xdg" / "cascade-diffusion" / "cascades"
    monkeypatch.setenv(fetch_mod.CACHE_ENV, str(tmp_path / "mine"))
    assert fetch_mod.default_cache_dir() == tmp_path / "mine"


def test_a_local_folder_is_used_in_place(tmp_path):
    ckpts = _checkpoints(tmp_path)
    out = tmp_path / "cascade"
    for name in PRESET.stage_names:
        export_stage(ckpts[name], out, cascade=PRESET.cascade, stage=name)
    assert local_cascade(out) == out and local_cascade(str(out)) == out
    # the records sit outside stages/: not part of the model or its content hash
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["base.json", "sr1.json"]
    assert not any(f.startswith("exports/") for f in cascade_files(out))
    record = json.loads((out / "exports" / "sr1.json").read_text())
    for rel, info in record["files"].items():
        data = (out / rel).read_bytes()
        import hashlib

        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_the_index_is_derived_from_the_records_and_repaired(tmp_path):
    """What a lost update looks like (another stage's writer overwrote the index with the view
    it had before this stage's record existed): the next publish puts every stage back."""
    ckpts = _checkpoints(tmp_path)
    uri = _memory_uri("index")
    for name in PRESET.stage_names:
        export_stage(ckpts[name], uri, cascade=PRESET.cascade, stage=name, lineage={"run": name})
    whole = storage.read_json(storage.join(uri, "cascade.json"))
    assert [s["name"] for s in whole["stages"]] == ["base", "sr1"]
    stale = dict(whole, stages=whole["stages"][:1])
    storage.write_json_atomic(storage.join(uri, "cascade.json"), stale)
    training = storage.read_json(storage.join(uri, "training.json"))
    storage.write_json_atomic(
        storage.join(uri, "training.json"),
        dict(training, stages={"base": training["stages"]["base"]}),
    )
    assert derive_index(uri, PRESET.cascade)[1] == whole
    assert publish_index(uri, PRESET.cascade) == whole
    assert storage.read_json(storage.join(uri, "cascade.json")) == whole
    assert set(storage.read_json(storage.join(uri, "training.json"))["stages"]) == {"base", "sr1"}


def test_a_legacy_training_json_without_records_is_kept(tmp_path):
    """Folders exported before the records existed: their training.json stages still count."""
    ckpts = _checkpoints(tmp_path)
    out = tmp_path / "cascade"
    export_stage(ckpts["base"], out, cascade=PRESET.cascade, stage="base", lineage={"run": "a"})
    (out / "exports" / "base.json").unlink()  # as the old export left it
    export_stage(ckpts["sr1"], out, cascade=PRESET.cascade, stage="sr1", lineage={"run": "b"})
    training = json.loads((out / "training.json").read_text())
    assert training["stages"]["base"]["run"] == "a" and training["stages"]["sr1"]["run"] == "b"
    assert [s.name for s in Cascade.load(out)] == ["base", "sr1"]


def test_a_record_of_another_cascade_is_refused(tmp_path):
    ckpts = _checkpoints(tmp_path)
    uri = _memory_uri("mixed")
    export_stage(ckpts["base"], uri, cascade=PRESET.cascade, stage="base")
    storage.remove(storage.join(uri, "training.json"))  # only the record says it now
    other = PRESET.cascade.model_copy(update={"text_max_tokens": 4})
    with pytest.raises(ValueError, match="different cascade"):
        export_stage(ckpts["sr1"], uri, cascade=other, stage="sr1")


def test_memory_filesystem_is_what_the_uris_use():
    # the tests above rely on storage.filesystem mapping memory:// to fsspec's in-memory store
    fs, _ = storage.filesystem("memory://x")
    assert isinstance(fs, type(fsspec.filesystem("memory")))
