"""An on-disk n-gram -> count table with vectorised lookups, for CIDEr's corpus document frequencies.

The SQLite tables of `ondisk.py` cost a few microseconds per key in Python, which is most of CIDEr's time once its
arithmetic is vectorised. Here keys travel as numpy arrays: each n-gram has a 64-bit hash (to sort and search
with numpy) and its text (to check every match, so the table is exact: two n-grams whose hashes collide stay two
entries, and a lookup only counts an entry whose text is equal).

Writing buffers (hash, text, count) rows up to `buffer_rows`, then sorts them by (hash, text), sums equal keys and
writes them as a run: one file of flat sections (hashes, counts, text offsets, text bytes) that lookups
memory-map and merges read with `pread` (`run_file.py`). A count may be a row of several integers (counts of shape
[rows, width]). Runs of one size tier are merged by a streaming merge once there are `max_runs` of them, so
memory holds a buffer and a merge round, never the table. A table that is only read once, at the end, need not be
written merged: `NgramCountWriter.summarize` hands the merge's rounds to a summary. A count is the sum of the
key's counts in every run, so runs may be written anywhere, in any order: a worker process writes its task's rows
as runs (`write_runs`, uniquely named in a directory shared by the processes) and the parent adopts them
(`NgramCountWriter.adopt`) without reading their rows. With several worker processes, the workers also merge them,
one key range each (`run_partitions.py`), and the table is runs of disjoint key ranges.

The key need not be a hash: any uint64 whose order agrees with the texts' order where it differs (`prefix_keys`:
the first 8 bytes) makes the merged run sorted by text, byte by byte, which is code point order.
"""

from __future__ import annotations

import mmap
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .run_file import (RowReader, RunFileError, RunFileWriter, checked_offsets, map_run_file, run_file_rows,
                       write_run_file)

BUFFER_ROWS = 1 << 18  # rows buffered before they are sorted into a run (about 10 MB of n-grams)...
BUFFER_BYTES = 2 << 20  # ... or fewer when texts are long: 2^18 answers of 200 bytes are 52 MB, and a buffer of
# 8 MiB grew answer_macro_f1's peak by 15 MB from 1M to 5M tokens (tests/test_memory_reader.py)
MAX_RUNS = 16  # runs of one size tier merged at once (`_size_tier`): a round reads a block of each
MERGE_ROUND_BYTES = 1 << 20  # rows (8-byte hash, counts, text) a merge round reads from all its runs together
SMALL_RUN_FRACTION = 4  # an adopted run under 1/4 of a buffer of rows is read into the buffer (`adopt`)
MIN_MERGE_BLOCK = 256  # rows per run and round, at least: hundreds of rows per numpy call
MAX_LISTED_RUNS = 512  # with a pool: runs listed before the workers merge them (`NgramCountWriter._listed`)
MIN_LOOKUP_GROUP = 1024  # keys looked up between two releases of the mapped pages, at least
LOOKUP_PAGES = 256  # pages of each mapped 8-byte array that one group of keys is sized to touch
_ENTRIES_PER_PAGE = mmap.PAGESIZE // 8


class RunPool(Protocol):
    """Runs functions in the recompute's workers (`parallel.TaskPool`): `map(fn, jobs)` is [fn(*job) for job in
    jobs], computed anywhere, in order."""

    workers: int

    def map(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]: ...


