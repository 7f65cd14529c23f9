"""Webdataset output (``--format webdataset``): the images in tar shards of a fixed size.

Shard ``k`` (``shards/shard-{k:06d}.tar``) holds the images of plan index ``k*S .. k*S+S-1``
(``S`` = ``shard_size``; the plan index is the image's position in prompts-file order, a pure
function of the job's arguments), in index order, three members each: ``<id>.png``,
``<id>.json`` (the image's manifest row without its timing) and ``<id>.txt`` (the prompt). The
tar is written by the project's deterministic writer (:func:`diffusion_core.data.tario.write_tar`:
fixed mtime, owner and mode) into a temporary name and renamed (uploaded in one call on an
object store), so a shard is either complete or absent, and its bytes are a function of the job alone.
A resumed job skips every shard that exists; images sampled for a shard that was not finished
are kept, one file each, in ``.staging/`` until their shard is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from diffusion_core.batch.output import Output
from diffusion_core.data.tario import iter_tar, write_tar

SHARD_DIR = "shards"
STAGING_DIR = ".staging"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
# A member's JSON: the manifest row of the image, less what differs between runs of one job.
UNSTABLE = ("seconds", "resumed", "file", "member")


def shard_name(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:06d}.tar"


def shard_sizes(images: int, shard_size: int) -> list[int]:
    """How many images each shard holds (the last one may be short)."""
    return [min(shard_size, images - k) for k in range(0, images, shard_size)]


def existing_shards(output: Output) -> set[int]:
    """The shard numbers on the output (each one complete: shards are written atomically)."""
    return {int(m.group(1)) for n in output.listdir(SHARD_DIR) if (m := _SHARD_RE.match(n))}


def member_json(row: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in row.items() if k not in UNSTABLE}, sort_keys=True, ensure_ascii=False
    ).encode("utf-8")


def write_shard(output: Output, k: int, rows: list[dict[str, Any]], png_of) -> list[dict[str, Any]]:
    """Write shard ``k`` from its manifest rows (any order) and ``png_of(row) -> bytes``; return
    the rows, in index order, pointing at the shard and their member."""
    rows = sorted(rows, key=lambda r: r["index"])

    def members() -> Iterator[tuple[str, bytes]]:
        for r in rows:  # one image's bytes in memory at a time
            yield f"{r['id']}.png", png_of(r)
            yield f"{r['id']}.json", member_json(r)
            yield f"{r['id']}.txt", r["prompt"].encode("utf-8")

    name = shard_name(k)
    output.makedirs_for(name)
    write_tar(output.uri(name), members())  # atomic locally and on an object store
    return [{**r, "file": name, "member": f"{r['id']}.png"} for r in rows]


def shard_rows(output: Output, k: int) -> list[dict[str, Any]]:
    """The manifest rows of a shard already written (a resumed job), from its JSON members."""
    name = shard_name(k)
    rows = []
    with output.open_read(name) as f:
        for m in iter_tar(f):
            if m.reason is not None:
                raise ValueError(f"{output.uri(name)}: {m.reason} {m.detail}")
            if m.name.endswith(".json"):
                rows.append(
                    {**json.loads(m.data), "file": name, "member": m.name[: -len("json")] + "png"}
                )
    return rows


def shard_pngs(output: Output, names: Iterable[str], wanted: set[str]) -> dict[str, bytes]:
    """The PNG members named in ``wanted`` from the shards ``names`` (the contact sheet)."""
    found: dict[str, bytes] = {}
    for name in names:
        with output.open_read(name) as f:
            for m in iter_tar(f):
                if m.name in wanted and m.data is not None:
                    found[m.name] = m.data
    return found
