"""Why a prompt row was rejected: the value recorded in the batch job's ``rejected.jsonl``."""

from __future__ import annotations

from enum import StrEnum


class PromptReason(StrEnum):
    EMPTY_PROMPT = "empty_prompt"  # empty or only whitespace
    PROMPT_TOO_LONG = "prompt_too_long"  # over MAX_PROMPT_CHARS (hostile input, not a prompt)
    NOT_UTF8 = "not_utf8"  # the line or field is not valid UTF-8
    CONTROL_CHARACTERS = "control_characters"  # NUL or other control characters
    BAD_JSON = "bad_json"  # a .jsonl line that is not a JSON object
    MISSING_PROMPT = "missing_prompt"  # no `prompt` column/key, or not a string
    BAD_ID = "bad_id"  # an id that cannot name a file: [A-Za-z0-9][A-Za-z0-9_-]{0,127}
    BAD_SEED = "bad_seed"  # a seed that is not an integer in [0, 2**63)
    DUPLICATE_ID = "duplicate_id"  # the first row with an id (in file and line order) wins
    READ_ERROR = "read_error"  # a file (or its rest) could not be read
