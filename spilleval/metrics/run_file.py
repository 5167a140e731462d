"""The file of one sorted run of (hash, counts, text) rows (`ngram_table.py`): a 64-byte header, then four sections
that readers memory-map: hashes (uint64), counts (int64, `width` per row), text offsets (int64, rows + 1) and the
texts' UTF-8 bytes.

One file and one mapping per run. A run used to be a directory of four files, each opened with `np.memmap` (which
resolves its path component by component): with 16 workers, every key-range merge opened every task's run, and
those opens were 5 s of the 12 s that distinct_n's 16-worker plan spent on 2.56M tokens.

Rows may be appended in rounds without knowing how many will come (a streaming merge): the writer reserves the
hash, count and offset sections for `max_rows` rows (the texts come last and need no reserve), writes each round at
its section's cursor, and records the final sizes in the header when it closes. The unused reserve is a hole of a
sparse file (ext4, xfs, btrfs, tmpfs), not disk; a run written in one go has none. A file whose writer did not close has no header (zeros) and is refused.

Reading checks the header against the file's size before mapping, and a stretch's first and last text offsets
before Arrow reads them: a truncated or foreign file raises `RunFileError` instead of reading out of bounds.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa

MAGIC = b"SPRUN\x00\x00\x01"
HEADER = struct.Struct("<8s7Q")  # magic; rows, width, hashes_at, counts_at, offsets_at, text_at, text_bytes
assert HEADER.size == 64


class RunFileError(ValueError):
    """A run file that is not one this module wrote whole."""


@dataclass(frozen=True)
class Layout:
    rows: int
    width: int
    hashes_at: int
    counts_at: int
    offsets_at: int
    text_at: int
    text_bytes: int

    @classmethod
    def reserved(cls, max_rows: int, width: int) -> "Layout":
        """Sections sized for `max_rows` rows; the texts come last, so their reserve needs no size here."""
        hashes_at = HEADER.size
        counts_at = hashes_at + 8 * max_rows
        offsets_at = counts_at + 8 * width * max_rows
        return cls(0, width, hashes_at, counts_at, offsets_at, offsets_at + 8 * (max_rows + 1), 0)

    def packed(self) -> bytes:
        return HEADER.pack(MAGIC, self.rows, self.width, self.hashes_at, self.counts_at, self.offsets_at,
                           self.text_at, self.text_bytes)

    @classmethod
    def parse(cls, header: bytes, file_size: int, path: Path) -> "Layout":
        """The header's layout, checked to fit in a file of `file_size` bytes."""
        if len(header) < HEADER.size or header[:8] != MAGIC:
            raise RunFileError(f"{path} is not a complete n-gram run file (no header: its writer did not finish, "
                               f"or another program wrote it); delete the scratch directory and recompute")
        layout = cls(*HEADER.unpack(header[: HEADER.size])[1:])
        ends = (layout.hashes_at == HEADER.size and layout.width >= 1
                and layout.counts_at >= layout.hashes_at + 8 * layout.rows
                and layout.offsets_at >= layout.counts_at + 8 * layout.width * layout.rows
                and layout.text_at >= layout.offsets_at + 8 * (layout.rows + 1)
                and layout.text_at + layout.text_bytes <= file_size)
        if not ends:
            raise RunFileError(f"{path}: its header declares sections past the end of the file ({file_size} "
                               f"bytes): the file is truncated or damaged; delete the scratch directory and recompute")
        return layout


