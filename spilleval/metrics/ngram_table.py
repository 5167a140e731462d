"""An on-disk n-gram -> count table with vectorised lookups, for CIDEr's corpus document frequencies.

The SQLite tables of `ondisk.py` cost a few microseconds per key in Python, which is most of CIDEr's time once its
arithmetic is vectorised. Here keys travel as numpy arrays: each n-gram has a 64-bit hash (to sort and search
with numpy) and its text (to check every match, so the table is exact: two n-grams whose hashes collide stay two
entries, and a lookup only counts an entry whose text is equal).

Writing buffers (hash, text, count) rows up to `buffer_rows`, then sorts them by hash, sums equal keys and
writes them as a run: four flat files (hashes, counts, text offsets, text bytes) that readers memory-map. Runs are
merged by a streaming merge when there are more than `max_runs`, so memory holds a buffer, never the table.
A count is the sum of the key's counts in every run.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BUFFER_ROWS = 1 << 18  # about 10 MB of rows (with their texts) buffered before they are sorted into a run
MAX_RUNS = 16  # runs merged at once: a merge maps every run's current pages, so its memory grows with this
MIN_LOOKUP_GROUP = 1024  # keys looked up between two releases of the mapped pages, at least
LOOKUP_PAGES = 256  # pages of each mapped 8-byte array that one group of keys is sized to touch
_ENTRIES_PER_PAGE = mmap.PAGESIZE // 8
_FILES = ("hash.u64", "count.i64", "offsets.i64", "text.utf8")


def _sorted_unique(hashes: np.ndarray, texts: pa.Array, counts: np.ndarray) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Rows sorted by hash, equal keys (hash and text) summed. A sort by hash puts equal keys together unless two
    different texts share a hash (a 64-bit collision): then the rows are sorted by (hash, text)."""
    texts = texts.cast(pa.large_string())
    order = np.argsort(hashes)
    h, t, n = hashes[order], texts.take(pa.array(order)), np.asarray(counts)[order]
    if not len(h):
        return h, t, n
    same_hash = h[1:] == h[:-1]
    same_text = pc.equal(t.slice(1), t.slice(0, len(t) - 1)).to_numpy(zero_copy_only=False)
    if np.any(same_hash & ~same_text):  # a collision: order its texts so that equal ones are adjacent
        table = pa.table({"h": pa.array(h, pa.uint64()), "t": t, "n": pa.array(n, pa.int64())}).sort_by(
            [("h", "ascending"), ("t", "ascending")])
        h, t, n = table["h"].to_numpy(), table["t"].combine_chunks(), table["n"].to_numpy()
        same_hash = h[1:] == h[:-1]
        same_text = pc.equal(t.slice(1), t.slice(0, len(t) - 1)).to_numpy(zero_copy_only=False)
    first = np.ones(len(h), dtype=bool)
    first[1:] = ~(same_hash & same_text)
    starts = np.flatnonzero(first)
    return h[starts], t.take(pa.array(starts)), np.add.reduceat(n, starts)


def _write_run(path: Path, hashes: np.ndarray, texts: pa.Array, counts: np.ndarray) -> None:
    path.mkdir(parents=True)
    texts = texts.cast(pa.large_string())
    _, offsets, data = texts.buffers()
    start = texts.offset
    offset_values = np.frombuffer(offsets, dtype=np.int64)[start : start + len(texts) + 1]
    base = int(offset_values[0])
    with open(path / _FILES[0], "wb") as f:
        f.write(np.ascontiguousarray(hashes, np.uint64).tobytes())
    with open(path / _FILES[1], "wb") as f:
        f.write(np.ascontiguousarray(counts, np.int64).tobytes())
    with open(path / _FILES[2], "wb") as f:
        f.write((offset_values - base).tobytes())
    with open(path / _FILES[3], "wb") as f:
        f.write(memoryview(data)[base : int(offset_values[-1])] if data is not None else b"")


