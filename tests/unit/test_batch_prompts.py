"""Prompt files of every format, good and hostile, read without Ray: every row becomes a prompt
or a rejection with its reason, in file order, with ids stable across runs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_core.batch.prompts import derive_seed, file_stem, read_prompt_file
from diffusion_core.batch.reasons import PromptReason as R


def rows(path):
    return list(read_prompt_file(str(path)))


def test_txt_one_prompt_per_line_with_line_ids(tmp_path):
    p = tmp_path / "my prompts.txt"
    p.write_bytes(
        b"a red circle\n"
        b"   \n"
        b"two blue squares\r\n"
        b"bad \xff byte\n"
        b"nul\x00here\n"
        + b"x" * 5000 + b"\n"
        b"  padded  "
    )  # fmt: skip
    got = rows(p)
    assert [r.id for r in got] == [f"my_prompts-{i}" for i in range(1, 8)]
    assert [r.reason for r in got] == [
        None, R.EMPTY_PROMPT, None, R.NOT_UTF8, R.CONTROL_CHARACTERS, R.PROMPT_TOO_LONG, None
    ]  # fmt: skip
    assert got[0].prompt == "a red circle" and got[2].prompt == "two blue squares"
    assert got[6].prompt == "padded" and got[0].source == "my prompts.txt:1"


def test_jsonl_columns_ids_seeds_and_bad_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "a cat", "id": "cat-1", "seed": 7, "negative_prompt": "blurry"}),
        "",  # blank lines are not records
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "no prompt key"}),
        json.dumps({"prompt": 3}),
        json.dumps({"prompt": "ok", "id": "../../etc/passwd"}),
        json.dumps({"prompt": "ok", "seed": -1}),
        json.dumps({"prompt": "ok", "seed": "seven"}),
        json.dumps({"prompt": "a dog"}),
    ]
    p.write_text("\n".join(lines) + "\n")
    got = rows(p)
    assert [r.reason for r in got] == [
        None, R.BAD_JSON, R.BAD_JSON, R.MISSING_PROMPT, R.MISSING_PROMPT, R.BAD_ID, R.BAD_SEED,
        R.BAD_SEED, None,
    ]  # fmt: skip
    assert (got[0].id, got[0].seed, got[0].negative_prompt) == ("cat-1", 7, "blurry")
    assert got[-1].id == "p-10" and got[-1].seed is None


def test_csv_and_parquet_with_the_same_columns(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_bytes(b"id,prompt,seed\nx1,a red circle,3\n,two squares,\nx3,,\nx4,bad \xfe,1\n")
    got = rows(csv_path)
    assert [(r.id, r.reason) for r in got] == [
        ("x1", None), ("c-3", None), ("x3", R.EMPTY_PROMPT), ("x4", R.NOT_UTF8)
    ]  # fmt: skip
    assert got[0].seed == 3 and got[1].seed is None
    no_prompt = tmp_path / "n.csv"
    no_prompt.write_text("id,caption\na,hello\n")
    assert [r.reason for r in rows(no_prompt)] == [R.MISSING_PROMPT]
    pq_path = tmp_path / "q.parquet"
    pq.write_table(pa.table({"prompt": ["one", "", "three"], "seed": [1, 2, None]}), pq_path)
    got = rows(pq_path)
    assert [(r.id, r.reason, r.seed) for r in got] == [
        ("q-1", None, 1), ("q-2", R.EMPTY_PROMPT, None), ("q-3", None, None)
    ]  # fmt: skip


def test_a_file_that_cannot_be_parsed_is_one_rejection(tmp_path):
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    (row,) = rows(p)
    assert row.reason == R.READ_ERROR and "broken.parquet" in row.source


def test_stems_and_default_seeds_are_stable():
    assert file_stem("/a/b/My Prompts.v2.txt") == "My_Prompts_v2"
    assert derive_seed(0, "p-1") == derive_seed(0, "p-1") != derive_seed(1, "p-1")
    assert 0 <= derive_seed(5, "x") < 2**63


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv", "parquet"])
def test_an_empty_file_has_no_rows(tmp_path, ext):
    p = tmp_path / f"e.{ext}"
    if ext == "parquet":
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p)
    else:
        p.write_text("prompt\n" if ext == "csv" else "")
    assert rows(p) == []
