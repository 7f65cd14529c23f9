"""Sources never read outside themselves: symlinks, escaping manifest paths, URLs, huge files.

Real files, real symlinks, a real FIFO, a sparse 5 GB file, real tars; the local engine with the
hash test encoder. The Ray job runs the same inputs in tests/integration/test_ingest.py.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import tracemalloc
from pathlib import Path

import fsspec
import pytest
import webdataset as wds

from diffusion_core.data.images import Rejected
from diffusion_core.data.ingest import IngestConfig, ingest
from diffusion_core.data.reasons import Reason
from diffusion_core.data.safety import ReadPolicy, read_file, resolve_manifest_path, walk_local
from diffusion_core.data.sources import plan, read_unit
from diffusion_core.data.tario import iter_tar
from tests import data_fixtures as F


def _ingest(tmp_path: Path, sources, **kw):
    cfg = IngestConfig(
        sources=[str(s) for s in sources],
        out=str(tmp_path / "out"),
        resolution=16,
        min_size=16,
        shard_size=4,
        text_encoder="hash-test",
        max_tokens=4,
        **kw,
    )
    res = ingest(cfg, engine="local")
    assert res.read == res.accepted + res.rejected
    rejected = [
        json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().split("\n") if x
    ]
    assert len(rejected) == res.rejected
    urls = [str(tmp_path / "out" / s["name"]) for s in res.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else []
    return res, {r["source"]: r for r in rejected}, {s["__key__"]: s for s in samples}


def _rows(unit, policy=None):
    return [(r.source, r.reason) for r in read_unit(unit, policy)]


# ------------------------------------------------------------------------------ folder sources


def test_a_symlinked_caption_is_not_followed(tmp_path):
    """The defect: ``a.txt -> /elsewhere/secret.txt`` put the secret into a shard."""
    outside = F.outside_secrets(tmp_path / "outside")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(F.png())
    (src / "a.txt").symlink_to(outside / "secret.txt")
    (src / "b.png").write_bytes(F.png())
    (src / "b.txt").write_text("a real caption")
    res, rejected, samples = _ingest(tmp_path, [src])
    assert set(samples) == {"b"}
    assert rejected["src/a.txt"]["reason"] == "symlink"
    assert "secret.txt" in rejected["src/a.txt"]["detail"]
    assert rejected["src/a.png"]["reason"] == "missing_caption"
    assert (res.read, res.accepted, res.rejected) == (3, 1, 2)


def test_symlinked_images_and_subfolders_are_not_followed(tmp_path):
    outside = F.outside_secrets(tmp_path / "outside")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "ok.png").write_bytes(F.png())
    (src / "ok.txt").write_text("fine")
    (src / "sub" / "img.png").symlink_to(outside / "secret.png")
    (src / "sub" / "img.txt").write_text("an image behind a link")
    (src / "linked").symlink_to(outside, target_is_directory=True)  # holds x.png + x.txt
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert walk_local(str(src)) == (
        ["ok.png", "ok.txt", "sub/img.txt"],
        ["dangling.png", "linked", "sub/img.png"],
    )
    res, rejected, samples = _ingest(tmp_path, [src])
    assert set(samples) == {"ok"}
    assert {s: r["reason"] for s, r in rejected.items()} == {
        "src/dangling.png": "symlink",
        "src/linked": "symlink",
        "src/sub/img.png": "symlink",
        "src/sub/img.txt": "missing_image",
    }
    assert res.read == 5


def test_a_folder_swapped_for_a_symlink_after_planning_is_refused(tmp_path):
    """Reads open each path component with O_NOFOLLOW: a link made after ``plan`` is refused."""
    outside = F.outside_secrets(tmp_path / "outside")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.png").write_bytes(F.png())
    (src / "sub" / "x.txt").write_text("planned")
    (units,) = plan([str(src)])
    (src / "sub" / "x.png").unlink()
    (src / "sub" / "x.txt").unlink()
    (src / "sub").rmdir()
    (src / "sub").symlink_to(outside, target_is_directory=True)  # holds x.png + x.txt too
    ((source, reason),) = _rows(units)
    assert (source, reason) == ("src/sub/x.png", Reason.SYMLINK)
    # and a file replaced by a link
    (src / "sub").unlink()
    (src / "sub").mkdir()
    (src / "sub" / "x.png").symlink_to(outside / "x.png")
    (src / "sub" / "x.txt").write_text("planned")
    assert _rows(units) == [("src/sub/x.png", Reason.SYMLINK)]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe.png")  # opening it for reading would block forever
    (src / "pipe.txt").write_text("a fifo")
    t = time.perf_counter()
    res, rejected, _ = _ingest(tmp_path, [src])
    assert rejected["src/pipe.png"]["reason"] == "special_file"
    assert time.perf_counter() - t < 30


def test_the_source_itself_may_be_a_symlink(tmp_path):
    """The user named it; only what lies below it is never followed."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(F.png())
    (real / "a.txt").write_text("through the named link")
    (tmp_path / "named").symlink_to(real, target_is_directory=True)
    res, _, samples = _ingest(tmp_path, [tmp_path / "named"])
    assert res.accepted == 1 and json.loads(samples["a"]["json"])["source"] == "named/a.png"