class Run:
    """One sorted run, memory-mapped read-only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.hashes = _map(self.path / _FILES[0], np.uint64)
        self.counts = _map(self.path / _FILES[1], np.int64)
        self._offsets = _map(self.path / _FILES[2], np.int64)
        self._data = _map(self.path / _FILES[3], np.uint8)
        self.texts = pa.LargeStringArray.from_buffers(len(self.hashes), pa.py_buffer(self._offsets),
                                                      pa.py_buffer(self._data))

    def __len__(self) -> int:
        return len(self.hashes)

    def release(self) -> None:
        """Unmap the pages a lookup touched (they stay in the page cache), so the process's memory stays flat."""
        for array in (self.hashes, self.counts, self._offsets, self._data):
            mapping = getattr(array, "_mmap", None)
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)

    def lookup(self, hashes: np.ndarray, texts_at: Callable[[np.ndarray], pa.Array],
               present: np.ndarray | None = None) -> np.ndarray:
        """Count of each (hash, text) key in this run, 0 when absent. `texts_at(positions)`: the texts of those keys,
        taken only where a text must be compared. `present` marks keys known to be in this run: where such a key's
        hash is on one entry only, that entry is the key's, and no text is compared."""
        found = np.zeros(len(hashes), dtype=np.int64)
        if not len(self) or not len(hashes):
            return found
        position = np.searchsorted(self.hashes, hashes, side="left")
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