def _sorted_unique(hashes: np.ndarray, texts: pa.Array, counts: np.ndarray, *,
                   runs_of_sorted: bool = False) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Rows sorted by hash, equal keys (hash and text) summed. A sort by hash puts equal keys together unless two
    different texts share a hash (a 64-bit collision): then the rows are sorted by (hash, text). Texts are taken
    only where they are compared (rows whose hash repeats) and once per distinct key: a full take of every row's
    text, twice, was a sixth of CIDEr's first pass. `runs_of_sorted`: the rows are sorted runs one after the other
    (a merge round), which a stable sort (timsort) orders in a few passes."""
    texts = texts.cast(pa.large_string())
    order = np.argsort(hashes, kind="stable" if runs_of_sorted else None)
    h = hashes[order]
    if not len(h):
        return h, texts.take(pa.array(order)), np.asarray(counts)[order]
    same_hash = h[1:] == h[:-1]
    repeated = np.flatnonzero(same_hash)
    if len(repeated) and not _all_equal(texts.take(pa.array(order[repeated])),
                                        texts.take(pa.array(order[repeated + 1]))):
        return _sorted_unique_by_text(h, texts.take(pa.array(order)), np.asarray(counts)[order])
    first = np.ones(len(h), dtype=bool)
    first[1:] = ~same_hash
    starts = np.flatnonzero(first)
    return h[starts], texts.take(pa.array(order[starts])), np.add.reduceat(np.asarray(counts)[order], starts)


def _sorted_unique_by_text(h: np.ndarray, t: pa.Array, n: np.ndarray) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """`_sorted_unique` of rows sorted by hash where two different texts share a hash: sorted by (hash, text)."""
    table = pa.table({"h": pa.array(h, pa.uint64()), "t": t, "i": pa.array(np.arange(len(h)))}).sort_by(
        [("h", "ascending"), ("t", "ascending")])
    at = table["i"].to_numpy()
    h, t, n = h[at], t.take(pa.array(at)), n[at]
    same_hash = h[1:] == h[:-1]
    same_text = pc.equal(t.slice(1), t.slice(0, len(t) - 1)).to_numpy(zero_copy_only=False)
    first = np.ones(len(h), dtype=bool)
    first[1:] = ~(same_hash & same_text)
    starts = np.flatnonzero(first)
    return h[starts], t.take(pa.array(starts)), np.add.reduceat(n, starts)


def _all_equal(left: pa.Array, right: pa.Array) -> bool:
    return bool(pc.all(pc.equal(left, right)).as_py())


def prefix_keys(texts: pa.Array) -> np.ndarray:
    """Each text's first 8 UTF-8 bytes (zero-padded) as a big-endian uint64: keys whose order never contradicts the
    texts' byte order, so a table keyed by them is sorted by text (ties, such as texts sharing 8 bytes, are sorted
    by text like colliding hashes)."""
    texts = texts.cast(pa.large_string())
    if not len(texts):
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None and len(data) else np.zeros(1, np.uint8)
    at = offsets[:-1, None] + np.arange(8)
    inside = at < offsets[1:, None]
    first = np.where(inside, data[np.minimum(at, len(data) - 1)], 0).astype(np.uint8)
    return first.view(">u8").ravel().astype(np.uint64)

def _write_run(path: Path, hashes: np.ndarray, texts: pa.Array, counts: np.ndarray) -> None:
    write_run_file(path, hashes, np.asarray(counts), texts.cast(pa.large_string()))


class Run:
    """One sorted run, memory-mapped read-only, for lookups; `start`/`stop`: a stretch of its rows only. (Merges
    read runs with `run_file.RowReader` instead.)"""

    def __init__(self, path: Path, start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        self._mapped = map_run_file(self.path)
        rows = len(self._mapped.hashes)
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise RunFileError(f"{self.path} holds {rows} rows, not the rows [{start}, {stop}) asked for")
        self.hashes = self._mapped.hashes[start:stop]
        self.counts = self._mapped.counts[start:stop]
        self._offsets = checked_offsets(self._mapped.offsets[start : stop + 1], len(self._mapped.text), self.path)
        self._data = self._mapped.text
        self.texts = pa.LargeStringArray.from_buffers(len(self.hashes), pa.py_buffer(self._offsets),
                                                      pa.py_buffer(self._data))

    def __len__(self) -> int:
        return len(self.hashes)

    def text_bytes(self, row: int) -> bytes:
        return bytes(self._data[int(self._offsets[row]) : int(self._offsets[row + 1])])

    def release(self) -> None:
        """Unmap the pages a lookup touched (they stay in the page cache), so the process's memory stays flat."""
        self._mapped.release()

    def _positions(self, hashes: np.ndarray) -> np.ndarray:
        """`np.searchsorted(self.hashes, hashes)`, searching only the stretch of the run between the smallest and
        the largest key. numpy searches each of sorted keys from the previous key's position to the end of the
        array, so over the whole run a group's probes would touch pages far past its stretch, more pages the
        larger the run: the stretch's pages alone are about LOOKUP_PAGES (`lookup_group`)."""
        low = int(np.searchsorted(self.hashes, hashes.min(), side="left"))
        high = int(np.searchsorted(self.hashes, hashes.max(), side="right"))
        return low + np.searchsorted(self.hashes[low:high], hashes, side="left")

    def lookup(self, hashes: np.ndarray, texts_at: Callable[[np.ndarray], pa.Array],
               present: np.ndarray | None = None) -> np.ndarray:
        """Count of each (hash, text) key in this run, 0 when absent. `texts_at(positions)`: the texts of those keys,
        taken only where a text must be compared. `present` marks keys known to be in this run: where such a key's
        hash is on one entry only, that entry is the key's, and no text is compared."""
        found = np.zeros(len(hashes), dtype=np.int64)
        if not len(self) or not len(hashes):
            return found
        position = self._positions(hashes)
        pending = np.flatnonzero(position < len(self))
        if present is not None and len(pending):
            at = position[pending]
            after = np.minimum(at + 1, len(self) - 1)
            one_entry = (self.hashes[at] == hashes[pending]) & ((at + 1 == len(self)) |
                                                                (self.hashes[after] != hashes[pending]))
            alone = present[pending] & one_entry
            found[pending[alone]] = self.counts[at[alone]]
            pending = pending[~alone]
        while len(pending):  # usually one round: a second only where different n-grams share a hash
            at = position[pending]
            same_hash = self.hashes[at] == hashes[pending]
            pending, at = pending[same_hash], at[same_hash]
            if not len(pending):
                break
            equal = pc.equal(texts_at(pending), self.texts.take(pa.array(at))).to_numpy(zero_copy_only=False)
            found[pending[equal]] = self.counts[at[equal]]
            pending = pending[~equal]
            position[pending] += 1
            pending = pending[position[pending] < len(self)]
        return found


