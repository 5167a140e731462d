"""The host-side unit of data that flows from reduction to the spill, the metrics and back out of the reader.

A `SampleBatch` holds B samples as ragged token rows (flat values + offsets), plus optional per-sample columns
(e.g. reference strings) and fixed-shape per-sample arrays (e.g. class scores). It is the same object whether it
was just reduced from logits or read back from disk, which is what makes live and offline metrics identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100
UINT16_MAX_VOCAB = 65_535


def id_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits with room for a sentinel (vocab <= 65,535), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= UINT16_MAX_VOCAB else np.dtype(np.uint32)


@dataclass
class SampleBatch:
    """B samples on the host. Token rows are ragged: row i is `pred_ids[offsets[i]:offsets[i+1]]`."""

    sample_index: np.ndarray  # int64 [B]
    offsets: np.ndarray  # int64 [B+1]
    pred_ids: np.ndarray  # uint16/uint32 [N]
    label_ids: np.ndarray  # uint16/uint32 [N]
    label_logprob: np.ndarray | None = None  # float32 [N]
    columns: dict[str, list[Any]] = field(default_factory=dict)  # per-sample python values (e.g. references)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # fixed-shape per-sample arrays [B, ...]
    pred_text: list[str] | None = None  # filled by `decode_batch` when a metric needs text
    label_text: list[str] | None = None

    def __post_init__(self) -> None:
        self.sample_index = np.asarray(self.sample_index, dtype=np.int64)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n = len(self.sample_index)
        if len(self.offsets) != n + 1:
            raise ValueError(f"offsets must have {n + 1} entries for {n} samples, got {len(self.offsets)}")
        if len(self.pred_ids) != len(self.label_ids):
            raise ValueError("pred_ids and label_ids must have the same length")
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} samples")
        for name, values in self.arrays.items():
            if len(values) != n:
                raise ValueError(f"array {name!r} has {len(values)} rows for {n} samples")

    def __len__(self) -> int:
        return len(self.sample_index)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) if len(self.offsets) else 0

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(pred_ids, label_ids) of sample i of this batch."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.pred_ids[lo:hi], self.label_ids[lo:hi]

    def rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self.row(i)

    def logprob_row(self, i: int) -> np.ndarray:
        if self.label_logprob is None:
            raise ValueError("this batch carries no label log-probabilities (evaluate with keep_logprob=True)")
        return self.label_logprob[self.offsets[i] : self.offsets[i + 1]]

    def nbytes(self) -> int:
        """Approximate host bytes, used to bound spill chunks."""
        total = self.sample_index.nbytes + self.offsets.nbytes + self.pred_ids.nbytes + self.label_ids.nbytes
        if self.label_logprob is not None:
            total += self.label_logprob.nbytes
        total += sum(a.nbytes for a in self.arrays.values())
        total += sum(_column_bytes(v) for v in self.columns.values())
        return total

    def take(self, rows: np.ndarray) -> "SampleBatch":
        """A new batch with only the given row positions (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        lengths = stops - starts
        token_pos = _ranges(starts, lengths)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return SampleBatch(
            sample_index=self.sample_index[rows],
            offsets=offsets,
            pred_ids=self.pred_ids[token_pos],
            label_ids=self.label_ids[token_pos],
            label_logprob=None if self.label_logprob is None else self.label_logprob[token_pos],
            columns={k: [v[i] for i in rows] for k, v in self.columns.items()},
            arrays={k: v[rows] for k, v in self.arrays.items()},
            pred_text=None if self.pred_text is None else [self.pred_text[i] for i in rows],
            label_text=None if self.label_text is None else [self.label_text[i] for i in rows],
        )

    @staticmethod
    def concat(batches: Sequence["SampleBatch"]) -> "SampleBatch":
        """Join batches that share the same fields."""
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        lengths = np.concatenate([b.lengths for b in batches])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with_text = all(b.pred_text is not None for b in batches)
        return SampleBatch(
            sample_index=np.concatenate([b.sample_index for b in batches]),
            offsets=offsets,
            pred_ids=np.concatenate([b.pred_ids for b in batches]),
            label_ids=np.concatenate([b.label_ids for b in batches]),
            label_logprob=(
                None
                if first.label_logprob is None
                else np.concatenate([b.label_logprob for b in batches])  # type: ignore[misc]
            ),
            columns={k: [x for b in batches for x in b.columns[k]] for k in first.columns},
            arrays={k: np.concatenate([b.arrays[k] for b in batches]) for k in first.arrays},
            pred_text=[t for b in batches for t in b.pred_text] if with_text else None,  # type: ignore[union-attr]
            label_text=[t for b in batches for t in b.label_text] if with_text else None,  # type: ignore[union-attr]
        )

    @staticmethod
    def from_rows(
        sample_index: Sequence[int],
        preds: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        *,
        vocab_size: int,
        logprobs: Sequence[Sequence[float]] | None = None,
        columns: dict[str, list[Any]] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> "SampleBatch":
        """Build a batch from python lists, e.g. for tests or generated ids."""
        dtype = id_dtype_for_vocab(vocab_size)
        lengths = np.array([len(p) for p in preds], dtype=np.int64)
        if any(len(p) != len(lab) for p, lab in zip(preds, labels)):
            raise ValueError("each prediction row must have as many ids as its label row")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda rows, dt: np.array([x for r in rows for x in r], dtype=dt)  # noqa: E731
        return SampleBatch(
            sample_index=np.asarray(sample_index, dtype=np.int64),
            offsets=offsets,
            pred_ids=flat(preds, dtype),
            label_ids=flat(labels, dtype),
            label_logprob=None if logprobs is None else flat(logprobs, np.float32),
            columns=dict(columns or {}),
            arrays=dict(arrays or {}),
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=out_starts[1:])
    idx = np.arange(total, dtype=np.int64)
    return idx - np.repeat(out_starts - starts, lengths)


def _column_bytes(values: list[Any]) -> int:
    total = 0
    for v in values:
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += sum(len(x) if isinstance(x, str) else 8 for x in v)
        else:
            total += 8
    return total
