"""One bounded pass over a spill that scores every sample once and feeds the results to small accumulators.

Memory: one chunk (or one decode window) plus what the accumulators keep, which never grows with the number of
samples: `WorstSamples` keeps N rows, `ScoreHistograms` keeps counts per value bin.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from ..batch import SampleBatch
from ..progress import sample_bar, wanted
from ..spill import SpillReader
from .scores import SampleScore, score_batch

DECODE_WINDOW = 2048  # rows decoded at a time, so decoded strings stay small even for a 64 MiB chunk
SCORE_WINDOW_TOKENS = 2**20  # ids scored at a time: the scorers' temporaries stay ~50 MiB whatever the chunk size

class Accumulator(Protocol):
    def update(self, batch: SampleBatch, scores: dict[str, np.ndarray]) -> None: ...


def show_progress(quiet: bool) -> bool:
    """Progress bars only for a person watching: not with --quiet, not when stderr is a pipe or a file."""
    return wanted(quiet)


def iter_scored(
    reader: SpillReader,
    scores: list[SampleScore],
    *,
    decode: bool = False,
    progress_bar: bool = False,
    desc: str = "reading spill",
) -> Iterator[tuple[SampleBatch, dict[str, np.ndarray]]]:
    """(batch, {score name: values}) for every unique sample, in windows of a chunk (decoded when asked)."""
    decode = decode or any(s.needs_text for s in scores)
    with sample_bar(reader.num_rows, desc, enabled=progress_bar) as advance:
        for chunk in reader.iter_chunks(with_arrays=False):
            for batch in windows(chunk, rows=DECODE_WINDOW if decode else None, tokens=SCORE_WINDOW_TOKENS):
                if decode:
                    reader.decode(batch)
                yield batch, score_batch(batch, scores)
                advance(len(batch))


def scan(reader: SpillReader, scores: list[SampleScore], accumulators: Iterable[Accumulator], **options) -> None:
    """Feed every scored batch to every accumulator (one pass)."""
    accumulators = list(accumulators)
    for batch, values in iter_scored(reader, scores, **options):
        for accumulator in accumulators:
            accumulator.update(batch, values)


def windows(batch: SampleBatch, *, rows: int | None = None, tokens: int | None = None) -> Iterator[SampleBatch]:
    """Consecutive row ranges of at most `rows` samples and `tokens` ids (a longer sample forms its own window)."""
    weight = batch.lengths + (0 if batch.aligned else batch.label_lengths)
    if (rows is None or len(batch) <= rows) and (tokens is None or weight.sum() <= tokens):
        yield batch
        return
    cumulative = np.cumsum(weight)
    start = 0
    while start < len(batch):
        stop = len(batch) if rows is None else min(len(batch), start + rows)
        if tokens is not None:
            before = cumulative[start - 1] if start else 0
            stop = min(stop, int(np.searchsorted(cumulative, before + tokens, side="right")))
        stop = max(stop, start + 1)
        yield batch.take(np.arange(start, stop))
        start = stop


# ----------------------------------------------------------------------------------------------- worst N
@dataclass(order=True)
class _Entry:
    key: tuple[float, int]  # (-goodness, -sample_index): the heap's root is the best of the kept worst
    row: SampleBatch = field(compare=False)
    scores: dict[str, float] = field(compare=False)


@dataclass
class RankedSample:
    sample_index: int
    value: float
    scores: dict[str, float]
    row: SampleBatch


class WorstSamples:
    """The N samples with the smallest goodness (ties: smaller sample index first), in a heap of N rows."""

    def __init__(self, score: SampleScore, n: int) -> None:
        if n <= 0:
            raise ValueError("n must be positive")
        self.score, self.n = score, n
        self._heap: list[_Entry] = []
        self.skipped_undefined = 0  # samples whose score is NaN (e.g. NLL of an empty sample)

    def update(self, batch: SampleBatch, scores: dict[str, np.ndarray]) -> None:
        values = scores[self.score.name]
        defined = ~np.isnan(values)
        self.skipped_undefined += int(len(values) - defined.sum())
        goodness = self.score.goodness(values)
        for row in self._candidates(goodness, batch.sample_index, np.flatnonzero(defined)):
            key = (-float(goodness[row]), -int(batch.sample_index[row]))
            if len(self._heap) == self.n and key <= self._heap[0].key:
                continue  # not worse than the best one kept
            entry = _Entry(key, batch.take(np.array([row])), {k: float(v[row]) for k, v in scores.items()})
            if len(self._heap) < self.n:
                heapq.heappush(self._heap, entry)
            else:
                heapq.heapreplace(self._heap, entry)

    def _candidates(self, goodness: np.ndarray, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """At most n rows of this batch that can enter the heap: a partition, not a sort of the batch."""
        if len(rows) <= self.n:
            return rows
        g = goodness[rows]
        kth = np.partition(g, self.n - 1)[self.n - 1]
        below = rows[g < kth]
        tied = rows[g == kth]
        tied = tied[np.argsort(index[tied], kind="stable")][: self.n - len(below)]
        return np.concatenate([below, tied])

    def result(self) -> list[RankedSample]:
        """Worst first."""
        ordered = sorted(self._heap, key=lambda e: e.key, reverse=True)
        return [
            RankedSample(int(e.row.sample_index[0]), e.scores[self.score.name], e.scores, e.row) for e in ordered
        ]


# ----------------------------------------------------------------------------------------------- distributions
class ScoreHistogram:
    """Counts of one score's values quantized to its resolution; memory grows with the value range only."""

    def __init__(self, score: SampleScore) -> None:
        self.score = score
        self.counts = np.zeros(0, dtype=np.int64)
        self.total = 0.0
        self.samples = 0
        self.undefined = 0

    def update(self, batch: SampleBatch, scores: dict[str, np.ndarray]) -> None:
        values = scores[self.score.name]
        defined = values[~np.isnan(values)]
        self.undefined += len(values) - len(defined)
        if not len(defined):
            return
        self.total += float(defined.sum())
        self.samples += len(defined)
        clipped = np.clip(defined, 0.0, self.score.upper)
        bins = np.rint(clipped / self.score.resolution).astype(np.int64)
        counts = np.bincount(bins)
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else math.nan

    def values(self) -> np.ndarray:
        """The bin centres (value of each count)."""
        return np.arange(len(self.counts)) * self.score.resolution

    def quantile(self, q: float) -> float:
        """The q-quantile (lower), exact up to the score's resolution."""
        if not self.samples:
            return math.nan
        rank = int(math.floor(q * (self.samples - 1)))
        return float(self.values()[int(np.searchsorted(np.cumsum(self.counts), rank, side="right"))])

    def summary(self) -> dict[str, float]:
        nonzero = np.flatnonzero(self.counts)
        lo, hi = (self.values()[nonzero[[0, -1]]] if len(nonzero) else (math.nan, math.nan))
        return {
            "samples": self.samples,
            "mean": self.mean,
            "min": float(lo),
            "p10": self.quantile(0.10),
            "median": self.quantile(0.5),
            "p90": self.quantile(0.90),
            "max": float(hi),
        }


class ScoreHistograms:
    def __init__(self, scores: Iterable[SampleScore]) -> None:
        self.by_name = {s.name: ScoreHistogram(s) for s in scores}

    def update(self, batch: SampleBatch, scores: dict[str, np.ndarray]) -> None:
        for histogram in self.by_name.values():
            histogram.update(batch, scores)
