"""Why an input was rejected: one reason string per failure mode, used in ``rejected.jsonl``."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every rejection reason of the ingest. The value is what ``rejected.jsonl`` records."""

    # the image
    MISSING_IMAGE = "missing_image"  # a caption (or manifest row) whose image is not there
    EMPTY_FILE = "empty_file"  # the image file has zero bytes
    NOT_AN_IMAGE = "not_an_image"  # image extension, but no image format recognises the bytes
    CORRUPT_IMAGE = "corrupt_image"  # recognised header, but truncated or corrupt data
    TOO_MANY_PIXELS = "too_many_pixels"  # decompression bomb: refused before decoding
    TOO_SMALL = "too_small"  # shorter side below the minimum size
    # the caption
    MISSING_CAPTION = "missing_caption"
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    EMPTY_CAPTION = "empty_caption"  # empty after Unicode NFC and whitespace normalisation
    # the sample's identity
    DUPLICATE_KEY = "duplicate_key"  # the first occurrence (in sorted input order) wins
    # where the input lies (the source must not reach outside itself)
    # a tar member with an absolute path or a '..' component; a manifest path (absolute, '..', a
    # symlink) that resolves outside the manifest's folder and the allowed roots, or a URL
    # (manifests name remote files only with allow_remote)
    UNSAFE_PATH = "unsafe_path"
    SYMLINK = "symlink"  # a file or folder in a source folder that is a symlink: never followed
    SPECIAL_FILE = "special_file"  # a source file that is a FIFO, device, socket or folder
    FILE_TOO_LARGE = "file_too_large"  # over max_file_bytes (by stat / tar header): never read
    # the container
    LINK_MEMBER = "link_member"  # tar member that is a symlink or hard link (never followed)
    SPECIAL_MEMBER = "special_member"  # tar member that is a device, FIFO or other non-file
    TRUNCATED_TAR = "truncated_tar"  # the tar ends early; members before the damage are kept
    CORRUPT_TAR = "corrupt_tar"  # the file is not a readable tar at all
    DOWNLOAD_FAILED = "download_failed"  # img2dataset's parquet marks the download as failed
    BAD_MANIFEST_ROW = "bad_manifest_row"  # a manifest line that does not parse / lacks a path
    READ_ERROR = "read_error"  # an I/O error reading one file (the rest of the run goes on)
