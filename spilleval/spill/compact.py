"""Merge the small chunks that commits by time leave behind into full ones, when a shard is complete.

Why. The writer commits at least every `commit_interval_s` (a crash then loses at most that much work), so a slow
evaluation writes one small chunk per interval: one minute of a 7B model with short answers is ~13k supervised
tokens. Each chunk costs a reader about a millisecond of its own (its files, checksums, Arrow and zarr headers), so
a spill of such chunks recomputes 4-11x slower per token than one of 64 MiB chunks (`tools/bench_chunks.py`,
BENCHMARKS.md), and holds thousands of files on a shared file system. `close()` therefore rewrites every run of
consecutive small chunks (under `chunk_bytes / 16` on disk, and under `chunk_rows` rows when that is set) into chunks
cut by the writer's own rule; other chunks are kept as they are.

Crash-safe at every step, and resumable. The compacted shard is built beside the live one, in
`shards/.tmp-compact-rank-NNNNN/`: merged chunks are written anew, every kept chunk and the lock file are hard-links
(the lock is the same inode, so the writer keeps holding it), a kept chunk's chunk.json is rewritten only when its
sequence number moves. One `renameat2(RENAME_EXCHANGE)` swaps the two directories atomically, then the old one is
deleted. A crash before the swap leaves the live shard as it was, a crash after it the compacted one: both hold
exactly the same rows, readers ignore the `.tmp-` directory and the next writer (resume) removes it.
Compaction is an optimisation, never needed for correctness: where the file system cannot exchange directories or
hard-link (e.g. NFS), or the disk is full, the small chunks stay as they are.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..batch import SampleBatch
from .chunk import read_chunk
from .manifest import CHUNK_RECORD, ChunkRecord, chunk_dir_name, fsync_dir

logger = logging.getLogger(__name__)

SMALL_FRACTION = 16  # a chunk under chunk_bytes / 16 on disk (4 MiB by default) is merged with its small neighbours
STAGING_PREFIX = ".tmp-compact-"
LOCK_NAME = ".lock"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(shard_dir: Path) -> Path:
    """Where the compacted shard is built (and, after the swap, where the old one waits to be deleted)."""
    return shard_dir.parent / f"{STAGING_PREFIX}{shard_dir.name}"


def plan(records: Sequence[ChunkRecord], *, chunk_bytes: int, chunk_rows: int | None) -> list[list[ChunkRecord]]:
    """The shard's chunks in order, grouped: a group of several small chunks becomes merged chunks, a group of one
    is kept. Empty when there is nothing to merge."""
    groups: list[list[ChunkRecord]] = []
    for record in records:
        if _is_small(record, chunk_bytes, chunk_rows) and groups and _is_small(groups[-1][-1], chunk_bytes, chunk_rows):
            groups[-1].append(record)
        else:
            groups.append([record])
    return groups if any(len(g) > 1 for g in groups) else []


def compact_shard(shard_dir: Path, records: Sequence[ChunkRecord], *, chunk_bytes: int, chunk_rows: int | None,
                  compression: str | None) -> list[ChunkRecord]:
    """Compact a complete shard in place (see the module docstring); returns its chunks' records afterwards."""
    groups = plan(records, chunk_bytes=chunk_bytes, chunk_rows=chunk_rows)
    if not groups or not _only_chunks_and_lock(shard_dir, records):
        return list(records)
    staging = staging_dir(shard_dir)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        compacted = build_staging(shard_dir, staging, groups, chunk_bytes=chunk_bytes, chunk_rows=chunk_rows,
                                  compression=compression)
        swapped = exchange(staging, shard_dir)
    except OSError as e:  # e.g. a full disk: the shard as it is stays complete and correct
        logger.warning("spilleval: small chunks of %s are left as they are (%s)", shard_dir, e)
        swapped = False
    except BaseException:  # e.g. a chunk that fails its checksum: the spill is damaged, say so
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not swapped:
        shutil.rmtree(staging, ignore_errors=True)
        return list(records)
    fsync_dir(shard_dir.parent)
    shutil.rmtree(staging, ignore_errors=True)  # the old chunks
    return compacted


def build_staging(shard_dir: Path, staging: Path, groups: list[list[ChunkRecord]], *, chunk_bytes: int,
                  chunk_rows: int | None, compression: str | None) -> list[ChunkRecord]:
    """Write the compacted shard into `staging` (fsynced): merged groups anew, kept chunks and the lock linked."""
    from .writer import rows_for_chunk, write_chunk_dir

    staging.mkdir()
    os.link(shard_dir / LOCK_NAME, staging / LOCK_NAME)
    compacted: list[ChunkRecord] = []
    for group in groups:
        if len(group) == 1:
            compacted.append(_link_chunk(shard_dir, staging, group[0], seq=len(compacted)))
            continue
        pending: list[SampleBatch] = []  # as the writer's buffer: concatenated only when a chunk is cut
        pending_bytes = pending_rows = 0
        for position, record in enumerate(group):
            pending.append(read_chunk(shard_dir / record.name, record, verify=True))
            pending_bytes, pending_rows = pending_bytes + pending[-1].nbytes(), pending_rows + len(pending[-1])
            last = position == len(group) - 1
            if not (last or pending_bytes >= chunk_bytes or (chunk_rows is not None and pending_rows >= chunk_rows)):
                continue
            merged = SampleBatch.concat(pending)
            while len(merged) and (last or rows_for_chunk(merged, chunk_bytes, chunk_rows) < len(merged)):
                take = rows_for_chunk(merged, chunk_bytes, chunk_rows)
                compacted.append(write_chunk_dir(staging / chunk_dir_name(len(compacted)), merged.slice(0, take),
                                                 rank=record.rank, seq=len(compacted), compression=compression))
                merged = merged.slice(take, len(merged))
            pending = [merged] if len(merged) else []
            pending_bytes, pending_rows = merged.nbytes(), len(merged)
    fsync_dir(staging)
    return compacted


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _is_small(record: ChunkRecord, chunk_bytes: int, chunk_rows: int | None) -> bool:
    on_disk = sum(f["bytes"] for f in record.files.values())
    return on_disk < chunk_bytes // SMALL_FRACTION and (chunk_rows is None or record.rows < chunk_rows)


def _only_chunks_and_lock(shard_dir: Path, records: Sequence[ChunkRecord]) -> bool:
    """Compact only a shard that holds nothing but its chunks and lock: nothing unknown is ever left behind."""
    expected = {LOCK_NAME, *(r.name for r in records)}
    return {entry.name for entry in shard_dir.iterdir()} == expected


def _link_chunk(shard_dir: Path, staging: Path, record: ChunkRecord, *, seq: int) -> ChunkRecord:
    """Hard-link a kept chunk's files into the staging shard as chunk `seq` (its record rewritten if `seq` moved)."""
    from .writer import write_record

    source, target = shard_dir / record.name, staging / chunk_dir_name(seq)
    for name in record.files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(source / name, target / name)
    moved = ChunkRecord(**{**record.__dict__, "seq": seq})
    if seq == record.seq:
        os.link(source / CHUNK_RECORD, target / CHUNK_RECORD)
    else:
        write_record(target / CHUNK_RECORD, moved)
    created = {target} | {parent for name in record.files for parent in (target / name).parents
                          if parent.is_relative_to(target)}
    for directory in sorted(created, key=lambda d: len(d.parts), reverse=True):  # deepest first
        fsync_dir(directory)
    return moved