def _map(path: Path, dtype: type) -> np.ndarray:
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class NgramCountWriter:
    """Accumulates (hash, text, count) rows into sorted runs under `directory` (which must not exist yet)."""

    def __init__(self, directory: str | os.PathLike, *, buffer_rows: int | None = None,
                 max_runs: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.buffer_rows = BUFFER_ROWS if buffer_rows is None else buffer_rows  # read now: a probe may cap it
        self.max_runs = MAX_RUNS if max_runs is None else max_runs
        self._pending: list[tuple[np.ndarray, pa.Array, np.ndarray]] = []
        self._pending_rows = 0
        self._runs: list[Path] = []
        self._made = 0

    def add(self, hashes: np.ndarray, texts: pa.Array, counts: np.ndarray) -> None:
        if len(hashes):
            self._pending.append((hashes, texts, counts))
            self._pending_rows += len(hashes)
        if self._pending_rows >= self.buffer_rows:
            self._flush()

    def finish(self) -> list[Path]:
        """Write what is buffered and merge the runs into one; the runs to read with `NgramCounts`."""
        self._flush()
        if len(self._runs) > 1:
            self._runs = [self._merge(self._runs)]
        return list(self._runs)

    def _flush(self) -> None:
        if not self._pending:
            return
        hashes = np.concatenate([p[0] for p in self._pending])
        texts = pa.concat_arrays([p[1].cast(pa.large_string()) for p in self._pending])
        counts = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_rows = [], 0
        path = self._new_run_path()
        _write_run(path, *_sorted_unique(hashes, texts, counts))
        self._runs.append(path)
        if len(self._runs) > self.max_runs:
            self._runs = [self._merge(self._runs)]

    def _new_run_path(self) -> Path:
        self._made += 1
        return self.directory / f"run-{self._made:06d}"

    def _merge(self, runs: Sequence[Path]) -> Path:
        """Streaming merge: each round takes, from every run, the rows whose hash is below the smallest of the
        hashes that end the runs' next blocks, so equal keys always meet in one round."""
        opened = [Run(p) for p in runs]
        block_rows = max(1024, self.buffer_rows // len(opened))  # a round holds about one buffer of rows
        cursor = [0] * len(opened)
        out = self._new_run_path()
        out.mkdir(parents=True)
        files = [open(out / name, "wb") for name in _FILES]
        text_bytes = 0
        files[2].write(np.zeros(1, np.int64).tobytes())
        try:
            while any(c < len(r) for c, r in zip(cursor, opened)):
                ends = [r.hashes[min(c + block_rows, len(r)) - 1] for c, r in zip(cursor, opened)
                        if c + block_rows < len(r)]
                bound = min(ends) if ends else None
                parts = []
                for i, run in enumerate(opened):
                    stop = len(run) if bound is None else int(np.searchsorted(run.hashes, bound, side="left"))
                    stop = max(stop, cursor[i])
                    parts.append((i, cursor[i], stop))
                if bound is not None and all(a == b for _, a, b in parts):  # one hash fills a whole block
                    parts = [(i, cursor[i], int(np.searchsorted(r.hashes, bound, side="right")))
                             for i, r in enumerate(opened)]
                block = [(opened[i].hashes[a:b], opened[i].texts.slice(a, b - a), opened[i].counts[a:b])
                         for i, a, b in parts if b > a]
                for i, _, b in parts:
                    cursor[i] = b
                hashes, texts, counts = _sorted_unique(np.concatenate([p[0] for p in block]),
                                                       pa.concat_arrays([p[1] for p in block]),
                                                       np.concatenate([p[2] for p in block]))
                _, offsets, data = texts.buffers()
                offset_values = np.frombuffer(offsets, dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
                files[0].write(hashes.astype(np.uint64).tobytes())
                files[1].write(counts.astype(np.int64).tobytes())
                files[2].write((offset_values[1:] - offset_values[0] + text_bytes).tobytes())
                files[3].write(memoryview(data)[int(offset_values[0]) : int(offset_values[-1])] if data else b"")
                text_bytes += int(offset_values[-1] - offset_values[0])
                for run in opened:
                    run.release()
        finally:
            for f in files:
                f.close()
        for path in runs:
            for name in _FILES:
                (path / name).unlink()
            path.rmdir()
        return out


class NgramCounts:
    """Read side: the count of each key, summed over the runs (memory-mapped, so several processes share them)."""

    def __init__(self, runs: Sequence[str | os.PathLike]) -> None:
        self.runs = [Run(Path(p)) for p in runs]

    def get(self, hashes: np.ndarray, texts: pa.Array, present: np.ndarray | None = None) -> np.ndarray:
        """Counts of the keys, 0 for absent ones. Keys are looked up in hash order, a group at a time, and the
        pages a group touched are given back before the next: memory does not grow with the table.

        `present` (optional) marks keys known to be in the table (CIDEr: the n-grams of references, all counted in
        the first pass); with one run, such a key whose hash no other entry has needs no text comparison."""
        total = np.zeros(len(hashes), dtype=np.int64)
        known = present if present is not None and len(self.runs) == 1 else None
        # in order of the hashes' top 16 bits (a radix sort, 5x faster than a full one): each group then reads one
        # stretch of the run's pages
        in_order = np.argsort((np.asarray(hashes, np.uint64) >> np.uint64(48)).astype(np.uint16), kind="stable")
        size = lookup_group(len(hashes), sum(len(run) for run in self.runs))
        for start in range(0, len(hashes), size):
            group = in_order[start : start + size]
            for run in self.runs:
                total[group] += run.lookup(hashes[group], lambda rows: texts.take(pa.array(group[rows])),
                                           None if known is None else known[group])
                run.release()
        return total


def lookup_group(keys: int, entries: int) -> int:
    """Keys per lookup group, so that a group touches about LOOKUP_PAGES pages of each 8-byte array whatever the
    table's size. Hashes spread evenly: `g` of `keys` sorted keys cover about g/keys of the table's `entries`, that
    / 512 pages, and never more than one page per key (plus their binary searches). Where keys are dense (many per
    page) a group of LOOKUP_PAGES x 512 x keys / entries keys covers LOOKUP_PAGES pages; where they are sparse,
    MIN_LOOKUP_GROUP keys bound it (a group of 8,192 sparse keys grew the peak by 10 MB from 20k to 40k samples).
    Fewer, larger groups matter: each costs a few numpy and Arrow calls per run."""
    dense = LOOKUP_PAGES * _ENTRIES_PER_PAGE * keys // max(entries, 1)
    return max(MIN_LOOKUP_GROUP, min(keys, dense))