# ------------------------------------------------------------------------------ the size cap


def test_a_sparse_5gb_file_is_refused_by_its_size_unread(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    F.sparse(src / "huge.png")
    (src / "huge.txt").write_text("huge")
    (src / "small.png").write_bytes(F.png())
    (src / "small.txt").write_text("small")
    units = plan([str(src)])
    tracemalloc.start()
    try:
        with pytest.raises(Rejected) as e:
            read_file({"root": str(src), "rel": "huge.png"}, 64 * 2**20)
        rows = [r for u in units for r in read_unit(u)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == Reason.FILE_TOO_LARGE and str(F.HUGE) in e.value.detail
    assert [r.reason for r in rows] == [Reason.FILE_TOO_LARGE, None]
    assert peak < 2**20  # not one of the 5 GB (nor a 64 MiB buffer) was read
    res, rejected, samples = _ingest(tmp_path, [src])
    assert rejected["src/huge.png"]["reason"] == "file_too_large"
    assert f"{F.HUGE} bytes" in rejected["src/huge.png"]["detail"]
    assert set(samples) == {"small"} and res.read == 2


def test_the_cap_applies_to_captions_and_is_configurable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(F.png())
    (src / "a.txt").write_text("x" * 5000)
    res, rejected, _ = _ingest(tmp_path, [src], max_file_bytes=4096)
    assert rejected["src/a.png"]["reason"] == "file_too_large"
    assert rejected["src/a.png"]["detail"].startswith("caption: 5000 bytes")


def test_a_tar_member_over_the_cap_is_skipped_by_its_header(tmp_path):
    big = 3_000_000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        F.add(tf, "a.png", b"\0" * big)
        F.add(tf, "a.txt", b"cap")
        F.add(tf, "b.txt", b"after")
    data = buf.getvalue()
    tracemalloc.start()
    try:
        members = list(iter_tar(io.BytesIO(data), max_member_bytes=1_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(m.name, m.reason) for m in members] == [
        ("a.png", Reason.FILE_TOO_LARGE),
        ("a.txt", None),
        ("b.txt", None),
    ]
    assert f"{big} bytes" in members[0].detail and members[0].data is None
    assert members[2].data == b"after"
    assert peak < 1_000_000  # streamed past, never held
    # cut inside the skipped member: still reported as a truncated tar
    cut = list(iter_tar(io.BytesIO(data[: 512 + big // 2]), max_member_bytes=1_000_000))
    assert [m.reason for m in cut] == [Reason.FILE_TOO_LARGE, Reason.TRUNCATED_TAR]


# ------------------------------------------------------------------------------ manifests


def _manifest(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "list.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_manifest_paths_resolve_from_the_manifest_folder_and_stay_in_it(tmp_path):
    """The defect: ``../x.png``, absolute paths and URLs were all read."""
    outside = F.outside_secrets(tmp_path / "outside")
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    (ds / "img" / "a.png").write_bytes(F.png())
    (ds / "img" / "inner.png").symlink_to(ds / "img" / "a.png")  # a link that stays inside
    (ds / "img" / "out.png").symlink_to(outside / "secret.png")
    m = _manifest(
        ds,
        [
            {"path": "img/a.png", "caption": "relative", "key": "rel"},
            {"path": str(ds / "img" / "a.png"), "caption": "absolute inside", "key": "abs"},
            {"path": "img/inner.png", "caption": "a link inside", "key": "inner"},
            {"path": "../outside/secret.png", "caption": "dot-dot", "key": "up"},
            {"path": str(outside / "secret.png"), "caption": "absolute", "key": "abs_out"},
            {"path": f"file://{outside / 'secret.png'}", "caption": "file URL", "key": "furl"},
            {"path": "img/out.png", "caption": "a link out", "key": "link_out"},
            {"path": "memory://x/secret.png", "caption": "a URL", "key": "url"},
        ],
    )
    # the manifest file itself is the source, so images may lie beside it
    res, rejected, samples = _ingest(tmp_path, [m])
    assert set(samples) == {"rel", "abs", "inner"}
    assert {s: r["reason"] for s, r in rejected.items()} == {
        f"list.jsonl#{i}": "unsafe_path" for i in range(4, 9)
    }
    assert "through a symlink" in rejected["list.jsonl#7"]["detail"]
    assert "--allow-remote" in rejected["list.jsonl#8"]["detail"]
    # no absolute location in a detail the row did not give (rejected.jsonl is content)
    assert (
        str(tmp_path) not in rejected["list.jsonl#4"]["detail"] + rejected["list.jsonl#7"]["detail"]
    )


def test_allow_roots_and_allow_remote_let_the_user_widen_it(tmp_path):
    outside = F.outside_secrets(tmp_path / "outside")
    mem = fsspec.filesystem("memory")
    mem.pipe("/cd-test/remote.png", F.png())
    try:
        m = _manifest(
            tmp_path / "ds",
            [
                {"path": str(outside / "secret.png"), "caption": "allowed root", "key": "a"},
                {"path": "../outside/x.png", "caption": "allowed root too", "key": "b"},
                {"path": "memory://cd-test/remote.png", "caption": "remote", "key": "c"},
            ],
        )
        res, rejected, samples = _ingest(tmp_path, [m], allow_roots=[str(outside)])
        assert set(samples) == {"a", "b"} and rejected["list.jsonl#3"]["reason"] == "unsafe_path"
        (tmp_path / "out").rename(tmp_path / "out1")
        res, rejected, samples = _ingest(tmp_path, [m], allow_remote=True)
        assert set(samples) == {"c"} and len(rejected) == 2
        (tmp_path / "out").rename(tmp_path / "out2")
        # a URL prefix as an allowed root admits URLs under it only
        res, rejected, samples = _ingest(tmp_path, [m], allow_roots=["memory://cd-test/"])
        assert set(samples) == {"c"}
    finally:
        mem.rm("/cd-test", recursive=True)


def test_a_remote_manifest_stays_in_its_folder():
    mem = fsspec.filesystem("memory")
    mem.pipe("/cd-remote/ds/img/a.png", F.png())
    mem.pipe("/cd-remote/secret.png", F.png())
    rows = [
        {"path": "img/a.png", "caption": "inside", "key": "a"},
        {"path": "../secret.png", "caption": "outside", "key": "b"},
        {"path": "memory://cd-remote/secret.png", "caption": "a URL outside", "key": "c"},
    ]
    mem.pipe("/cd-remote/ds/list.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        units = plan(["memory://cd-remote/ds/list.jsonl"])
        got = [(r.key, r.reason, r.image is not None) for u in units for r in read_unit(u)]
        assert got == [
            ("a", None, True),
            ("b", Reason.UNSAFE_PATH, False),
            ("c", Reason.UNSAFE_PATH, False),
        ]
    finally:
        mem.rm("/cd-remote", recursive=True)


def test_resolve_manifest_path_unit(tmp_path):
    base = {"root": str(tmp_path)}
    policy = ReadPolicy()
    assert resolve_manifest_path("a/b.png", base, policy) == {
        "root": str(tmp_path),
        "rel": "a/b.png",
    }
    for bad in ("../b.png", "/etc/passwd", "a/../../b.png", "https://x/y.png", "s3://b/k.png"):
        with pytest.raises(Rejected) as e:
            resolve_manifest_path(bad, base, policy)
        assert e.value.reason == Reason.UNSAFE_PATH, bad
    with pytest.raises(Rejected) as e:
        resolve_manifest_path(".", base, policy)
    assert e.value.reason == Reason.SPECIAL_FILE
    assert resolve_manifest_path("s3://b/k.png", base, ReadPolicy(allow_remote=True)) == {
        "url": "s3://b/k.png"
    }


def test_config_safety_options(tmp_path, monkeypatch):
    cfg = IngestConfig(sources=["x"], out=str(tmp_path))
    assert (cfg.max_file_bytes, cfg.allow_roots, cfg.allow_remote, cfg.overwrite) == (
        64 * 2**20,
        [],
        False,
        False,
    )
    # relative roots are made absolute on the driver (Ray workers run elsewhere)
    monkeypatch.chdir(tmp_path)
    cfg = IngestConfig(sources=["x"], out="o", allow_roots=["imgs", "file:///a/b", "s3://b/p/"])
    assert cfg.allow_roots == [str(tmp_path / "imgs"), "/a/b", "s3://b/p/"]
    assert cfg.policy == ReadPolicy(allow_roots=tuple(cfg.allow_roots))
    with pytest.raises(ValueError, match="empty path"):
        IngestConfig(sources=["x"], out="o", allow_roots=[""])
    with pytest.raises(ValueError, match="max_file_bytes"):
        IngestConfig(sources=["x"], out="o", max_file_bytes=0)
