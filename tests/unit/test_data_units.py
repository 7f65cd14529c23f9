"""Fast checks of the ingest's parts: tar safety, image guards, source planning, the writer.

The full Ray job on the same inputs is in tests/integration/test_ingest.py; here the single-process
engine runs with the test-only hash text encoder so the fast tier stays fast.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from diffusion_core.data.images import ImageLimits, Rejected, decode_resize
from diffusion_core.data.ingest import IngestConfig, IngestError, ingest, verify
from diffusion_core.data.reasons import Reason
from diffusion_core.data.sources import SourceError, plan, sanitize_key
from diffusion_core.data.tario import iter_tar, split_member_name, write_tar
from tests import data_fixtures as F


def _reasons(members):
    return [(m.name, m.reason) for m in members if m.reason is not None]


def test_iter_tar_refuses_unsafe_members_and_reads_the_rest(tmp_path):
    p = tmp_path / "t.tar"
    with tarfile.open(p, "w") as tf:
        F.add(tf, "ok.txt", b"hello")
        F.add(tf, "/abs.txt", b"x")
        F.add(tf, "a/../../up.txt", b"x")
        F.add(tf, "l.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        F.add(tf, "h.png", type=tarfile.LNKTYPE, linkname="ok.txt")
        F.add(tf, "dev", type=tarfile.CHRTYPE)
        F.add(tf, "d", type=tarfile.DIRTYPE)
        F.add(tf, "ok2.txt", b"world")
    with open(p, "rb") as f:
        members = list(iter_tar(f))
    assert [(m.name, m.data) for m in members if m.reason is None] == [
        ("ok.txt", b"hello"),
        ("ok2.txt", b"world"),
    ]
    assert [r for _, r in _reasons(members)] == [
        Reason.UNSAFE_PATH,
        Reason.UNSAFE_PATH,
        Reason.LINK_MEMBER,
        Reason.LINK_MEMBER,
        Reason.SPECIAL_MEMBER,
    ]
    assert not (tmp_path / "abs.txt").exists() and not (tmp_path.parent / "up.txt").exists()


@pytest.mark.parametrize("cut", ["mid_member", "at_boundary", "header"])
def test_iter_tar_reports_truncation_after_the_intact_members(tmp_path, cut):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        F.add(tf, "a.txt", b"A" * 600)  # 512 header + 1024 data
        F.add(tf, "b.txt", b"B" * 600)
    data = buf.getvalue()
    n = {"mid_member": 1536 + 700, "at_boundary": 1536, "header": 1536 + 100}[cut]
    members = list(iter_tar(io.BytesIO(data[:n])))
    assert members[0].name == "a.txt" and members[0].data == b"A" * 600
    assert members[-1].reason == Reason.TRUNCATED_TAR
    assert len(members) == 2
    # the whole tar is fine
    assert all(m.reason is None for m in iter_tar(io.BytesIO(data)))
    # not a tar at all
    junk = list(iter_tar(io.BytesIO(b"\x01" * 3000)))
    assert [m.reason for m in junk] == [Reason.CORRUPT_TAR]


def test_deterministic_tar_writer(tmp_path):
    a = write_tar(str(tmp_path / "a.tar"), [("k.txt", b"1"), ("k.json", b"{}")])
    b = write_tar(str(tmp_path / "b.tar"), [("k.txt", b"1"), ("k.json", b"{}")])
    assert a == b and (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob(".*"))
    assert split_member_name("dir/abc.emb.npy") == ("dir/abc", "emb.npy")
    assert sanitize_key("sub/a.b c") == "sub_a_b_c"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_FILE),
        (F.noisy_jpeg()[:1500], Reason.CORRUPT_IMAGE),
        (b"plain text" * 10, Reason.NOT_AN_IMAGE),
        (F.truncated_png(), Reason.CORRUPT_IMAGE),
        (F.bomb_png(), Reason.TOO_MANY_PIXELS),
        (F.bomb_png(9000, 9000), Reason.TOO_MANY_PIXELS),  # under Pillow's limit, over ours
        (F.png((20, 100)), Reason.TOO_SMALL),
    ],
)
def test_decode_rejects_bad_images(data, reason):
    with pytest.raises(Rejected) as e:
        decode_resize(data, 32, ImageLimits(min_size=32, max_pixels=50_000_000))
    assert e.value.reason == reason


def test_decode_composites_alpha_on_white_and_centre_crops():
    img, size = decode_resize(F.rgba_png(), 16, ImageLimits())
    a = np.asarray(img)
    assert size == (64, 64) and a.shape == (16, 16, 3)
    assert tuple(a[8, 1]) == (0, 0, 255) and tuple(a[8, 14]) == (255, 255, 255)
    wide = Image.new("RGB", (90, 30), (255, 0, 0))
    wide.paste(Image.new("RGB", (30, 30), (0, 255, 0)), (30, 0))
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    out, _ = decode_resize(buf.getvalue(), 10, ImageLimits(min_size=8))
    assert tuple(np.asarray(out)[5, 5]) == (0, 255, 0)  # the centre square survives the crop


def test_plan_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        plan([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds nothing to ingest"):
        plan([str(tmp_path / "empty")])
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(SourceError, match="a file of type 'bin'"):
        plan([str(tmp_path / "x.bin")])
    with pytest.raises(SourceError, match="no source"):
        plan([])


def _cfg(tmp_path, sources, out="out", **kw):
    return IngestConfig(
        sources=[str(s) for s in sources],
        out=str(tmp_path / out),
        resolution=32,
        shard_size=2,
        text_encoder="hash-test",
        max_tokens=4,
        max_file_bytes=F.MAX_FILE_BYTES,
        **kw,
    )


def test_local_engine_on_every_source_kind(tmp_path):
    """The writer's bookkeeping on all three input kinds, without Ray (the hash test encoder)."""
    expected: dict[str, int] = {}
    for part in (
        F.build_hostile_img2dataset(tmp_path / "i2d"),
        F.build_folder(tmp_path / "folder"),
        F.build_manifests(tmp_path / "manifests", tmp_path / "images"),
    ):
        for k, v in part.items():
            expected[k] = expected.get(k, 0) + v
    sources = [tmp_path / "i2d", f"file://{tmp_path / 'folder'}", tmp_path / "manifests"]
    res = ingest(_cfg(tmp_path, sources, allow_roots=[str(tmp_path / "images")]), engine="local")
    assert res.rejected_by_reason == dict(sorted(expected.items()))
    assert res.accepted == F.HOSTILE_ACCEPTED + 3 + 4
    assert res.read == res.accepted + res.rejected
    manifest = verify(res.out)
    assert manifest["counts"]["read"] == res.read
    assert sum(s["samples"] for s in manifest["shards"]) == res.accepted
    lines = (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()
    assert len(lines) == res.rejected
    assert all(set(json.loads(line)) == {"source", "reason", "detail"} for line in lines)
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == res.accepted
    assert "sub_c_d" in keys and "000000001" in keys
    for s in samples:
        assert set(s) >= {"png", "txt", "json", "emb.npy", "tok.npy"}
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["000000001"]["txt"] == "un café\u0301 bleu".encode()
    meta = json.loads(by_key["000000000"]["json"])
    assert meta["license"] == "CC-BY-4.0" and meta["url"] == "http://x/0.png"
    assert meta["original_width"] == 48 and meta["source"] == "i2d/00000.tar::000000000"
    # nothing escaped the output folder, nothing from outside the sources got in
    assert not list(tmp_path.rglob("evil*"))
    assert not [s for s in samples if b"secret" in s["txt"] or b"behind" in s["txt"]]


def test_bad_output_folder_is_refused(tmp_path):
    F.build_folder(tmp_path / "folder")
    with pytest.raises(IngestError, match="inside the source"):
        ingest(_cfg(tmp_path, [tmp_path / "folder"], out="folder/out"), engine="local")
    with pytest.raises(IngestError, match="does not exist"):
        ingest(_cfg(tmp_path, [tmp_path / "missing"]), engine="local")
    with pytest.raises(ValueError, match="or an s3:// prefix"):
        IngestConfig(sources=["x"], out="https://host/ds")
    assert IngestConfig(sources=["x"], out="s3://bucket/ds/").out == "s3://bucket/ds"
    assert IngestConfig(sources=["x"], out=f"file://{tmp_path}").out == str(tmp_path)