def _write_at(fd: int, data: np.ndarray | memoryview, offset: int) -> None:
    view = memoryview(data)
    if not view.nbytes:
        return
    view = view.cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class RunFileWriter:
    """Writes one run file, rows appended in key order in one or more rounds (`append`), the header on close.
    The file must not exist; its directory must (a run written after its scratch directory was removed fails and
    leaves nothing). Left by an error, the partial file is removed."""

    def __init__(self, path: str | os.PathLike, *, max_rows: int, width: int) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._layout = Layout.reserved(max_rows, max(width, 1))
        self._max_rows = max_rows
        _write_at(self._fd, np.zeros(1, np.int64), self._layout.offsets_at)  # the first text offset

    def append(self, hashes: np.ndarray, counts: np.ndarray, texts: pa.Array) -> None:
        """Rows after those already written (their keys larger): `texts` a large_string array."""
        layout, rows = self._layout, len(hashes)
        if layout.rows + rows > self._max_rows:
            raise ValueError(f"{rows} more rows than the {self._max_rows} reserved in {self.path}")
        _, offsets, data = texts.buffers()
        offset_values = np.frombuffer(offsets, np.int64)[texts.offset : texts.offset + rows + 1]
        first, last = int(offset_values[0]), int(offset_values[-1])
        _write_at(self._fd, np.ascontiguousarray(hashes, np.uint64), layout.hashes_at + 8 * layout.rows)
        _write_at(self._fd, np.ascontiguousarray(counts, np.int64),
                  layout.counts_at + 8 * layout.width * layout.rows)
        _write_at(self._fd, offset_values[1:] - first + layout.text_bytes, layout.offsets_at + 8 * (layout.rows + 1))
        if last > first:
            _write_at(self._fd, memoryview(data)[first:last], layout.text_at + layout.text_bytes)
        self._layout = dataclasses.replace(layout, rows=layout.rows + rows,
                                           text_bytes=layout.text_bytes + last - first)

    def close(self) -> None:
        os.ftruncate(self._fd, self._layout.text_at + self._layout.text_bytes)
        _write_at(self._fd, memoryview(self._layout.packed()), 0)
        os.close(self._fd)

    def __enter__(self) -> "RunFileWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


def count_width(counts: np.ndarray) -> int:
    """Integers per row of a run's counts: [rows] is 1, [rows, width] is width."""
    return counts.shape[1] if np.ndim(counts) == 2 else 1


def write_run_file(path: str | os.PathLike, hashes: np.ndarray, counts: np.ndarray, texts: pa.Array) -> None:
    """Sorted rows written as one new run file, no reserve."""
    with RunFileWriter(path, max_rows=len(hashes), width=count_width(counts)) as writer:
        writer.append(hashes, counts, texts)


@dataclass(frozen=True)
class MappedRun:
    """A run file's sections as read-only arrays over one mapping (`release` gives its touched pages back)."""

    mapping: mmap.mmap
    hashes: np.ndarray
    counts: np.ndarray  # [rows], or [rows, width] where width > 1
    offsets: np.ndarray
    text: np.ndarray

    def release(self) -> None:
        """Unmap the pages read so far (they stay in the page cache), so the process's memory stays flat."""
        self.mapping.madvise(mmap.MADV_DONTNEED)


def map_run_file(path: str | os.PathLike) -> MappedRun:
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        layout = Layout.parse(f.read(HEADER.size), size, path)
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    counts = np.frombuffer(mapping, np.int64, layout.rows * layout.width, layout.counts_at)
    return MappedRun(
        mapping=mapping,
        hashes=np.frombuffer(mapping, np.uint64, layout.rows, layout.hashes_at),
        counts=counts.reshape(layout.rows, layout.width) if layout.width > 1 else counts,
        offsets=np.frombuffer(mapping, np.int64, layout.rows + 1, layout.offsets_at),
        text=np.frombuffer(mapping, np.uint8, layout.text_bytes, layout.text_at),
    )


@dataclass(frozen=True)
class Rows:
    """Rows of a run read into memory: hashes, counts, and texts as Arrow's large_string buffers (offsets from 0)."""

    hashes: np.ndarray
    counts: np.ndarray  # [rows], or [rows, width] where width > 1
    offsets: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def texts(self) -> pa.LargeStringArray:
        return pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(self.offsets), pa.py_buffer(self.data))

    def text_bytes(self, row: int) -> bytes:
        return self.data[int(self.offsets[row]) : int(self.offsets[row + 1])].tobytes()

    def through(self, key_hash: np.uint64, key_text: bytes) -> int:
        """How many of these (sorted) rows have a key (hash, text) at most the given one: a binary search on the
        hashes, then on the texts of the rows that share that hash (sorted by their bytes)."""
        low = int(np.searchsorted(self.hashes, key_hash, side="left"))
        high = int(np.searchsorted(self.hashes, key_hash, side="right"))
        while low < high:
            middle = (low + high) // 2
            if self.text_bytes(middle) <= key_text:
                low = middle + 1
            else:
                high = middle
        return low

    def copy(self) -> "Rows":
        return Rows(self.hashes.copy(), self.counts.copy(), self.offsets.copy(), self.data.copy())

    def head(self, rows: int) -> "Rows":
        return Rows(self.hashes[:rows], self.counts[:rows], self.offsets[: rows + 1],
                    self.data[: int(self.offsets[rows])])


