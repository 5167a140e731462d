"""Sets of dataset sample indices whose memory follows the samples present, not the largest index or a length.

The reader's de-duplication, `completeness()`, `diff`, and on the writer side `FirstSeen` and `CommittedSamples`
each remember which samples they have met. One byte per declared sample made a manifest claiming 3·10⁹ samples
cost gigabytes before a single chunk was read; a roaring bitmap (pyroaring, 64-bit) stores runs and sparse
indices compactly: a contiguous range of any length in a few bytes, a dense block at one bit per sample.
"""

from __future__ import annotations

from array import array
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
from pyroaring import BitMap64


class SampleSet:
    """A set of non-negative sample indices, updated and queried a numpy array at a time."""

    def __init__(self, indices: Iterable[int] | np.ndarray | None = None) -> None:
        self._bits = BitMap64()
        if indices is not None:
            self.add(np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices))

    # ------------------------------------------------------------------------------------------- updates
    def add(self, indices: np.ndarray) -> None:
        if len(indices):
            self._bits.update(_bitmap(indices))

    def add_range(self, start: int, stop: int) -> None:
        if stop > start:
            self._bits.add_range(start, stop)

    def discard(self, indices: np.ndarray) -> None:
        if len(indices):
            self._bits.difference_update(_bitmap(indices))

    def first_occurrences(self, indices: np.ndarray) -> np.ndarray | None:
        """Add `indices`; return which of them are new: not in the set before and first of their repeats here.
        None means all of them (the common case, found without building a mask)."""
        incoming = _bitmap(indices)
        if len(incoming) == len(indices) and self._bits.isdisjoint(incoming):
            self._bits.update(incoming)
            return None
        _, first = np.unique(indices, return_index=True)
        keep = np.zeros(len(indices), dtype=bool)
        keep[first] = True
        keep &= ~self.contains(indices)
        self._bits.update(incoming)
        return keep

    # ------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self._bits)

    def __contains__(self, index: int) -> bool:
        return 0 <= index and index in self._bits

    def __iter__(self) -> Iterator[int]:
        return iter(self._bits)

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `indices` are in the set (negative ones never are)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        valid = indices >= 0
        if not len(self._bits) or not valid.any():
            return np.zeros(len(indices), dtype=bool)
        present = _bitmap(indices[valid]) & self._bits
        mask = np.zeros(len(indices), dtype=bool)
        if len(present):
            mask[valid] = np.isin(indices[valid], _array(present))
        return mask

    def count_range(self, start: int, stop: int) -> int:
        return self._bits.range_cardinality(start, stop) if stop > start else 0

    def in_range(self, start: int, stop: int) -> "SampleSet":
        """The members in [start, stop)."""
        window = BitMap64()
        window.add_range(start, stop)
        return self._wrap(self._bits & window)

    def dense(self, start: int, stop: int) -> np.ndarray:
        """A boolean mask over [start, stop): for a bounded block, e.g. one all-reduce of the distributed owners."""
        mask = np.zeros(stop - start, dtype=bool)
        mask[_array(self.in_range(start, stop)._bits) - start] = True
        return mask

    def first(self, n: int) -> list[int]:
        """The n smallest members."""
        return list(islice(self._bits, n))

    def max(self) -> int | None:
        return self._bits.max() if len(self._bits) else None

    def missing_ranges(self, stop: int, *, limit: int) -> list[tuple[int, int]]:
        """The first `limit` half-open ranges of [0, stop) not in the set, ascending (without visiting members)."""
        ranges: list[tuple[int, int]] = []
        gaps = self._bits.flip(0, stop) if stop > 0 else BitMap64()
        position = 0
        while len(ranges) < limit and position < stop:
            start = _next_member(gaps, position)
            if start is None or start >= stop:
                break
            end = _next_member(self._bits, start)
            end = stop if end is None or end > stop else end
            ranges.append((start, end))
            position = end
        return ranges

    # ------------------------------------------------------------------------------------------- set algebra
    def __and__(self, other: "SampleSet") -> "SampleSet":
        return self._wrap(self._bits & other._bits)

    def __or__(self, other: "SampleSet") -> "SampleSet":
        return self._wrap(self._bits | other._bits)

    def __sub__(self, other: "SampleSet") -> "SampleSet":
        return self._wrap(self._bits - other._bits)

    def __xor__(self, other: "SampleSet") -> "SampleSet":
        return self._wrap(self._bits ^ other._bits)

    def copy(self) -> "SampleSet":
        return self._wrap(self._bits.copy())

    def to_numpy(self) -> np.ndarray:
        return _array(self._bits).astype(np.int64)

    @classmethod
    def _wrap(cls, bits: BitMap64) -> "SampleSet":
        out = cls()
        out._bits = bits
        return out


def _bitmap(indices: np.ndarray) -> BitMap64:
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    if len(indices) and indices.min() < 0:
        raise ValueError(f"sample indices must be dataset indices (>= 0), got {int(indices.min())}")
    values = array("Q")
    values.frombytes(indices.view(np.uint8).data)  # one copy; pyroaring reads an array.array in bulk
    return BitMap64(values)


def _array(bits: BitMap64) -> np.ndarray:
    return np.frombuffer(bits.to_array(), dtype=np.uint64) if len(bits) else np.zeros(0, dtype=np.uint64)


def _next_member(bits: BitMap64, position: int) -> int | None:
    """The smallest member >= position."""
    return next(iter(bits.iter_equal_or_larger(position)), None)
