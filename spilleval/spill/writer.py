"""Stage 3 of the data path: spill reduced batches to disk from a background thread.

The evaluation loop hands batches to `SpillWriter.write`, which only enqueues them into a bounded queue (a slow
disk blocks the loop instead of growing memory). The writer thread is the single consumer of host batches: it
runs the listeners (streaming metric updates), buffers up to `chunk_bytes`,
and commits chunks atomically (temp directory, fsync, rename). An error in the thread surfaces in the caller at
the next `write` or `close`, naming the chunk and what is still intact.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..batch import SampleBatch
from .chunk import write_chunk_files
from .integrity import seal, unseal
from .manifest import (
    CHUNK_RECORD,
    MANIFEST_NAME,
    SHARD_DONE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    ChunkRecord,
    Manifest,
    chunk_dir_name,
    fsync_dir,
    load_manifest,
    save_manifest,
    shard_dir_name,
    write_json_atomic,
)

DEFAULT_CHUNK_BYTES = 64 * 2**20
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
_STOP = object()

BatchListener = Callable[[SampleBatch], None]


class SpillWriteError(RuntimeError):
    """Writing the spill failed; committed chunks are intact and readable."""


class SpillExistsError(FileExistsError):
    """The spill directory already holds a spill; it is never silently overwritten."""


class SpillLockedError(RuntimeError):
    """Another writer holds this spill shard."""


@dataclass
class ShardSummary:
    rank: int
    chunks: int
    rows: int
    tokens: int


class SpillWriter:
    """Write one rank's shard of a spill directory.

    `listeners` are called in the writer thread with every host batch, in order, before it is spilled; this is
    where streaming metrics update, off the evaluation loop's critical path.
    """

    def __init__(
        self,
        spill_dir: str | os.PathLike,
        manifest: Manifest,
        *,
        rank: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        chunk_rows: int | None = None,
        queue_size: int = 8,
        tokenizer: Any = None,
        listeners: Sequence[BatchListener] = (),
        compression: str | None = "zstd",
        resume: bool = False,
    ) -> None:
        if chunk_bytes <= 0 or (chunk_rows is not None and chunk_rows <= 0):
            raise ValueError("chunk_bytes and chunk_rows must be positive")
        self.spill_dir = Path(spill_dir)
        self.manifest = manifest
        self.rank = rank
        self.chunk_bytes = chunk_bytes
        self.chunk_rows = chunk_rows
        self.compression = compression
        self.listeners = list(listeners)
        self.shard_dir = self.spill_dir / SHARDS_DIR / shard_dir_name(rank)
        self._prepare_directory(resume=resume)
        try:
            self._lock_fd = _acquire_lock(self.shard_dir / LOCK_NAME, rank)
        except OSError as e:
            raise SpillWriteError(self._describe_setup_error(e)) from e
        try:  # from here on this process owns the shard (and, on rank 0, the top-level files)
            self._write_metadata(tokenizer)
            self._next_seq, committed = _existing_chunks(self.shard_dir)
        except OSError as e:
            _release_lock(self._lock_fd)
            raise SpillWriteError(self._describe_setup_error(e)) from e
        except BaseException:
            _release_lock(self._lock_fd)
            raise
        self.resumed_chunks: list[ChunkRecord] = committed  # what an earlier run committed (resume)
        self.rows = sum(r.rows for r in committed)
        self.tokens = sum(r.tokens for r in committed)
        self.chunks = len(committed)
        self._buffer: list[SampleBatch] = []
        self._buffered_bytes = 0
        self._buffered_rows = 0
        self._error: BaseException | None = None
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._run, name=f"spilleval-writer-{rank}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------- public
    def write(
        self,
        batch: SampleBatch,
        *,
        columns: dict[str, list[Any]] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Enqueue one batch (blocks while the queue is full)."""
        self._raise_if_failed()
        if self._closed:
            raise SpillWriteError("write() after close()")
        self._queue.put((batch, columns or {}, arrays or {}))

    def close(self, *, mark_complete: bool | None = None) -> ShardSummary:
        """Flush the last chunk, record the shard as complete, release the lock.

        `mark_complete` (default: when the world size is 1) also marks the whole spill complete in the manifest;
        in a distributed run rank 0 does that with `mark_spill_complete` once every shard has closed.
        """
        if self._closed:
            return self.summary()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            self._raise_if_failed()
            write_json_atomic(self.shard_dir / SHARD_DONE, self.summary().__dict__)
            if mark_complete if mark_complete is not None else self.manifest.world_size == 1:
                mark_spill_complete(self.spill_dir, self.manifest)
        except OSError as e:  # every chunk is committed; only the completion records failed
            raise SpillWriteError(self._describe_os_error(e, Path(e.filename or SHARD_DONE))) from e
        finally:
            _release_lock(self._lock_fd)
        return self.summary()

    def abort(self) -> None:
        """Stop without marking anything complete; committed chunks stay readable (as after a crash)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            _release_lock(self._lock_fd)

    def summary(self) -> ShardSummary:
        return ShardSummary(rank=self.rank, chunks=self.chunks, rows=self.rows, tokens=self.tokens)

    def __enter__(self) -> "SpillWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self._error is not None:
                continue  # keep draining so producers never block on a dead consumer
            try:
                self._consume(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e
        if self._error is None:
            try:
                self._flush(final=True)
            except BaseException as e:  # noqa: BLE001
                self._error = e

    def _consume(self, batch: SampleBatch, columns, arrays) -> None:
        if columns or arrays:
            batch.columns = {**batch.columns, **columns}
            batch.arrays = {**batch.arrays, **{k: np.asarray(v) for k, v in arrays.items()}}
            batch.__post_init__()
        for listener in self.listeners:
            listener(batch)
        if len(batch) == 0:
            return
        self._buffer.append(batch)
        self._buffered_bytes += batch.nbytes()
        self._buffered_rows += len(batch)
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        while self._buffer and (final or self._chunk_is_full()):
            pending = SampleBatch.concat(self._buffer)
            take = self._rows_for_next_chunk(pending)
            self._commit(pending.slice(0, take))  # views: cutting chunks copies nothing
            rest = pending.slice(take, len(pending)) if take < len(pending) else None
            self._buffer = [rest] if rest is not None else []
            self._buffered_bytes = rest.nbytes() if rest is not None else 0
            self._buffered_rows = len(rest) if rest is not None else 0

    def _chunk_is_full(self) -> bool:
        rows_full = self.chunk_rows is not None and self._buffered_rows >= self.chunk_rows
        return rows_full or self._buffered_bytes >= self.chunk_bytes

    def _rows_for_next_chunk(self, pending: SampleBatch) -> int:
        """The longest prefix within chunk_bytes and chunk_rows, at least one sample (samples never split)."""
        per_row = _row_bytes(pending)
        fits = int(np.searchsorted(np.cumsum(per_row), self.chunk_bytes, side="right"))
        limit = len(pending) if self.chunk_rows is None else min(self.chunk_rows, len(pending))
        return max(1, min(fits, limit))

    def _commit(self, batch: SampleBatch) -> None:
        seq = self._next_seq
        final_dir = self.shard_dir / chunk_dir_name(seq)
        tmp_dir = self.shard_dir / f"{TMP_PREFIX}{chunk_dir_name(seq)}"
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
            files = write_chunk_files(tmp_dir, batch, compression=self.compression)
            record = ChunkRecord(
                rank=self.rank,
                seq=seq,
                rows=len(batch),
                tokens=batch.num_tokens,
                min_index=int(batch.sample_index.min()),
                max_index=int(batch.sample_index.max()),
                files=files,
            )
            _write_record(tmp_dir / CHUNK_RECORD, record)
            fsync_dir(tmp_dir)
            os.rename(tmp_dir, final_dir)
            fsync_dir(self.shard_dir)
        except OSError as e:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise SpillWriteError(self._describe_os_error(e, final_dir)) from e
        self._next_seq += 1
        self.chunks += 1
        self.rows += len(batch)
        self.tokens += batch.num_tokens

    def _describe_os_error(self, error: OSError, chunk: Path) -> str:
        kept = f"{self.chunks} committed chunk(s) ({self.rows} samples) in {self.shard_dir} are intact"
        if error.errno == errno.ENOSPC:
            cause = "the disk is full"
            fix = "free space or choose a spill_dir on a larger disk, then re-run with resume=True"
        elif error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            cause = "the directory is not writable"
            fix = "choose a writable spill_dir, then re-run with resume=True"
        else:
            cause = f"{error.strerror or error}"
            fix = "fix the cause, then re-run with resume=True"
        return f"could not write {chunk.name}: {cause} ({error}). {kept}; {fix}."

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, SpillWriteError):
                raise SpillWriteError(str(error)) from error
            raise SpillWriteError(f"the spill writer thread failed: {error!r}") from error

    # ------------------------------------------------------------------------------------------- set-up
    def _prepare_directory(self, *, resume: bool) -> None:
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            manifest_path = self.spill_dir / MANIFEST_NAME
            # rank 0 owns the manifest; other ranks only own their shard (they may start before rank 0)
            if (self.rank == 0 and manifest_path.exists()) or self.shard_dir.exists():
                raise_if_locked(self.spill_dir, self.rank)
                if not resume:
                    raise SpillExistsError(
                        f"{self.spill_dir} already holds a spill. spilleval never overwrites one: choose a new "
                        "spill_dir, delete this one, or pass resume=True to continue it."
                    )
                if manifest_path.exists():
                    _check_resumable(load_manifest(self.spill_dir), self.manifest)
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if isinstance(e, SpillExistsError):
                raise
            raise SpillWriteError(self._describe_setup_error(e)) from e

    def _write_metadata(self, tokenizer: Any) -> None:
        """Rank 0 writes the tokenizer (once, atomically: a crash never leaves half of it) and the manifest."""
        if self.rank != 0:
            return
        unseal(self.spill_dir)  # a resumed spill changes again: it is sealed anew when it finishes
        target = self.spill_dir / TOKENIZER_DIR
        staging = self.spill_dir / f"{TMP_PREFIX}{TOKENIZER_DIR}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that crashed while saving it
        if tokenizer is not None and not target.exists():
            tokenizer.save_pretrained(str(staging))
            os.rename(staging, target)
            fsync_dir(self.spill_dir)
        save_manifest(self.spill_dir, self.manifest)

    def _describe_setup_error(self, error: OSError) -> str:
        if error.errno == errno.ENOSPC:
            cause = "the disk is full"
        elif error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            cause = "the directory is not writable"
        else:
            cause = error.strerror or str(error)
        return (
            f"cannot create the spill directory {self.spill_dir}: {cause} ({error}). "
            "Choose a writable spill_dir with free space."
        )


def mark_spill_complete(spill_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record in the manifest that every shard has finished (rank 0, after all ranks closed), then seal the
    spill's metadata (`spill.integrity`; sealed again once results.json is written)."""
    manifest.status = "complete"
    save_manifest(Path(spill_dir), manifest)
    seal(Path(spill_dir))


