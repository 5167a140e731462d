"""Corpus statistics of the whole distribution: exact percentiles of per-sample loss, distinct-n.

Both keep what grows with the corpus in on-disk tables, so memory stays bounded and nothing is sketched: every loss
value in `ondisk.py`'s tables, every distinct n-gram in sorted runs (`ngram_table.py`: hashed to sort, compared by
text, so two n-grams are one only when their texts are equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from ..batch import SampleBatch
from .base import BatchSize, NgramOrder
from .cider_vectors import occurrences
from .inputs import MetricInputError
from .mapmerge import MapMergeMetric
from .ngram_table import NgramCountWriter, write_runs
from .ondisk import ScratchStore
from .registry import register

if TYPE_CHECKING:
    from ..spill import SpillReader


def sample_nll(batch: SampleBatch) -> np.ndarray:
    """Per-sample NLL: -(correctly rounded float64 sum of the row's label log-probs) / row length.

    Samples without supervised tokens have no loss and are left out.
    """
    losses = [
        -math.fsum(batch.logprob_row(i).astype(np.float64).tolist()) / length
        for i, length in enumerate(batch.lengths.tolist())
        if length
    ]
    return np.array(losses, dtype=np.float64)


def linear_percentile(lower: float, upper: float, n: int, q: float) -> float:
    """numpy.percentile's default ("linear") interpolation between the order statistics at floor((n-1)q/100) and
    the next one, with numpy's own arithmetic (`_lerp`), so the result is the same float."""
    virtual = (n - 1) * (q / 100)
    if virtual >= n - 1:
        return upper
    gamma = virtual - math.floor(virtual)
    diff = upper - lower
    return upper - diff * (1 - gamma) if gamma >= 0.5 else lower + diff * gamma


def percentile_ranks(n: int, q: float) -> tuple[int, int]:
    """The two 0-based ranks whose values `linear_percentile` interpolates."""
    virtual = (n - 1) * (q / 100)
    lower = n - 1 if virtual >= n - 1 else math.floor(virtual)
    return lower, min(lower + 1, n - 1)


@register("loss_percentiles")
class LossPercentiles(MapMergeMetric):
    """loss_p50 / loss_p90 / loss_p99 of per-sample NLL, equal to `numpy.percentile(nll, q)` on the whole array."""

    outputs = ("loss_p50", "loss_p90", "loss_p99")
    scale = "nats/token, lower is better"

    needs_logprob = True

    def __init__(self, percentiles: Annotated[Sequence[float], Field(max_length=1000)] = (50, 90, 99),
                 batch_size: BatchSize = 4096) -> None:
        if not percentiles or any(not 0 <= q <= 100 for q in percentiles):
            raise ValueError(f"percentiles must lie in [0, 100], got {list(percentiles)}")
        self.percentiles = [float(q) for q in percentiles]
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        return {"percentiles": self.percentiles, "batch_size": self.batch_size}

    def start(self, near: Path) -> None:
        self._table = self.scratch(near).counter("losses", key="REAL")
        self._n = 0

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> tuple[list[float], list[int]]:
        losses = sample_nll(batch)
        if np.isnan(losses).any():
            raise MetricInputError("loss_percentiles: a sample's label log-probabilities contain NaN")
        values, counts = np.unique(losses, return_counts=True)
        return values.tolist(), counts.tolist()

    def merge(self, pass_index: int, partial: tuple[list[float], list[int]]) -> None:
        values, counts = partial
        self._table.add(zip(values, counts))
        self._n += sum(counts)

    def finish(self) -> dict[str, float]:
        keys = [f"loss_p{q:g}" for q in self.percentiles]
        if self._n == 0:
            return {k: math.nan for k in keys}
        ranks = {q: percentile_ranks(self._n, q) for q in self.percentiles}
        at = _values_at_ranks(self._table, sorted({r for pair in ranks.values() for r in pair}))
        return {k: linear_percentile(at[ranks[q][0]], at[ranks[q][1]], self._n, q)
                for k, q in zip(keys, self.percentiles)}


    def bootstrap(self, reader: SpillReader, weights: Callable[[np.ndarray], np.ndarray],
                  replicates: int) -> dict[str, np.ndarray]:
        """numpy.percentile of every replicate's resampled losses (sample i repeated w_i times), exactly: the
        (loss, sample) rows sorted on disk, scanned once with each replicate's running count of drawn samples."""
        with ScratchStore(reader.path) as store:
            table = store.rows("losses", key=(("loss", "REAL"), ("sample", "INTEGER")), values=())
            drawn = np.zeros(replicates, dtype=np.int64)
            for batch in reader.iter_batches(self.batch_size, with_arrays=False):
                supervised = batch.sample_index[batch.lengths > 0]
                table.add(zip(sample_nll(batch).tolist(), supervised.tolist()))
                drawn += weights(supervised).sum(axis=1, dtype=np.int64)
            ranks = {q: _replicate_ranks(drawn, q) for q in self.percentiles}
            targets = np.stack([rank for pair in ranks.values() for rank in pair])  # (2 x percentiles, replicates)
            found = _weighted_order_statistics(table, weights, targets)
        out = {}
        for k, q in enumerate(self.percentiles):
            lower, upper = found[2 * k], found[2 * k + 1]
            out[f"loss_p{q:g}"] = np.array([linear_percentile(lo, up, int(n), q) if n else math.nan
                                            for lo, up, n in zip(lower, upper, drawn)])
        return out


def _replicate_ranks(drawn: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """`percentile_ranks` of every replicate's sample count."""
    pairs = [percentile_ranks(int(n), q) if n else (0, 0) for n in drawn]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _weighted_order_statistics(table: Any, weights: Callable[[np.ndarray], np.ndarray], targets: np.ndarray,
                               block_rows: int = 512) -> np.ndarray:
    """The value at 0-based rank targets[t, b] of replicate b's sorted multiset (row i repeated w[b, i] times),
    from one ascending scan: the first row whose running count exceeds the rank."""
    found = np.full(targets.shape, np.nan)
    pending = np.ones(targets.shape, dtype=bool)
    before = np.zeros(targets.shape[1], dtype=np.int64)
    rows = table.scan_rows()
    while block := list(islice(rows, block_rows)):
        values = np.array([r[0] for r in block], dtype=np.float64)
        counts = before[:, None] + np.cumsum(weights(np.array([r[1] for r in block])), axis=1, dtype=np.int64)
        for t in range(len(targets)):
            beyond = counts > targets[t][:, None]
            hit = pending[t] & beyond[:, -1]
            found[t, hit] = values[beyond[hit].argmax(axis=1)]
            pending[t] &= ~hit
        before = counts[:, -1]
    return found


def _values_at_ranks(table: Any, ranks: list[int]) -> dict[int, float]:
    """Order statistics by one ascending scan of a (value -> count) table."""
    found: dict[int, float] = {}
    pending = iter(ranks)
    rank = next(pending, None)
    seen = 0
    for rows in table.scan():
        for value, count in rows:
            seen += count
            while rank is not None and rank < seen:
                found[rank] = float(value)
                rank = next(pending, None)
            if rank is None:
                return found
    return found


def distinct_per_column(blocks: Iterator[np.ndarray]) -> np.ndarray | int:
    """Keys with a nonzero count in each column (each n-gram size), over [rows, sizes] blocks of counts."""
    return sum((np.count_nonzero(counts, axis=0) for counts in blocks), 0)


@register("distinct_n")
class DistinctN(MapMergeMetric):
    """distinct_1, distinct_2, ...: distinct n-grams / all n-grams over every prediction (whitespace tokens)."""

    outputs = ("distinct_1", "distinct_2")
    scale = "0–1"

    needs_text = True

    def __init__(self, orders: Annotated[Sequence[NgramOrder], Field(max_length=32)] = (1, 2),
                 batch_size: BatchSize = 4096) -> None:
        if not orders or any(int(n) < 1 for n in orders):
            raise ValueError(f"orders must be positive n-gram sizes, got {list(orders)}")
        self.orders = [int(n) for n in orders]
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        return {"orders": self.orders, "batch_size": self.batch_size}

    def start(self, near: Path) -> None:
        self._runs = self.scratch_directory(near)
        self._table = NgramCountWriter(self._runs / "ngrams", pool=self.pool)
        self._sizes = sorted(set(self.orders))  # a column of counts per n-gram size
        self._totals = np.zeros(len(self._sizes), np.int64)

    def context(self, pass_index: int) -> tuple[str, list[int]]:
        return str(self._runs), self._sizes

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> tuple[np.ndarray, pa.Array, np.ndarray]:
        """The batch's distinct n-grams of every size asked for, in one table (hash, text, [occurrences of each
        size]: an n-gram's row is 0 but in its own size's column), counted in numpy. An n-gram's text is its words
        joined by a space, as `str.split()` cuts them (`cider_vectors.occurrences`), so texts of different sizes
        never meet. One table, not one per size: a task writes one run, and one merge in key ranges counts all."""
        sizes = context[1]
        found = occurrences(list(batch.pred_text or []), orders=max(sizes))
        counts = np.bincount(found.gram, minlength=len(found.gram_order)).astype(np.int64)
        column = np.full(max(sizes), -1)
        column[np.array(sizes) - 1] = np.arange(len(sizes))
        grams = np.flatnonzero(column[found.gram_order] >= 0)
        per_size = np.zeros((len(grams), len(sizes)), np.int64)
        per_size[np.arange(len(grams)), column[found.gram_order[grams]]] = counts[grams]
        return found.gram_hash[grams], found.texts(grams), per_size

    def reduce_task(self, pass_index: int, partials: list[Any], context: Any) -> list[tuple[list[int], list]]:
        """(n-grams of each size in the task, the runs its distinct n-grams were written to)."""
        totals = np.sum([p[2].sum(axis=0) for p in partials], axis=0, dtype=np.int64)
        return [(np.atleast_1d(totals).tolist(), write_runs(context[0], partials))]

    def merge(self, pass_index: int, partial: tuple[list[int], list]) -> None:
        totals, runs = partial
        self._totals += np.asarray(totals, np.int64)
        for run in runs:
            self._table.adopt(run)

    def finish(self) -> dict[str, float]:
        distinct = np.zeros(len(self._sizes), np.int64)
        for found in self._table.summarize(distinct_per_column):
            distinct += found
        ratio = {n: int(d) / int(t) if t else 0.0 for n, d, t in zip(self._sizes, distinct, self._totals)}
        return {f"distinct_{n}": ratio[n] for n in self.orders}
