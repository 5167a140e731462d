"""Plausible bounds for what a spill declares, checked before anything is allocated.

A spill may come from anyone, and checksums do not stop someone who recomputes them: every size read from disk
(a record batch's buffers, a zarr shape, a sample count, a JSON file) is held against what else the spill records
and against these bounds. They sit far above anything a spilleval writer produces, so a genuine spill never meets
them; a crafted one gets a `SpillFormatError` instead of gigabytes of memory.
"""

from __future__ import annotations

import os

MiB = 2**20

# A chunk decodes to about `chunk_bytes` (64 MiB by default) plus the dataset columns it carries. What one chunk may
# decode to: this floor, or DECODE_RATIO times its bytes on disk when that is more (zstd shrinks token ids 1.4-3x;
# a decompression bomb, 10,000x). SPILLEVAL_MAX_CHUNK_BYTES raises the floor for a genuine spill of larger chunks.
DECODE_FLOOR_BYTES = 256 * MiB
DECODE_RATIO = 64

MAX_SAMPLES = 2**48  # dataset length and sample indices (a sample set holds them sparsely, whatever the value)
MAX_VOCAB = 2**32  # ids are stored as uint16 or uint32
MAX_WORLD_SIZE = 2**16
MAX_SEQ = 2**40  # chunk sequence numbers, rows, tokens, file bytes: int64 arithmetic stays exact
MAX_NAME = 1024  # characters of a name (metric, column, file) in spill metadata

# JSON metadata files are read whole; a manifest with a 4,096-class label set is a few hundred KB.
MAX_JSON_BYTES = {
    "manifest.json": 16 * MiB,
    "results.json": 16 * MiB,
    "integrity.json": 16 * MiB,
    "chunk.json": 4 * MiB,
    "shard.json": 64 * 1024,
    "zarr.json": 1 * MiB,
}
MAX_MISSING_RANGES = 1000  # missing sample ranges listed by `completeness()` (their count is always exact)
MAX_TOKENIZER_FILE_BYTES = 256 * MiB  # the largest tokenizer.json files (256k-entry vocabularies) are ~35 MB


def decode_floor() -> int:
    value = os.environ.get("SPILLEVAL_MAX_CHUNK_BYTES")
    try:
        return max(DECODE_FLOOR_BYTES, int(value)) if value else DECODE_FLOOR_BYTES
    except ValueError:
        return DECODE_FLOOR_BYTES


def chunk_decode_budget(bytes_on_disk: int) -> int:
    """The most memory one chunk of `bytes_on_disk` bytes may declare that it decodes to."""
    return max(decode_floor(), DECODE_RATIO * bytes_on_disk)
