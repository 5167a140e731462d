"""Compaction of the small chunks that commits by time (or interrupted runs) leave: every row intact, the writer's
chunk limits kept, big chunks untouched, and a crash after any step leaves a spill that reads the same rows and
resumes to the same end.

Small chunks are made the way runs make them, deterministically: each writer session commits what it buffered when
it stops (`abort()`, as after an interrupted run), and the next one resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import make_manifest, random_batch
from spilleval.batch import SampleBatch
from spilleval.spill import SpillReader, SpillWriter
from spilleval.spill import compact as compact_module
from spilleval.spill.compact import build_staging, exchange, plan, staging_dir
from spilleval.spill.manifest import SHARD_DONE, SHARDS_DIR
from spilleval.spill.reader import scan_shard

CHUNK_BYTES = 256 * 1024  # chunks under 16 KiB on disk count as small


def session_batches(seed: int, sessions: list[int], start: int = 0) -> list[SampleBatch]:
    """One batch per session, of the given sizes, with log-probs, a text column and a per-sample array."""
    rng = np.random.default_rng(seed)
    batches = []
    for size in sessions:
        batch = random_batch(rng, size, start_index=start, logprob=True)
        batch.columns = {"question": [f"question {i}" if i % 3 else None for i in batch.sample_index]}
        batch.arrays = {"scores": rng.random((size, 3)).astype(np.float32)}
        batch.__post_init__()
        batches.append(batch)
        start += size
    return batches


def write_sessions(spill: Path, batches: list[SampleBatch], **options: Any) -> SpillWriter:
    """Every batch but the last in a session of its own that stops (a chunk each); the last session stays open."""
    manifest = lambda: make_manifest(has_logprob=True)  # noqa: E731
    for i, batch in enumerate(batches):
        writer = SpillWriter(spill, manifest(), resume=i > 0, chunk_bytes=CHUNK_BYTES, **options)
        writer.write(batch)
        if i < len(batches) - 1:
            writer.abort()
    return writer


def rows(spill: Path) -> dict[int, tuple]:
    """Every sample of the spill as bytes: ids, log-probs, its column value and its array."""
    out = {}
    for batch in SpillReader(spill, allow_partial=True).iter_chunks():
        for i, index in enumerate(batch.sample_index):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            out[int(index)] = (batch.pred_ids[lo:hi].tobytes(), batch.label_ids[lo:hi].tobytes(),
                               batch.label_logprob[lo:hi].tobytes(), batch.columns["question"][i],
                               batch.arrays["scores"][i].tobytes())
    return out


def expected_rows(batches: list[SampleBatch]) -> dict[int, tuple]:
    out = {}
    for batch in batches:
        for i, index in enumerate(batch.sample_index):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            out[int(index)] = (batch.pred_ids[lo:hi].tobytes(), batch.label_ids[lo:hi].tobytes(),
                               batch.label_logprob[lo:hi].tobytes(), batch.columns["question"][i],
                               batch.arrays["scores"][i].tobytes())
    return out


def shard(spill: Path) -> Path:
    return spill / SHARDS_DIR / "rank-00000"


def test_small_chunks_are_merged_with_every_row_intact(tmp_path):
    spill = tmp_path / "spill"
    batches = session_batches(0, [5, 3, 7, 1, 4, 6])
    writer = write_sessions(spill, batches)
    writer.close()
    assert [r.rows for r in scan_shard(shard(spill))] == [26]
    assert json.loads((shard(spill) / SHARD_DONE).read_text())["chunks"] == 1
    assert rows(spill) == expected_rows(batches)
    reader = SpillReader(spill)
    assert reader.is_complete and list(np.concatenate([b.sample_index for b in reader.iter_chunks()])) == list(
        range(26))  # the order of the rows is kept
    assert not staging_dir(shard(spill)).exists()


def test_merged_chunks_keep_chunk_rows(tmp_path):
    spill = tmp_path / "spill"
    batches = session_batches(1, [2, 1, 3, 2, 1, 2])
    write_sessions(spill, batches, chunk_rows=4).close()
    assert [r.rows for r in scan_shard(shard(spill))] == [4, 4, 3]
    assert rows(spill) == expected_rows(batches)


def test_big_chunks_are_kept_as_they_are(tmp_path):
    """A chunk that is not small is hard-linked into the compacted shard, never rewritten; small ones after it
    merge, and the big one keeps its number."""
    spill = tmp_path / "spill"
    batches = session_batches(2, [1500, 2, 3, 2])
    writer = write_sessions(spill, batches)
    big = scan_shard(shard(spill))[0]
    assert sum(f["bytes"] for f in big.files.values()) >= CHUNK_BYTES // compact_module.SMALL_FRACTION
    inode = (shard(spill) / big.name / "tokens.arrow").stat().st_ino
    writer.close()
    records = scan_shard(shard(spill))
    assert [r.rows for r in records] == [1500, 7]
    assert (shard(spill) / records[0].name / "tokens.arrow").stat().st_ino == inode
    assert rows(spill) == expected_rows(batches)


def test_nothing_to_merge_leaves_the_shard_alone(tmp_path):
    spill = tmp_path / "spill"
    batches = session_batches(3, [4, 1500, 3])  # no two small chunks in a row
    writer = write_sessions(spill, batches)
    assert plan(scan_shard(shard(spill)), chunk_bytes=CHUNK_BYTES, chunk_rows=None) == []
    writer.close()
    assert [r.rows for r in scan_shard(shard(spill))] == [4, 1500, 3]


@pytest.mark.parametrize("step", ["staging half written", "staging written", "swapped, old not yet deleted"])
def test_a_crash_after_any_step_reads_the_same_rows_and_resumes(tmp_path, step):
    """The on-disk state a kill -9 leaves after each step of a compaction: the rows read back are the same, and
    the next writer (resume) removes what is left of it and finishes with a compacted, complete shard."""
    spill = tmp_path / "spill"
    batches = session_batches(4, [3, 2, 4, 1, 3, 5, 2])
    write_sessions(spill, batches[:-1]).abort()  # interrupted runs: six small chunks, no shard.json
    records = scan_shard(shard(spill))
    staging = staging_dir(shard(spill))
    build_staging(shard(spill), staging, plan(records, chunk_bytes=CHUNK_BYTES, chunk_rows=4),
                  chunk_bytes=CHUNK_BYTES, chunk_rows=4, compression="zstd")  # merged and linked chunks
    staged = sorted(staging.glob("chunk-*"))
    assert len(staged) > 1
    if step == "staging half written":
        for path in staged[len(staged) // 2:]:
            shutil.rmtree(path)
    if step == "swapped, old not yet deleted":
        assert exchange(staging, shard(spill))
    before = expected_rows(batches[:-1])
    assert rows(spill) == before

    writer = SpillWriter(spill, make_manifest(has_logprob=True), resume=True, chunk_bytes=CHUNK_BYTES)
    assert not staging.exists()
    writer.write(batches[-1])
    writer.close()
    assert rows(spill) == expected_rows(batches)
    assert [r.rows for r in scan_shard(shard(spill))] == [20]
    assert SpillReader(spill).is_complete


def test_without_directory_exchange_the_small_chunks_stay(tmp_path, monkeypatch):
    """Where the file system cannot swap directories atomically (e.g. NFS; replaced here, this one can), the
    shard is left as it was written: correct, only slower to read."""
    spill = tmp_path / "spill"
    batches = session_batches(5, [2, 3, 1])
    writer = write_sessions(spill, batches)
    monkeypatch.setattr(compact_module, "exchange", lambda a, b: False)
    writer.close()
    assert [r.rows for r in scan_shard(shard(spill))] == [2, 3, 1]
    assert rows(spill) == expected_rows(batches) and SpillReader(spill).is_complete
    assert not staging_dir(shard(spill)).exists()
