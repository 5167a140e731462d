"""The host-side unit of data that flows from reduction to the spill, the metrics and back out of the reader.

A `SampleBatch` holds B samples as ragged token rows (flat values + offsets), plus optional per-sample columns
(e.g. reference strings) and fixed-shape per-sample arrays (e.g. class scores). It is the same object whether it
was just reduced from logits or read back from disk, which is what makes live and offline metrics identical.

Rows are *aligned* (teacher-forced: pred row i and label row i have the same length, `label_offsets is None`) or
*ragged* (generation: `label_offsets` gives the label rows their own offsets, a generated row may be longer or
shorter than its reference). Position-by-position token metrics need aligned rows (`require_aligned`); text
metrics decode each side on its own and work on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

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
    """B samples on the host. Token rows are ragged: row i is `pred_ids[offsets[i]:offsets[i+1]]`, and its labels
    `label_ids` over the same offsets, or over `label_offsets` when the label rows have lengths of their own."""

    sample_index: np.ndarray  # int64 [B]
    offsets: np.ndarray  # int64 [B+1]
    pred_ids: np.ndarray  # uint16/uint32 [N]
    label_ids: np.ndarray  # uint16/uint32 [N] (aligned) or [M] (ragged, see label_offsets)
    label_logprob: np.ndarray | None = None  # float32 [N]
    columns: dict[str, list[Any]] = field(default_factory=dict)  # per-sample python values (e.g. references)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # fixed-shape per-sample arrays [B, ...]
    # the decoded text, attached by `decode_batch` when a metric needs it and decoded on its first read (see
    # `pred_text`, `label_text`); a list of str, a `LazyText` not read yet, or None when not attached
    _pred_text: "list[str] | LazyText | None" = field(default=None, repr=False)
    _label_text: "list[str] | LazyText | None" = field(default=None, repr=False)
    label_offsets: np.ndarray | None = None  # int64 [B+1] for ragged label rows (generation); None: `offsets`
    sample_nll: np.ndarray | None = None  # float64 [B]: -sum of each sample's label log-probs (natural log)
    # int32 [N] (aligned rows only): the position in the model's sequence (the logits' axis) of each supervised
    # token, so a prediction can be placed back in its context; None when unknown (older spills, `from_rows`)
    label_positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        index = np.asarray(self.sample_index)
        if index.size and index.dtype.kind not in "iu":
            raise ValueError(f"sample_index must hold integer dataset indices, got dtype {index.dtype}")
        self.sample_index = index.astype(np.int64, copy=False)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n = len(self.sample_index)
        if len(self.offsets) != n + 1:
            raise ValueError(f"offsets must have {n + 1} entries for {n} samples, got {len(self.offsets)}")
        if self.label_offsets is None:
            if len(self.pred_ids) != len(self.label_ids):
                raise ValueError("pred_ids and label_ids must have the same length")
        else:
            self.label_offsets = np.asarray(self.label_offsets, dtype=np.int64)
            if len(self.label_offsets) != n + 1:
                raise ValueError(f"label_offsets must have {n + 1} entries, got {len(self.label_offsets)}")
            if len(self.label_ids) != self.label_offsets[-1] - self.label_offsets[0]:
                raise ValueError("label_ids must hold as many ids as label_offsets spans")
            if self.label_logprob is not None:
                raise ValueError("label_logprob needs aligned rows; a batch with label_offsets carries none")
        if self.label_positions is not None:
            self.label_positions = np.asarray(self.label_positions, dtype=np.int32)
            if self.label_offsets is not None or len(self.label_positions) != len(self.pred_ids):
                raise ValueError("label_positions needs aligned rows and one position per supervised token")
        if self.sample_nll is not None:
            self.sample_nll = np.asarray(self.sample_nll, dtype=np.float64)
            if len(self.sample_nll) != n:
                raise ValueError(f"sample_nll has {len(self.sample_nll)} values for {n} samples")
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for {n} samples")
        for name, values in self.arrays.items():
            if len(values) != n:
                raise ValueError(f"array {name!r} has {len(values)} rows for {n} samples")

    @property
    def pred_text(self) -> list[str] | None:
        """The decoded predictions (skip_special_tokens=True), None when no text is attached."""
        if isinstance(self._pred_text, LazyText):
            self._pred_text = self._pred_text.texts()
        return self._pred_text

    @property
    def label_text(self) -> list[str] | None:
        """The decoded labels (skip_special_tokens=True), None when no text is attached."""
        if isinstance(self._label_text, LazyText):
            self._label_text = self._label_text.texts()
        return self._label_text

    @property
    def has_text(self) -> bool:
        return self._pred_text is not None and self._label_text is not None

    def attach_text(self, pred: "list[str] | LazyText", label: "list[str] | LazyText") -> None:
        self._pred_text, self._label_text = pred, label

    def __len__(self) -> int:
        return len(self.sample_index)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) if len(self.offsets) else 0

    @property
    def lengths(self) -> np.ndarray:
        """Ids per prediction row (= per label row when aligned)."""
        return np.diff(self.offsets)

    @property
    def aligned(self) -> bool:
        """True when pred row i and label row i have the same length position by position (teacher-forced)."""
        return self.label_offsets is None

    @property
    def label_row_offsets(self) -> np.ndarray:
        """Offsets of the label rows: `label_offsets` when ragged, else `offsets`."""
        return self.offsets if self.label_offsets is None else self.label_offsets

    @property
    def label_lengths(self) -> np.ndarray:
        return np.diff(self.label_row_offsets)

    def require_aligned(self, what: str) -> None:
        """Raise a clear error when `what` compares ids position by position but the rows are ragged."""
        if self.label_offsets is not None:
            raise ValueError(
                f"{what} compares predicted and label ids position by position, but this batch holds generated ids "
                "whose rows are not aligned with the reference ids. Use text metrics on generation spills "
                "(bleu, rouge, cider, squad, answer_macro_f1, ...)."
            )

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(pred_ids, label_ids) of sample i of this batch."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if self.label_offsets is None:
            return self.pred_ids[lo:hi], self.label_ids[lo:hi]
        return self.pred_ids[lo:hi], self.label_ids[self.label_offsets[i] : self.label_offsets[i + 1]]

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
        if self.sample_nll is not None:
            total += self.sample_nll.nbytes
        if self.label_positions is not None:
            total += self.label_positions.nbytes
        total += sum(a.nbytes for a in self.arrays.values())
        total += sum(_column_bytes(v) for v in self.columns.values())
        return total

    def take(self, rows: np.ndarray) -> "SampleBatch":
        """A new batch with only the given row positions (in that order); copies (see `slice` for views)."""
        rows = np.asarray(rows, dtype=np.int64)
        token_pos, offsets = _take_rows(self.offsets, rows)
        if self.label_offsets is None:
            label_pos, label_offsets = token_pos, None
        else:
            label_pos, label_offsets = _take_rows(self.label_offsets, rows)
        return SampleBatch(
            sample_index=self.sample_index[rows],
            offsets=offsets,
            label_offsets=label_offsets,
            pred_ids=self.pred_ids[token_pos],
            label_ids=self.label_ids[label_pos],
            label_logprob=None if self.label_logprob is None else self.label_logprob[token_pos],
            sample_nll=None if self.sample_nll is None else self.sample_nll[rows],
            label_positions=None if self.label_positions is None else self.label_positions[token_pos],
            columns={k: [v[i] for i in rows] for k, v in self.columns.items()},
            arrays={k: v[rows] for k, v in self.arrays.items()},
            _pred_text=_take_text(self._pred_text, rows),
            _label_text=_take_text(self._label_text, rows),
        )

    def slice(self, start: int, stop: int) -> "SampleBatch":
        """Rows start..stop-1 without copying any ids: the arrays are views into this batch's, so cutting a chunk
        into batches costs nothing (but a slice keeps the whole batch's memory alive while it is held)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        label_offsets, label_lo, label_hi = None, lo, hi
        if self.label_offsets is not None:
            label_lo, label_hi = int(self.label_offsets[start]), int(self.label_offsets[stop])
            label_offsets = self.label_offsets[start : stop + 1] - label_lo
        return SampleBatch(
            sample_index=self.sample_index[start:stop],
            offsets=self.offsets[start : stop + 1] - lo,
            label_offsets=label_offsets,
            pred_ids=self.pred_ids[lo:hi],
            label_ids=self.label_ids[label_lo:label_hi],
            label_logprob=None if self.label_logprob is None else self.label_logprob[lo:hi],
            sample_nll=None if self.sample_nll is None else self.sample_nll[start:stop],
            label_positions=None if self.label_positions is None else self.label_positions[lo:hi],
            columns={k: v[start:stop] for k, v in self.columns.items()},
            arrays={k: v[start:stop] for k, v in self.arrays.items()},
            _pred_text=None if self._pred_text is None else self._pred_text[start:stop],
            _label_text=None if self._label_text is None else self._label_text[start:stop],
        )

    @staticmethod
    def concat(batches: Sequence["SampleBatch"]) -> "SampleBatch":
        """Join batches that share the same fields."""
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        offsets = _offsets_of(np.concatenate([b.lengths for b in batches]))
        ragged = any(b.label_offsets is not None for b in batches)
        label_offsets = _offsets_of(np.concatenate([b.label_lengths for b in batches])) if ragged else None
        with_text = all(b.has_text for b in batches)
        return SampleBatch(
            sample_index=np.concatenate([b.sample_index for b in batches]),
            offsets=offsets,
            label_offsets=label_offsets,
            pred_ids=np.concatenate([b.pred_ids for b in batches]),
            label_ids=np.concatenate([b.label_ids for b in batches]),
            label_logprob=(
                None
                if first.label_logprob is None
                else np.concatenate([b.label_logprob for b in batches])  # type: ignore[misc]
            ),
            sample_nll=(
                np.concatenate([b.sample_nll for b in batches])  # type: ignore[misc]
                if all(b.sample_nll is not None for b in batches)
                else None
            ),
            label_positions=(
                np.concatenate([b.label_positions for b in batches])  # type: ignore[misc]
                if all(b.label_positions is not None for b in batches)
                else None
            ),
            columns={k: [x for b in batches for x in b.columns[k]] for k in first.columns},
            arrays={k: np.concatenate([b.arrays[k] for b in batches]) for k in first.arrays},
            _pred_text=[t for b in batches for t in b.pred_text] if with_text else None,  # type: ignore[union-attr]
            _label_text=[t for b in batches for t in b.label_text] if with_text else None,  # type: ignore[union-attr]
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
        aligned: bool = True,
    ) -> "SampleBatch":
        """Build a batch from python lists, e.g. for tests or generated ids (`aligned=False`: ragged label rows).
        With `logprobs`, each sample's `sample_nll` is their negated sum."""
        dtype = id_dtype_for_vocab(vocab_size)
        offsets = _offsets_of(np.array([len(p) for p in preds], dtype=np.int64))
        label_offsets = None
        if not aligned:
            label_offsets = _offsets_of(np.array([len(lab) for lab in labels], dtype=np.int64))
        elif any(len(p) != len(lab) for p, lab in zip(preds, labels)):
            raise ValueError("each prediction row must have as many ids as its label row (or pass aligned=False)")
        flat = lambda rows, dt: np.array([x for r in rows for x in r], dtype=dt)  # noqa: E731
        return SampleBatch(
            sample_index=np.asarray(sample_index, dtype=np.int64),
            offsets=offsets,
            label_offsets=label_offsets,
            pred_ids=flat(preds, dtype),
            label_ids=flat(labels, dtype),
            label_logprob=None if logprobs is None else flat(logprobs, np.float32),
            sample_nll=None if logprobs is None else np.array(
                [-np.sum(np.asarray(row, dtype=np.float32), dtype=np.float64) for row in logprobs]),
            columns=dict(columns or {}),
            arrays=dict(arrays or {}),
        )


class LazyText:
    """Ragged id rows that become strings on the first read (`SampleBatch.pred_text`): slicing or taking rows
    before that keeps them undecoded, so only the rows that are read get decoded, once."""

    def __init__(self, decode: Callable[[np.ndarray, np.ndarray], list[str]], ids: np.ndarray,
                 offsets: np.ndarray) -> None:
        self._decode, self._ids, self._offsets = decode, ids, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def texts(self) -> list[str]:
        return self._decode(self._ids, self._offsets)

    def __getitem__(self, rows: slice) -> "LazyText":
        start, stop, _ = rows.indices(len(self))
        stop = max(start, stop)
        lo, hi = int(self._offsets[start]), int(self._offsets[stop])
        return LazyText(self._decode, self._ids[lo:hi], self._offsets[start : stop + 1] - lo)

    def take(self, rows: np.ndarray) -> "LazyText":
        positions, offsets = _take_rows(self._offsets, rows)
        return LazyText(self._decode, self._ids[positions], offsets)


def _take_text(text: "list[str] | LazyText | None", rows: np.ndarray) -> "list[str] | LazyText | None":
    if text is None:
        return None
    if isinstance(text, LazyText):
        return text.take(rows)
    return [text[i] for i in rows]


def split_rows(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """Ragged rows as lists of ints: one conversion of the whole array, then list slices."""
    values = ids.tolist()
    bounds = (offsets - offsets[0]).tolist()
    return [values[lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _take_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the chosen rows' values, their new offsets)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return concat_ranges(starts, lengths), _offsets_of(lengths)


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += sum(len(x) if isinstance(x, str) else 8 for x in v)
        else:
            total += 8
    return total
