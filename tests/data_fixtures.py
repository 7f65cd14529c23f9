"""Builders of raw ingest inputs, good and hostile, shared by the unit and integration tests.

The hostile inputs assume ``IngestConfig(max_file_bytes=MAX_FILE_BYTES)`` and, for the
manifests, ``allow_roots=[images]``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(size=(48, 40), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size=(64, 48), colour=(30, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noisy_jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width=30_000, height=30_000) -> bytes:
    """A tiny, valid-looking PNG whose header declares ``width``x``height`` pixels."""
    data = bytearray(png((8, 8)))
    # IHDR is the first chunk: 8-byte signature, 4 length, 4 type, 13 data, 4 CRC
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def truncated_png() -> bytes:
    # a noisy image so that the IDAT is long enough to cut
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buf, format="PNG")
    full = buf.getvalue()
    return full[: len(full) // 2]


def rgba_png() -> bytes:
    """Left half opaque blue, right half fully transparent (it must come out white)."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (32, 64), (0, 0, 255, 255)), (0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


MAX_FILE_BYTES = 1_000_000  # the cap the tests ingest with
HUGE = 5 * 2**30  # a sparse "image" of 5 GB: refused by its size, never read


def sparse(path: Path, size: int = HUGE) -> Path:
    """A file of ``size`` bytes that takes no disk space (and must never be read)."""
    with open(path, "wb") as f:
        os.truncate(f.fileno(), size)
    return path