class RowReader:
    """Reads rows of a stretch [start, stop) of a run file into memory with `pread`: a merge's reader of each of
    its runs. Through a mapping, the first touch of a section maps the kernel's fault-around window (64 KiB) of
    it: a merge of a key range, which reads a block of each of 116 runs per round, held 30 MB of mapped pages in
    a round of 12,000 rows, more the more runs (the spill's tasks). Read, a round holds its rows. Offsets are
    checked to increase within the text section before Arrow reads them."""

    def __init__(self, path: str | os.PathLike, start: int = 0, stop: int | None = None) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            self.layout = Layout.parse(self._file.read(HEADER.size), os.fstat(self._file.fileno()).st_size, self.path)
            stop = self.layout.rows if stop is None else stop
            if not 0 <= start <= stop <= self.layout.rows:
                raise RunFileError(f"{self.path} holds {self.layout.rows} rows, not the rows [{start}, {stop}) "
                                   f"asked for")
        except BaseException:
            self._file.close()
            raise
        self.start, self.stop = start, stop
        self._buffers: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def mean_row_bytes(self) -> float:
        """Bytes of a row of the file, on average: its hash, counts, text offset and text."""
        layout = self.layout
        return 16 + 8 * layout.width + layout.text_bytes / max(layout.rows, 1)

    def rows(self, start: int, stop: int) -> Rows:
        """Rows [start, stop) of the stretch, in buffers that the next call overwrites."""
        if not 0 <= start <= stop <= len(self):
            raise RunFileError(f"{self.path}: rows [{start}, {stop}) are outside its stretch of {len(self)} rows")
        layout, first, count = self.layout, self.start + start, stop - start
        hashes = self._read("hashes", layout.hashes_at + 8 * first, count, np.uint64)
        counts = self._read("counts", layout.counts_at + 8 * layout.width * first, count * layout.width, np.int64)
        offsets = self._read("offsets", layout.offsets_at + 8 * first, count + 1, np.int64)
        checked_offsets(offsets, layout.text_bytes, self.path, every=True)
        data = self._read("data", layout.text_at + int(offsets[0]), int(offsets[-1] - offsets[0]), np.uint8)
        offsets -= offsets[0]
        return Rows(hashes, counts.reshape(count, layout.width) if layout.width > 1 else counts, offsets, data)

    def _read(self, name: str, at: int, values: int, dtype: type) -> np.ndarray:
        """`values` values at byte `at`, into this reader's buffer for `name`, reused from call to call (a merge
        reads a block of each of its runs every round)."""
        buffer = self._buffers.get(name)
        if buffer is None or len(buffer) < values:
            buffer = self._buffers[name] = np.empty(values, dtype)
        out = buffer[:values]
        if out.nbytes and os.preadv(self._file.fileno(), [memoryview(out).cast("B")], at) != out.nbytes:
            raise RunFileError(f"{self.path} is shorter than its header says: the file is truncated; delete the "
                               f"scratch directory and recompute")
        return out

    def close(self) -> None:
        self._file.close()


def run_file_rows(path: str | os.PathLike) -> int:
    """Rows of a run file, from its header alone."""
    path = Path(path)
    with open(path, "rb") as f:
        return Layout.parse(f.read(HEADER.size), os.fstat(f.fileno()).st_size, path).rows


def checked_offsets(offsets: np.ndarray, text_bytes: int, path: Path, *, every: bool = False) -> np.ndarray:
    """A stretch's text offsets, its first and last checked to lie in the text section (in increasing order, as
    every run this module writes has them); `every`: each offset checked not to go back, too (rows read into
    memory, whose texts Arrow reads from a buffer of just the stretch's bytes)."""
    outside = len(offsets) and not 0 <= int(offsets[0]) <= int(offsets[-1]) <= text_bytes
    if outside or (every and len(offsets) and bool(np.any(offsets[1:] < offsets[:-1]))):
        raise RunFileError(f"{path}: text offsets outside its text section; the file is damaged; delete the "
                           f"scratch directory and recompute")
    return offsets