def write_runs(directory: str | os.PathLike, rows: Iterable[tuple[np.ndarray, pa.Array, np.ndarray]], *,
               buffer_rows: int | None = None) -> list["RunPart"]:
    """(hash, text, count) rows written as sorted runs of about `buffer_rows` rows each into `directory` (which
    exists): a worker's share of a table, for the parent to `adopt`. Runs get unique names, since tasks of many
    processes write into one directory. Empty parts write nothing."""
    limit = BUFFER_ROWS if buffer_rows is None else buffer_rows
    runs: list[RunPart] = []
    pending: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
    pending_rows = 0
    for part in rows:
        if len(part[0]):
            pending.append(part)
            pending_rows += len(part[0])
        if pending_rows >= limit:
            runs.append(_write_sorted(Path(directory), pending))
            pending, pending_rows = [], 0
    if pending:
        runs.append(_write_sorted(Path(directory), pending))
    return runs


def _write_sorted(directory: Path, parts: Sequence[tuple[np.ndarray, pa.Array, np.ndarray]]) -> "RunPart":
    """The rows of `parts` as one new run in `directory` (sorted, equal keys summed)."""
    path = new_run_path(directory)
    hashes, texts, counts = _sorted_unique(np.concatenate([p[0] for p in parts]),
                                           pa.concat_arrays([p[1].cast(pa.large_string()) for p in parts]),
                                           np.concatenate([p[2] for p in parts]))
    _write_run(path, hashes, texts, counts)
    return RunPart(path, 0, len(hashes))


def new_run_path(directory: Path) -> Path:
    return directory / f"run-{uuid.uuid4().hex}"