def outside_secrets(folder: Path) -> Path:
    """Files outside every source, which a safe ingest must never read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "secret.txt").write_text("the secret caption")
    (folder / "secret.png").write_bytes(png((40, 40), (1, 2, 3)))
    (folder / "x.png").write_bytes(png())
    (folder / "x.txt").write_text("a caption behind a linked folder")
    return folder


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if info.isfile() else None)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            add(tf, name, data)


def build_hostile_img2dataset(root: Path) -> dict[str, int]:
    """An img2dataset folder exercising every per-sample and per-member failure.

    Returns the expected count of each rejection reason.
    """
    root.mkdir(parents=True)
    cap = b"a red square"
    with tarfile.open(root / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "000000000.png", png())
        add(tf, "000000000.txt", cap)
        add(
            tf,
            "000000000.json",
            json.dumps({"url": "http://x/0.png", "license": "CC-BY-4.0"}).encode(),
        )
        add(tf, "000000001.jpg", jpeg())
        add(tf, "000000001.txt", "  un  café\u0301 bleu \n".encode())
        add(tf, "000000002.png", truncated_png())  # corrupt_image
        add(tf, "000000002.txt", cap)
        add(tf, "000000003.png", b"")  # empty_file
        add(tf, "000000003.txt", cap)
        add(tf, "000000004.jpg", b"this is a text file, not a JPEG\n" * 4)  # not_an_image
        add(tf, "000000004.txt", cap)
        add(tf, "000000005.png", png())  # missing_caption
        add(tf, "000000006.txt", cap)  # missing_image
        add(tf, "000000007.png", png())
        add(tf, "000000007.txt", b"caf\xe9 latin-1")  # caption_not_utf8
        add(tf, "000000008.png", png())
        add(tf, "000000008.txt", b" \n\t ")  # empty_caption
        add(tf, "000000009.png", png((12, 80)))  # too_small
        add(tf, "000000009.txt", cap)
        add(tf, "000000010.png", bomb_png())  # too_many_pixels
        add(tf, "000000010.txt", cap)
        add(tf, "/etc/evil.png", png())  # unsafe_path
        add(tf, "../../evil.txt", cap)  # unsafe_path
        add(tf, "000000011.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")  # link_member
        add(tf, "000000011.txt", cap)  # then missing_image: its image was a link
        add(tf, "000000012.png", type=tarfile.LNKTYPE, linkname="000000000.png")  # link_member
        add(tf, "fifo", type=tarfile.FIFOTYPE)  # special_member
        add(tf, "000000013.png", png((40, 40), (0, 160, 0)))
        add(tf, "000000013.txt", b"a green square")
        add(tf, "000000000.png", png())  # duplicate_key (same tar, later)
        add(tf, "000000000.txt", cap)
        add(tf, "000000014.png", b"\0" * (MAX_FILE_BYTES + 1))  # file_too_large (tar header)
        add(tf, "000000014.txt", cap)  # then missing_image: its image was refused
    # a second shard: a duplicate of a key of the first, one good sample, and a failed download
    write_tar(
        root / "00001.tar",
        [
            ("000000001.png", png()),
            ("000000001.txt", cap),  # duplicate_key (across tars)
            ("000010000.png", png((50, 50), (255, 200, 0))),
            ("000010000.txt", b"a yellow square"),
        ],
    )
    pq.write_table(
        pa.table(
            {
                "key": ["000010000", "000010001"],
                "status": ["success", "failed_to_download"],
                "error_message": [None, "HTTP 404"],
            }
        ),
        root / "00001.parquet",
    )
    # a third shard, cut short in the middle of its second sample
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        add(tf, "000020000.png", png((44, 44), (0, 0, 0)))
        add(tf, "000020000.txt", b"a black square")
        noise = io.BytesIO()
        Image.effect_noise((128, 128), 60).convert("RGB").save(noise, format="PNG")
        add(tf, "000020001.png", noise.getvalue())
        add(tf, "000020001.txt", cap)
    data = buf.getvalue()
    (root / "00002.tar").write_bytes(data[: 512 * 4 + len(noise.getvalue()) // 2])
    return {
        "corrupt_image": 1,
        "empty_file": 1,
        "not_an_image": 1,
        "missing_caption": 1,
        "missing_image": 3,
        "caption_not_utf8": 1,
        "empty_caption": 1,
        "too_small": 1,
        "too_many_pixels": 1,
        "unsafe_path": 2,
        "link_member": 2,
        "special_member": 1,
        "duplicate_key": 2,
        "download_failed": 1,
        "truncated_tar": 1,
        "file_too_large": 1,
    }


HOSTILE_ACCEPTED = 5  # 000000000, 000000001, 000000013, 000010000, 000020000


def build_folder(root: Path, outside: Path | None = None) -> dict[str, int]:
    """An image folder with sidecars, and links out of it; returns expected rejections (3
    accepted). ``outside`` (default: a sibling folder) holds what the links point at."""
    outside = outside_secrets(outside or root.parent / f"{root.name}-outside")
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(jpeg())
    (root / "a.txt").write_text("a blue square")
    (root / "a.png").write_bytes(png())  # duplicate_key: a.jpg sorts first and wins
    (root / "sub" / "alpha.png").write_bytes(rgba_png())
    (root / "sub" / "alpha.txt").write_text("half blue, half transparent")
    (root / "sub" / "c.d.png").write_bytes(png((36, 36)))  # dots in the name: key sub_c_d
    (root / "sub" / "c.d.txt").write_text("a dotted name")
    (root / "orphan.txt").write_text("no image here")  # missing_image
    (root / "nocap.png").write_bytes(png())  # missing_caption
    (root / "notes.md").write_text("ignored: not an image nor a caption")
    # never followed: a caption sidecar that is a link (its image then lacks a caption), an image
    # that is a link (its sidecar then lacks an image), a linked subfolder (not entered)
    (root / "leak.png").write_bytes(png())
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "sub" / "lnk.png").symlink_to(outside / "secret.png")
    (root / "sub" / "lnk.txt").write_text("an image behind a link")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    sparse(root / "huge.png")  # file_too_large, by stat
    (root / "huge.txt").write_text("a 5 GB image")
    return {
        "duplicate_key": 1,
        "missing_image": 2,
        "missing_caption": 2,
        "symlink": 3,
        "file_too_large": 1,
    }


def build_manifests(root: Path, images: Path, outside: Path | None = None) -> dict[str, int]:
    """jsonl + csv + parquet manifests pointing at files in ``images`` (ingested with
    ``allow_roots=[images]``) and, refused, at files outside it and the manifests' folder;
    4 accepted."""
    root.mkdir(parents=True)
    images.mkdir(parents=True)
    outside = outside_secrets(outside or root.parent / f"{root.name}-outside")
    (images / "m1.png").write_bytes(png((40, 40), (255, 0, 255)))
    (images / "m2.jpg").write_bytes(jpeg())
    (images / "link.png").symlink_to(outside / "secret.png")  # inside, but resolves outside
    sparse(images / "huge.png")
    secret = outside / "secret.png"
    up = os.path.relpath(secret, root)  # '../<outside>/secret.png'
    lines = [
        json.dumps(
            {"path": str(images / "m1.png"), "caption": "a magenta square", "license": "CC0"}
        ),
        json.dumps({"path": f"file://{images / 'm2.jpg'}", "caption": "a blue one"}),
        json.dumps({"path": str(images / "gone.png"), "caption": "missing"}),  # missing_image
        "{not json",  # bad_manifest_row
        json.dumps(
            {"path": str(images / "m1.png"), "caption": None, "key": "k3"}
        ),  # missing_caption
        # unsafe_path: outside the manifest's folder and the allowed roots, or a URL
        json.dumps({"path": str(secret), "caption": "absolute", "key": "u1"}),
        json.dumps({"path": up, "caption": "dot-dot", "key": "u2"}),
        json.dumps({"path": f"file://{secret}", "caption": "file URL", "key": "u3"}),
        json.dumps({"path": str(images / "link.png"), "caption": "a link out", "key": "u4"}),
        json.dumps({"path": "http://127.0.0.1:9/secret.png", "caption": "remote", "key": "u5"}),
        json.dumps(
            {"path": str(images / "huge.png"), "caption": "5 GB", "key": "big"}
        ),  # too large
    ]
    (root / "list.jsonl").write_text("\n".join(lines) + "\n")
    # a relative path: resolved from the manifest's folder (into the allowed root)
    rel = os.path.relpath(images / "m1.png", root)
    (root / "list.csv").write_text(f"image_path,text,key\n{rel},a csv caption,csv1\n")
    pq.write_table(
        pa.table(
            {"url": [str(images / "m2.jpg")], "caption": ["a parquet caption"], "id": ["pq1"]}
        ),
        root / "list.parquet",
    )
    return {
        "missing_image": 1,
        "bad_manifest_row": 1,
        "missing_caption": 1,
        "unsafe_path": 5,
        "file_too_large": 1,
    }
