"""Stage 3 of the data path: spill reduced batches to disk from a background thread.

The evaluation loop hands batches to `SpillWriter.write`, which only enqueues them into a bounded queue (a slow
disk blocks the loop instead of growing memory). The writer thread is the single consumer of host batches: it
runs the listeners (streaming metric updates), buffers up to `chunk_bytes`,
and commits chunks atomically (temp directory, fsync, rename). An error in the thread surfaces in the caller at
the next `write` or `close`, naming the chunk and what is still intact.

Durability. A chunk is the unit of what survives a crash, and a 64 MiB chunk can take many minutes of evaluation to
fill, so the writer also commits by time: a batch handed to `write` at time t is on disk by t + `commit_interval_s`
(plus the time to write it and what was queued before it), even when no further batch arrives; the thread waits
on its queue with that deadline. A crash therefore loses at most the batches handed over in the last
`commit_interval_s` (and those still queued behind a disk slower than the evaluation: at most `queue_size`,
after which `write` blocks). The small chunks this leaves are merged when the shard closes (`spilleval.spill.compact`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import queue
import re
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
DEFAULT_COMMIT_INTERVAL_S = 60.0  # at most this much evaluated work is lost to a crash (see the module docstring)
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
        commit_interval_s: float | None = DEFAULT_COMMIT_INTERVAL_S,
        queue_size: int = 8,
        tokenizer: Any = None,
        listeners: Sequence[BatchListener] = (),
        compression: str | None = "zstd",
        resume: bool = False,
    ) -> None:
        check_chunk_options(chunk_bytes, chunk_rows, commit_interval_s)
        self.spill_dir = Path(spill_dir)
        self.manifest = manifest
        self.rank = rank
        self.chunk_bytes = chunk_bytes
        self.chunk_rows = chunk_rows
        self.commit_interval_s = commit_interval_s
        self.compression = compression
        self.listeners = list(listeners)
        self.shard_dir = self.spill_dir / SHARDS_DIR / shard_dir_name(rank)
        created = self._prepare_directory(resume=resume)
        self._lock_fd: int | None = None
        self._saved_tokenizer = False
        try:  # from the lock on, this process owns the shard (and, on rank 0, the top-level files)
            self._lock_fd = _acquire_lock(self.shard_dir / LOCK_NAME, rank)
            self._write_metadata(tokenizer)
            self._next_seq, committed = _existing_chunks(self.shard_dir)
        except BaseException as e:
            self.release_lock()
            if self._saved_tokenizer:
                shutil.rmtree(self.spill_dir / TOKENIZER_DIR, ignore_errors=True)
            _remove_created(created)  # a failed start leaves nothing that the next run would take for a spill
            if isinstance(e, OSError) and not isinstance(e, SpillExistsError):
                raise SpillWriteError(self._describe_setup_error(e)) from e
            raise
        self.resumed_chunks: list[ChunkRecord] = committed  # what an earlier run committed (resume)
        self.rows = sum(r.rows for r in committed)
        self.tokens = sum(r.tokens for r in committed)
        self.chunks = len(committed)
        self._buffer: list[SampleBatch] = []
        self._buffer_times: list[float] = []  # when each buffered batch was handed to write() (monotonic)
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
        self._queue.put((batch, columns or {}, arrays or {}, time.monotonic()))

    def close(self, *, mark_complete: bool | None = None, keep_lock: bool = False) -> ShardSummary:
        """Flush the last chunk, record the shard as complete, release the lock.

        `mark_complete` (default: when the world size is 1) also marks the whole spill complete in the manifest;
        in a distributed run rank 0 does that with `mark_spill_complete` once every shard has closed.
        `keep_lock=True` keeps the shard locked (for writing the results after it) until `release_lock()`; an
        error releases it anyway.
        """
        if self._closed:
            return self.summary()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        try:
            self._raise_if_failed()
            self._compact()
            write_json_atomic(self.shard_dir / SHARD_DONE, self.summary().__dict__)
            if mark_complete if mark_complete is not None else self.manifest.world_size == 1:
                mark_spill_complete(self.spill_dir, self.manifest)
        except BaseException as e:
            self.release_lock()
            if isinstance(e, OSError):  # every chunk is committed; only the completion records failed
                raise SpillWriteError(self._describe_os_error(e, Path(e.filename or SHARD_DONE))) from e
            raise
        if not keep_lock:
            self.release_lock()
        return self.summary()

    def _compact(self) -> None:
        """Merge the small chunks that commits by time left (`spilleval.spill.compact`), before the shard is
        recorded complete."""
        from .compact import compact_shard
        from .reader import scan_shard

        records = compact_shard(self.shard_dir, scan_shard(self.shard_dir), chunk_bytes=self.chunk_bytes,
                                chunk_rows=self.chunk_rows, compression=self.compression)
        self.chunks = len(records)

    def release_lock(self) -> None:
        """Let another writer in (idempotent). `close` does it unless told to keep the lock."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            _release_lock(fd)

    def abort(self) -> None:
        """Stop without marking anything complete; committed chunks stay readable (as after a crash)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        self.release_lock()

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
            try:
                item = self._queue.get(timeout=self._seconds_to_deadline())
            except queue.Empty:  # no batch came, and the oldest buffered one is due: commit it now
                self._guarded(self._flush, final=True)
                continue
            if item is _STOP:
                break
            if self._error is not None:
                continue  # keep draining so producers never block on a dead consumer
            self._guarded(self._consume, *item)
        if self._error is None:
            self._guarded(self._flush, final=True)

    def _guarded(self, step: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        try:
            step(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = e

    def _seconds_to_deadline(self) -> float | None:
        """How long the thread may wait for the next batch: until the oldest buffered batch is due (None: no
        deadline, nothing buffered or no time limit)."""
        if not self._buffer_times or self.commit_interval_s is None or self._error is not None:
            return None
        return max(0.0, self._buffer_times[0] + self.commit_interval_s - time.monotonic())

    def _consume(self, batch: SampleBatch, columns, arrays, handed_at: float) -> None:
        if columns or arrays:
            batch.columns = {**batch.columns, **columns}
            batch.arrays = {**batch.arrays, **{k: np.asarray(v) for k, v in arrays.items()}}
            batch.__post_init__()
        self._record_layout(batch)
        for listener in self.listeners:
            listener(batch)
        if len(batch) == 0:
            return
        self._buffer.append(batch)
        self._buffer_times.append(handed_at)
        self._buffered_bytes += batch.nbytes()
        self._buffered_rows += len(batch)
        self._flush(final=self._seconds_to_deadline() == 0.0)  # due already: the queue was never empty

    def _flush(self, *, final: bool) -> None:
        """Commit full chunks; with `final`, everything buffered (the end, or the oldest batch is due)."""
        while self._buffer and (final or self._chunk_is_full()):
            pending = SampleBatch.concat(self._buffer)
            take = rows_for_chunk(pending, self.chunk_bytes, self.chunk_rows)
            self._commit(pending.slice(0, take))  # views: cutting chunks copies nothing
            rest = pending.slice(take, len(pending)) if take < len(pending) else None
            # the rest starts inside the batch holding row `take`: it is as old as that batch
            first_left = int(np.searchsorted(np.cumsum([len(b) for b in self._buffer]), take, side="right"))
            self._buffer_times = self._buffer_times[first_left:first_left + 1] if rest is not None else []
            self._buffer = [rest] if rest is not None else []
            self._buffered_bytes = rest.nbytes() if rest is not None else 0
            self._buffered_rows = len(rest) if rest is not None else 0

    def _record_layout(self, batch: SampleBatch) -> None:
        """Name every dataset column and per-sample array in the manifest (rank 0 owns it) when it first appears,
        before any chunk holding it is committed, so readers and `export` know what the chunks carry."""
        new_columns = [c for c in batch.columns if c not in self.manifest.columns]
        arrays = {name: {"shape": [int(d) for d in values.shape[1:]], "dtype": values.dtype.name}
                  for name, values in batch.arrays.items()}
        for name, layout in arrays.items():
            known = self.manifest.arrays.get(name)
            if known is not None and not _same_layout(known, layout):
                raise ValueError(
                    f"array {name!r} has per-sample shape {layout['shape']} and dtype {layout['dtype']} in this "
                    f"batch but {known['shape']} and {known['dtype']} before: every batch must give it the same "
                    "per-sample shape and dtype."
                )
        new_arrays = {k: v for k, v in arrays.items() if k not in self.manifest.arrays}
        if not new_columns and not new_arrays:
            return
        self.manifest.columns = [*self.manifest.columns, *new_columns]
        self.manifest.arrays = {**self.manifest.arrays, **new_arrays}
        if self.rank == 0:
            try:
                save_manifest(self.spill_dir, self.manifest)
            except OSError as e:
                raise SpillWriteError(self._describe_os_error(e, self.spill_dir / MANIFEST_NAME)) from e

    def _chunk_is_full(self) -> bool:
        rows_full = self.chunk_rows is not None and self._buffered_rows >= self.chunk_rows
        return rows_full or self._buffered_bytes >= self.chunk_bytes

    def _commit(self, batch: SampleBatch) -> None:
        seq = self._next_seq
        final_dir = self.shard_dir / chunk_dir_name(seq)
        tmp_dir = self.shard_dir / f"{TMP_PREFIX}{chunk_dir_name(seq)}"
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            write_chunk_dir(tmp_dir, batch, rank=self.rank, seq=seq, compression=self.compression)
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
        """Re-raise in the caller what failed in the thread: a write error as `SpillWriteError`; anything else (a
        listener's check or metric update rejecting a batch) as itself, so its message reaches the user as is."""
        if self._error is not None:
            error = self._error
            if isinstance(error, SpillWriteError):
                raise SpillWriteError(str(error)) from error
            if isinstance(error, OSError):
                raise SpillWriteError(f"the spill writer thread failed: {error!r}") from error
            error.add_note(f"(raised in the spill writer thread of {self.shard_dir}; committed chunks are intact)")
            self._error = SpillWriteError(f"the spill writer stopped after an earlier error: {error!r}")
            raise error

    # ------------------------------------------------------------------------------------------- set-up
    def _prepare_directory(self, *, resume: bool) -> list[Path]:
        """Check that the directory may be written (new, or resumable) and create the shard; returns the
        directories this call created, deepest last, for a failed start to remove."""
        created = [p for p in reversed([self.shard_dir, *self.shard_dir.parents]) if not p.exists()]
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
                    existing = load_manifest(self.spill_dir)
                    _check_resumable(existing, self.manifest)
                    # what the earlier run's chunks carry stays described, even if no new batch carries it
                    self.manifest.columns = [*existing.columns,
                                             *(c for c in self.manifest.columns if c not in existing.columns)]
                    self.manifest.arrays = {**existing.arrays, **self.manifest.arrays}
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if isinstance(e, SpillExistsError):
                raise
            _remove_created(created)
            raise SpillWriteError(self._describe_setup_error(e)) from e
        return created

    def _write_metadata(self, tokenizer: Any) -> None:
        """Rank 0 writes the tokenizer (once, atomically: a crash never leaves half of it) and the manifest."""
        if self.rank != 0:
            return
        unseal(self.spill_dir)  # a resumed spill changes again: it is sealed anew when it finishes
        target = self.spill_dir / TOKENIZER_DIR
        staging = self.spill_dir / f"{TMP_PREFIX}{TOKENIZER_DIR}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that crashed while saving it
        if tokenizer is not None and not target.exists():
            try:
                tokenizer.save_pretrained(str(staging))
                os.rename(staging, target)
                self._saved_tokenizer = True
                fsync_dir(self.spill_dir)
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a write error
                shutil.rmtree(staging, ignore_errors=True)
                raise SpillWriteError(self._describe_tokenizer_error(e)) from e
        save_manifest(self.spill_dir, self.manifest)

    def _describe_tokenizer_error(self, error: Exception) -> str:
        code = error.errno if isinstance(error, OSError) else _os_error_code(str(error))
        if code == errno.ENOSPC:
            cause = "the disk is full"
            fix = "free space or choose a spill_dir on a larger disk, then run the evaluation again"
        elif code in (errno.EACCES, errno.EROFS, errno.EPERM):
            cause = "the directory is not writable"
            fix = "choose a writable spill_dir, then run the evaluation again"
        else:
            cause = "saving it failed"
            fix = "fix the cause, then run the evaluation again"
        return (
            f"could not save the tokenizer into {self.spill_dir / TOKENIZER_DIR}: {cause} ({error}). This start "
            f"wrote no batch, and what it created in {self.spill_dir} was removed; {fix}."
        )

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


def _same_layout(known: dict[str, Any], layout: dict[str, Any]) -> bool:
    """Whether a manifest's description of an array (shape, dtype by any numpy spelling) matches a batch's."""
    try:
        return list(known["shape"]) == layout["shape"] and np.dtype(known["dtype"]).name == layout["dtype"]
    except (KeyError, TypeError, ValueError):
        return False


def check_chunk_options(chunk_bytes: int, chunk_rows: int | None, commit_interval_s: float | None) -> None:
    """Refuse chunk and commit settings that cannot work, before anything is evaluated."""
    if chunk_bytes <= 0 or (chunk_rows is not None and chunk_rows <= 0):
        raise ValueError("chunk_bytes and chunk_rows must be positive")
    if commit_interval_s is not None and not (commit_interval_s > 0 and math.isfinite(commit_interval_s)):
        raise ValueError(f"commit_interval_s must be a positive number of seconds (or None: commit by size only), "
                         f"got {commit_interval_s}")


def _remove_created(paths: Sequence[Path]) -> None:
    """Remove what a failed start created (deepest first): the lock file, then the directories, when empty."""
    for path in reversed(paths):
        (path / LOCK_NAME).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            return  # not empty: something else lives there, keep it and what holds it


def _os_error_code(message: str) -> int | None:
    """The errno in a Rust I/O error's text ("No space left on device (os error 28)"), as `tokenizers` raises it."""
    match = re.search(r"\(os error (\d+)\)", message)
    return int(match.group(1)) if match else None


def mark_spill_complete(spill_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record in the manifest that every shard has finished (rank 0, after all ranks closed), then seal the
    spill's metadata (`spill.integrity`; sealed again once results.json is written)."""
    manifest.status = "complete"
    save_manifest(Path(spill_dir), manifest)
    seal(Path(spill_dir))


def mark_spill_partial(spill_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record that the evaluation finished without covering every sample: readable only as a partial spill."""
    manifest.status = "partial"
    save_manifest(Path(spill_dir), manifest)


def _check_resumable(existing: Manifest, wanted: Manifest) -> None:
    for key in ("task", "vocab_size", "id_dtype", "dataset_length", "world_size", "has_logprob"):
        if getattr(existing, key) != getattr(wanted, key):
            raise SpillExistsError(
                f"cannot resume: the spill on disk has {key}={getattr(existing, key)!r} but this evaluation has "
                f"{key}={getattr(wanted, key)!r}. Resume only the same evaluation; otherwise use a new spill_dir."
            )


def _existing_chunks(shard_dir: Path) -> tuple[int, list[ChunkRecord]]:
    """Committed chunks already in the shard (for resume): next sequence number and their records."""
    from .compact import staging_dir
    from .reader import scan_shard

    for tmp in shard_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)  # a chunk that was being written when a run crashed
    shutil.rmtree(staging_dir(shard_dir), ignore_errors=True)  # a compaction that a crash interrupted
    (shard_dir / SHARD_DONE).unlink(missing_ok=True)
    records = scan_shard(shard_dir)
    return (records[-1].seq + 1 if records else 0), records


def rows_for_chunk(pending: SampleBatch, chunk_bytes: int, chunk_rows: int | None) -> int:
    """The longest prefix within chunk_bytes and chunk_rows, at least one sample (samples never split)."""
    fits = int(np.searchsorted(np.cumsum(_row_bytes(pending)), chunk_bytes, side="right"))
    limit = len(pending) if chunk_rows is None else min(chunk_rows, len(pending))
    return max(1, min(fits, limit))


def write_chunk_dir(directory: Path, batch: SampleBatch, *, rank: int, seq: int, compression: str | None) -> ChunkRecord:
    """Create `directory` holding `batch` as chunk `seq` of shard `rank`: its files and chunk.json, all fsynced."""
    directory.mkdir()
    files = write_chunk_files(directory, batch, compression=compression)
    record = ChunkRecord(rank=rank, seq=seq, rows=len(batch), tokens=batch.num_tokens,
                         min_index=int(batch.sample_index.min()), max_index=int(batch.sample_index.max()), files=files)
    write_record(directory / CHUNK_RECORD, record)
    fsync_dir(directory)
    return record


def write_record(path: Path, record: ChunkRecord) -> None:
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
    except (ValueError, KeyError, TypeError, RecursionError):  # (a file of 4,096 bytes nests 4,096 deep at most)
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