def _read_run(part: "RunPart") -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """A stretch of a run's rows, read into memory (hash, text, counts)."""
    reader = part.reader()
    try:
        rows = reader.rows(0, len(reader))  # (the reader's buffers, which only these rows use)
    finally:
        reader.close()
    return rows.hashes, rows.texts, rows.counts


@dataclass(frozen=True)
class RunPart:
    """Rows [start, stop) of the run at `path`; `owned`: the writer holding it deletes the run once merged (a
    stretch of a run that others read too is not owned)."""

    path: Path
    start: int
    stop: int
    owned: bool = True

    def stretch(self) -> tuple[str, int, int]:
        """(path, start, stop), as a key-range job receives it (`run_partitions`)."""
        return os.fspath(self.path), self.start, self.stop

    @classmethod
    def whole(cls, path: Path) -> "RunPart":
        return cls(Path(path), 0, run_file_rows(path))

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def open(self) -> Run:
        return Run(self.path, self.start, self.stop)

    def reader(self) -> RowReader:
        return RowReader(self.path, self.start, self.stop)

    def discard(self) -> None:
        if self.owned:
            _remove_run(self.path)


def _remove_run(path: Path) -> None:
    path.unlink()


class NgramCountWriter:
    """Accumulates (hash, text, count) rows into sorted runs under `directory` (which must not exist yet): rows
    added here (buffered, sorted by this process) or runs written elsewhere (`adopt`).

    With a `pool` of several workers (`RunPool`: the recompute's worker processes), adopted runs are only listed
    here, and `finish` merges them in the workers, one key range each (`run_partitions.py`): the table is then
    several runs of disjoint key ranges. Without one, this process merges them into one run."""

    def __init__(self, directory: str | os.PathLike, *, buffer_rows: int | None = None,
                 max_runs: int | None = None, pool: "RunPool | None" = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.buffer_rows = BUFFER_ROWS if buffer_rows is None else buffer_rows  # read now: a probe may cap it
        self.max_runs = MAX_RUNS if max_runs is None else max_runs
        self.pool = pool if pool is not None and pool.workers > 1 else None
        self._pending: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
        self._pending_rows = self._pending_bytes = 0
        self._runs: list[RunPart] = []
        self._merged: list[RunPart] = []  # with a pool: the key-range runs of earlier merges (`_listed`)...
        self._merges = 0  # ... made by this many merges

    def add(self, hashes: np.ndarray, texts: pa.Array, counts: np.ndarray) -> None:
        if len(hashes):
            self._pending.append((hashes, texts, counts))
            self._pending_rows += len(hashes)
            self._pending_bytes += hashes.nbytes + texts.nbytes + np.asarray(counts).nbytes
        if self._pending_rows >= self.buffer_rows or self._pending_bytes >= BUFFER_BYTES:
            self._flush()

    def adopt(self, run: str | os.PathLike | RunPart) -> None:
        """Take over a run written by `write_runs` (anywhere in the same file system), or a stretch of one
        (`RunPart`): it is merged, then deleted (when owned), with this writer's runs. With a pool it is only
        listed. Otherwise a small run (under a quarter of a buffer: the runs of the small tasks of many workers) is
        read into the buffer and sorted with the rows buffered next to it: merged as runs, hundreds of them, each
        merge round cost every run a binary search, slices and page releases (16-worker CIDEr ran slower than one
        worker)."""
        part = run if isinstance(run, RunPart) else RunPart.whole(Path(run))
        if self.pool is not None:
            self._listed(part)
        elif part.rows * SMALL_RUN_FRACTION < self.buffer_rows:
            self.add(*_read_run(part))
            part.discard()
        else:
            self._keep(part)

    def _listed(self, part: RunPart) -> None:
        """With a pool: list the run; past MAX_LISTED_RUNS, merge the listed runs in the workers, so the parent's
        list stays bounded however many tasks the spill makes."""
        self._runs.append(part)
        if len(self._runs) > MAX_LISTED_RUNS:
            from .run_partitions import merge_in_ranges

            self._merged += merge_in_ranges(self._runs, self.directory, self.pool)
            self._runs, self._merges = [], self._merges + 1

    def _keep(self, part: RunPart) -> None:
        """Keep a run; once `max_runs` runs of its size tier are kept, merge them into one of the next tier."""
        self._runs.append(part)
        fan_in = max(2, self.max_runs)
        tier = _size_tier(part.rows, fan_in)
        same = [run for run in self._runs if _size_tier(run.rows, fan_in) == tier]
        if len(same) >= fan_in:
            self._runs = [run for run in self._runs if _size_tier(run.rows, fan_in) != tier]
            self._keep(RunPart.whole(self._merge(same)))

    def finish(self) -> list[Path]:
        """Write what is buffered and merge the runs: the runs to read with `NgramCounts`, one, or with a pool
        several of disjoint key ranges in key order."""
        runs, ranges = self._table_runs()
        if self.pool is not None:
            if not ranges:
                from .run_partitions import merge_in_ranges

                runs = merge_in_ranges(runs, self.directory, self.pool)
        elif len(runs) > 1 or (runs and not runs[0].owned):
            runs = [RunPart.whole(self._merge(runs))]
        self._runs = runs
        return [part.path for part in runs]

    def summarize(self, summary: Callable[[Iterator[np.ndarray]], Any]) -> list[Any]:
        """`summary` of the table's counts, read in key order as [rows, width] blocks, once per part of the table
        (key ranges, in key order): for a table read once, at the end (distinct n-grams, answers). No merged run
        is written: the merge's rounds go to `summary` as they come, with a pool in the workers that merge each
        key range. `summary` must be picklable (a module-level function) for the pool's workers."""
        runs, ranges = self._table_runs()
        if self.pool is None or len(runs) < 2:
            results = [summarize_rounds(merged_rounds(runs), summary)] if runs else []
        elif ranges:
            from .run_partitions import summarize_slices

            results = self.pool.map(summarize_slices, [([part.stretch()], summary) for part in runs])
        else:
            from .run_partitions import summarize_in_ranges

            return summarize_in_ranges(runs, self.pool, summary)  # (removes the runs)
        for part in runs:
            part.discard()
        return results

    def _table_runs(self) -> tuple[list[RunPart], bool]:
        """Every run of the table (what is buffered written first), and whether they are the disjoint key ranges
        of one merge already (with a pool)."""
        self._flush()
        runs = self._merged + self._runs
        ranges = len(runs) < 2 or (not self._runs and self._merges <= 1)
        self._runs, self._merged, self._merges = [], [], 0
        return runs, ranges

    def _flush(self) -> None:
        if not self._pending:
            return
        part = _write_sorted(self.directory, self._pending)
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        self._keep(part)

    def _merge(self, runs: Sequence[RunPart]) -> Path:
        """The runs merged into one new run (`write_merged`), the owned ones removed."""
        out = new_run_path(self.directory)
        write_merged(out, runs)
        for part in runs:
            part.discard()
        return out


def _size_tier(rows: int, fan_in: int) -> int:
    """A run's size tier: runs of rows within [fan_in^t, fan_in^(t+1)) are merged together (a size-tiered
    compaction), so a row is merged about log(rows) / log(fan_in) times. Merging the `max_runs` smallest runs
    instead put the run of the last merge into each next merge with the new runs, so the rows merged grew with the
    square of the table: CIDEr on 10.24M tokens, one worker, read 239M rows in its merges for a 49M-row table;
    by tiers, 121M."""
    return int(np.log(max(rows, 1)) / np.log(fan_in))


def write_merged(path: Path, runs: Sequence[RunPart], round_bytes: int | None = None, *,
                 release: bool = False) -> None:
    """The rows of `runs` (stretches of sorted runs) merged, equal keys summed, into one new run at `path`."""
    readers = [part.reader() for part in runs]
    width = max(reader.layout.width for reader in readers)
    with RunFileWriter(path, max_rows=sum(map(len, readers)), width=width) as writer:
        for hashes, texts, counts in _rounds(readers, round_bytes, release):
            writer.append(hashes, counts, texts)


def summarize_rounds(rounds: Iterable[tuple[np.ndarray, pa.Array, np.ndarray]],
                     summary: Callable[[Iterator[np.ndarray]], Any]) -> Any:
    """`summary` of the rounds' counts, as [rows, width] blocks."""
    return summary(np.asarray(counts).reshape(len(counts), -1) for _, _, counts in rounds)


def merged_rounds(runs: Sequence[RunPart], round_bytes: int | None = None, *, release: bool = False,
                  ) -> Iterator[tuple[np.ndarray, pa.Array, np.ndarray]]:
    """The rows of `runs` (stretches of sorted runs) in key order, equal keys summed (see `_rounds`)."""
    return _rounds([part.reader() for part in runs], round_bytes, release)


def _rounds(readers: Sequence[RowReader], round_bytes: int | None, release: bool = False,
            ) -> Iterator[tuple[np.ndarray, pa.Array, np.ndarray]]:
    """The rows of the runs in key order, equal keys summed, in rounds of about `round_bytes`
    (MERGE_ROUND_BYTES) of input, at least MIN_MERGE_BLOCK rows per run: a streaming merge, which closes the
    readers. Each round reads the next block of every run and takes, from each, the rows whose key (hash, text) is
    at most the smallest of the keys that end the blocks, so equal keys always meet in one round, however many
    keys share a hash and however long the texts (answers of 200 bytes: a budget in rows held 17 runs x 1,927 rows,
    20 MB with the round's copies). Rows read but not taken are read again by the next round.

    `release`: after each round, Arrow's allocator gives back the memory it no longer uses (the key-range merges
    in the workers). mimalloc (pyarrow's default) kept it there: a worker's peak during a merge of 80 runs was
    21 MB higher than for 20 runs of the same rounds, and equal with the system allocator or with the release. In
    the parent's merges the release did the opposite: answer_macro_f1's peak on 5M tokens, 1 worker, rose by
    17 MB (`tests/test_memory_reader.py`)."""
    try:
        block_rows = _block_rows(readers, MERGE_ROUND_BYTES if round_bytes is None else round_bytes)
        cursor = [0] * len(readers)
        while live := [i for i, reader in enumerate(readers) if cursor[i] < len(reader)]:
            blocks = {i: readers[i].rows(cursor[i], min(cursor[i] + block_rows[i], len(readers[i]))) for i in live}
            ends = [(block.hashes[-1], block.text_bytes(len(block) - 1)) for i, block in blocks.items()
                    if cursor[i] + len(block) < len(readers[i])]  # (a block that ends its run bounds nothing)
            taken = [block.head(block.through(*min(ends))) if ends else block for block in blocks.values()]
            for i, block in zip(blocks, taken):
                cursor[i] += len(block)
            if len(readers) == 1:  # one run's rows are sorted and unique already (copied off the reader's buffers)
                rows = taken[0].copy()
                yield rows.hashes, rows.texts, rows.counts
            else:
                yield _sorted_unique(np.concatenate([b.hashes for b in taken]),
                                     pa.concat_arrays([b.texts for b in taken]),
                                     np.concatenate([b.counts for b in taken]), runs_of_sorted=True)
                if release:
                    pa.default_memory_pool().release_unused()
    finally:
        for reader in readers:
            reader.close()


def _block_rows(readers: Sequence[RowReader], round_bytes: int) -> list[int]:
    """Rows a round reads from each run: its share of the round's bytes in proportion to its rows, so that every
    block ends near the same key (runs hold keys of one distribution, densely or sparsely). With equal shares, the
    block of a small run reached far past the key that ended a large run's block: a round took a sliver of it and
    read the rest again the next round. A merge of a 4.7M-row run with 15 runs of 120k-350k rows took 2,933 rounds
    of 3,300 rows (2.4 s); in proportion, 387 rounds (0.75 s)."""
    total = max(sum(len(reader) for reader in readers), 1)
    return [max(MIN_MERGE_BLOCK, int(round_bytes * len(reader) / total / reader.mean_row_bytes()))
            for reader in readers]


class NgramCounts:
    """Read side: the count of each key, summed over the runs (memory-mapped, so several processes share them).
    Runs of disjoint key ranges in key order (a merge in ranges, `run_partitions.py`) are read as one table: a
    key is looked up in the run of its range only."""

    def __init__(self, runs: Sequence[str | os.PathLike]) -> None:
        self.runs = [Run(Path(p)) for p in runs]
        self._filled = np.flatnonzero([len(run) > 0 for run in self.runs])  # the runs that hold rows
        filled = [self.runs[i] for i in self._filled]
        self._ranges = all(a.hashes[-1] < b.hashes[0] for a, b in zip(filled, filled[1:]))
        self._firsts = np.array([run.hashes[0] for run in filled], np.uint64)  # each filled run's smallest key

    def get(self, hashes: np.ndarray, texts_at: Callable[[np.ndarray], pa.Array],
            present: np.ndarray | None = None) -> np.ndarray:
        """Counts of the keys, 0 for absent ones; `texts_at(positions)` gives the texts of those keys, asked only
        where a text must be compared. Keys are looked up in hash order, a group at a time, and the
        pages a group touched are given back before the next: memory does not grow with the table.

        `present` (optional) marks keys known to be in the table (CIDEr: the n-grams of references, all counted in
        the first pass); where the key's run is the only one that can hold it, such a key whose hash no other entry
        has needs no text comparison."""
        hashes = np.asarray(hashes, np.uint64)
        total = np.zeros(len(hashes), dtype=np.int64)
        known = present if present is not None and (self._ranges or len(self.runs) == 1) else None
        route = self._route(hashes)
        # in order of the hashes' top 16 bits (a radix sort, 5x faster than a full one): each group then reads one
        # stretch of the run's pages
        in_order = np.argsort((hashes >> np.uint64(48)).astype(np.uint16), kind="stable")
        for index, run in enumerate(self.runs):
            mine = in_order if route is None else in_order[route[in_order] == index]  # a key range: its run only
            size = lookup_group(len(mine), len(run))
            for start in range(0, len(mine), size):
                keys = mine[start : start + size]
                total[keys] += run.lookup(hashes[keys], lambda rows, keys=keys: texts_at(keys[rows]),
                                          None if known is None else known[keys])
                run.release()
        return total

    def _route(self, hashes: np.ndarray) -> np.ndarray | None:
        """The run of each key's range, or None where every run must be searched."""
        if not self._ranges or len(self._filled) < 2:  # (no key can be in an empty run)
            return None
        return self._filled[np.maximum(np.searchsorted(self._firsts, hashes, side="right") - 1, 0)]


def lookup_group(keys: int, entries: int) -> int:
    """Keys per lookup group, so that a group touches about LOOKUP_PAGES pages of each 8-byte array whatever the
    table's size. Hashes spread evenly: `g` of `keys` sorted keys cover about g/keys of the table's `entries`, that
    / 512 pages, and never more than one page per key (plus their binary searches). Where keys are dense (many per
    page) a group of LOOKUP_PAGES x 512 x keys / entries keys covers LOOKUP_PAGES pages; where they are sparse,
    MIN_LOOKUP_GROUP keys bound it (a group of 8,192 sparse keys grew the peak by 10 MB from 20k to 40k samples).
    Fewer, larger groups matter: each costs a few numpy and Arrow calls per run."""
    dense = LOOKUP_PAGES * _ENTRIES_PER_PAGE * keys // max(entries, 1)
    return max(MIN_LOOKUP_GROUP, min(keys, dense))