def _check_resumable(existing: Manifest, wanted: Manifest) -> None:
    for key in ("task", "vocab_size", "id_dtype", "dataset_length", "world_size", "has_logprob"):
        if getattr(existing, key) != getattr(wanted, key):
            raise SpillExistsError(
                f"cannot resume: the spill on disk has {key}={getattr(existing, key)!r} but this evaluation has "
                f"{key}={getattr(wanted, key)!r}. Resume only the same evaluation; otherwise use a new spill_dir."
            )


def _existing_chunks(shard_dir: Path) -> tuple[int, list[ChunkRecord]]:
    """Committed chunks already in the shard (for resume): next sequence number and their records."""
    from .reader import scan_shard

    for tmp in shard_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)  # a chunk that was being written when a run crashed
    (shard_dir / SHARD_DONE).unlink(missing_ok=True)
    records = scan_shard(shard_dir)
    return (records[-1].seq + 1 if records else 0), records


def _write_record(path: Path, record: ChunkRecord) -> None:
    with open(path, "w") as f:
        json.dump(record.__dict__, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _row_bytes(batch: SampleBatch) -> np.ndarray:
    per_token = batch.pred_ids.itemsize + (4 if batch.label_logprob is not None else 0)
    sizes = batch.lengths * per_token + batch.label_lengths * batch.label_ids.itemsize + 16
    for values in batch.arrays.values():
        sizes = sizes + values[0:1].nbytes
    return sizes


def raise_if_locked(spill_dir: str | os.PathLike, rank: int = 0) -> None:
    """Raise `SpillLockedError` naming the holder if a live writer holds this rank's shard of `spill_dir`."""
    path = Path(spill_dir) / SHARDS_DIR / shard_dir_name(rank) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has ever written this shard
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a flock dies with its process: a crash leaves no lock
    except BlockingIOError:
        raise SpillLockedError(_locked_message(path, fd)) from None
    finally:
        os.close(fd)


def _locked_message(path: Path, fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        holder = f"pid {info['pid']} on host {info['host']} (rank {info['rank']}, since " + time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(info["since"])
        ) + ")"
    except (ValueError, KeyError, TypeError):
        holder = "an unknown process"
    return (
        f"{path.parent} is being written by another writer: {holder}. Two writers cannot share a spill shard: "
        "wait for that process to finish (or stop it), or use another spill_dir."
    )


def _acquire_lock(path: Path, rank: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _locked_message(path, fd)
        os.close(fd)
        raise SpillLockedError(message) from None
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "rank": rank, "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
