"""AUROC, average precision and ECE over per-sample class scores stored in the spill's zarr arrays.

Scores: `Evaluator.update(..., arrays={"class_scores": probs})` with probs [B, C] (one column per class, in the
order of `labels`), or [B] / [B, 1] for a binary task (the score of class 1). The true class comes from
`labels` (decoded label text or first label token -> column index) or from `target_column` (see `inputs.py`).

- Binary (C == 2): the positive class is class 1 and its score is column 1; equal to
  `sklearn.metrics.roc_auc_score(y, s[:, 1])` / `average_precision_score(y, s[:, 1])`.
- Multiclass (C > 2): one-vs-rest per class, macro mean; equal to `roc_auc_score(y, s, multi_class="ovr",
  average="macro", labels=range(C))` and `average_precision_score(label_binarize(y, classes=range(C)), s,
  average="macro")`. A class with no positive (or no negative) sample has an undefined AUROC: NaN, as sklearn.
  sklearn also requires rows that sum to 1 for multiclass AUROC; this metric does not.

Exact and bounded: each class's (score -> positives, negatives) counts go to an on-disk table (`ondisk.py`) whose
B-tree keeps the scores sorted; one scan in score order then gives AUROC as the Mann-Whitney statistic in integer
arithmetic (ties count one half, as sklearn's trapezoids do) and AP as sklearn's step sum over distinct
thresholds. No score is binned or sketched.

ECE is the standard equal-width binned estimate (Guo et al., 2017): confidence = max probability (in float64),
prediction = its argmax (the first on ties), bins (k/n_bins, (k+1)/n_bins] for k < n_bins (15 by default),
ECE = sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|. Its state is per-bin counts and sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import Field

from ..batch import SampleBatch
from . import exact_sum
from .base import MAX_STATE_BYTES, BatchSize
from .inputs import ClassTarget, MetricInputError
from .mapmerge import MapMergeMetric
from .ondisk import ScratchStore
from .registry import register
from .runner import MetricConfigError
from .sums import ExactSum

if TYPE_CHECKING:
    from ..spill import SpillReader

DEFAULT_SCORES = "class_scores"
REPLICATE_BLOCK_ROWS = 512  # (score, sample) rows per step of a bootstrap's scan...
REPLICATE_CELLS = 1 << 22  # ... fewer where replicates x rows would pass this: 32 MiB an int64 array
EXACT_PRODUCT_ROWS = 1 << 12  # samples per exact float64 product of uint8 weights and 32-bit limbs (ECE)


class ClassScoreMetric(MapMergeMetric):
    """Reads (class scores [B, C], true class [B]) batch by batch from the spill."""

    def __init__(
        self,
        scores: str = DEFAULT_SCORES,
        labels: Sequence[str | int] | None = None,
        target_column: str | None = None,
        batch_size: BatchSize = 4096,
    ) -> None:
        if labels is None and target_column is None:
            raise MetricConfigError(
                f"metric {self.name!r} needs the true class of each sample: pass labels=[...] (the classes in the "
                f"column order of {scores!r}) or target_column='...' (a dataset column holding the class index)."
            )
        self.scores = scores
        self.target = ClassTarget(labels, target_column, self.name)
        self.needs_text = self.target.needs_text and target_column is None
        self.needs_arrays = (scores,)
        self.needs_columns = (target_column,) if target_column else ()
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "labels": self.target.labels,
            "target_column": self.target.target_column,
            "batch_size": self.batch_size,
        }

    def scored(self, batch: SampleBatch) -> tuple[np.ndarray, np.ndarray]:
        """(scores float64 [B, C] with C >= 2, true class int64 [B]) of a batch."""
        scores = self._scores(batch)
        return scores, self.target.true_classes(batch, scores.shape[1])

    def _scores(self, batch: SampleBatch) -> np.ndarray:
        if self.scores not in batch.arrays:
            have = ", ".join(sorted(batch.arrays)) or "none"
            raise MetricInputError(
                f"metric {self.name!r} reads the per-sample array {self.scores!r}, but the spill has arrays: {have}. "
                f"Pass it while evaluating: Evaluator.update(..., arrays={{{self.scores!r}: probs}})."
            )
        scores = np.asarray(batch.arrays[self.scores], dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim == 1:
            scores = np.stack([1.0 - scores, scores], axis=1)
        if scores.ndim != 2:
            raise MetricInputError(f"metric {self.name!r}: {self.scores!r} must be [B, C] or [B], got {scores.shape}")
        labels = self.target.labels
        if labels is not None and scores.shape[1] != len(labels):
            raise MetricInputError(
                f"metric {self.name!r}: {self.scores!r} has {scores.shape[1]} columns but {len(labels)} labels were "
                "declared; give one score column per label, in the order of labels."
            )
        if not np.isfinite(scores).all():
            raise MetricInputError(f"metric {self.name!r}: {self.scores!r} contains NaN or infinite scores")
        return scores


class RankingMetric(ClassScoreMetric):
    """Fills one (score -> positives, negatives) table per scored class, then computes from sorted scans.

    Its bootstrap is exact too: per class, the (score, sample, positive) rows sorted on disk and scanned once, in
    the order `from_sorted` reads them, with every replicate's weighted counts of each group of equal score
    (`_weighted_groups`); `replicates_from_groups` is `from_sorted` of each resampled corpus at once."""

    result_key = ""
    descending = False  # the score order `from_sorted` scans in

    def start(self, near: Path) -> None:
        self._scratch_store = self.scratch(near)
        self._tables: dict[int, Any] = {}

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> dict[int, list[tuple[float, int, int]]]:
        scores, true = self.scored(batch)
        return {c: _score_counts(scores[:, c], true == c) for c in _scored_classes(scores)}

    def merge(self, pass_index: int, partial: dict[int, list[tuple[float, int, int]]]) -> None:
        for c, rows in partial.items():
            if c not in self._tables:
                self._tables[c] = self._scratch_store.counter(f"class_{c}", key="REAL", counts=("pos", "neg"))
            self._tables[c].add(rows)

    def finish(self) -> dict[str, float]:
        if not self._tables:
            return {self.result_key: math.nan}
        per_class = [self.from_sorted(self._tables[c]) for c in sorted(self._tables)]
        return {self.result_key: float(np.average(per_class))}

    def from_sorted(self, table: Any) -> float:
        raise NotImplementedError

    def bootstrap(self, reader: SpillReader, weights: Callable[[np.ndarray], np.ndarray],
                  replicates: int) -> dict[str, np.ndarray]:
        """The metric on every resampled corpus (sample i counted w_i times), equal to it to the bit."""
        block_rows = max(1, min(REPLICATE_BLOCK_ROWS, REPLICATE_CELLS // replicates))
        with ScratchStore(reader.path) as store:
            tables: dict[int, Any] = {}
            for batch in reader.iter_batches(self.batch_size, decode=self.needs_text, with_arrays=True):
                scores, true = self.scored(batch)
                for c in _scored_classes(scores):
                    if c not in tables:
                        tables[c] = store.rows(f"class_{c}", key=(("score", "REAL"), ("sample", "INTEGER")),
                                               values=(("positive", "INTEGER"),))
                    tables[c].add(zip(scores[:, c].tolist(), batch.sample_index.tolist(),
                                      (true == c).astype(int).tolist()))
            if not tables:
                return {self.result_key: np.full(replicates, math.nan)}
            per_class = np.stack([
                self.replicates_from_groups(_weighted_groups(tables[c].scan_rows(descending=self.descending),
                                                             weights, replicates, block_rows), replicates)
                for c in sorted(tables)])
        # `finish`'s average of each replicate's classes, column by column: the same sums in the same order
        return {self.result_key: np.array([np.average(np.ascontiguousarray(per_class[:, b]))
                                           for b in range(replicates)])}

    def replicates_from_groups(self, groups: Iterator[tuple[np.ndarray, np.ndarray]], replicates: int) -> np.ndarray:
        """`from_sorted` of each replicate, from its (negatives, positives) per group of equal score."""
        raise NotImplementedError


def _scored_classes(scores: np.ndarray) -> list[int]:
    """The classes a ranking metric scores: class 1 of a binary task, every class of a multiclass one."""
    return [1] if scores.shape[1] == 2 else list(range(scores.shape[1]))


def _weighted_groups(rows: Iterator[tuple[float, int, int]], weights: Callable[[np.ndarray], np.ndarray],
                     replicates: int, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(negatives, positives) of every replicate in each group of equal score, in the order of the (score,
    sample, positive) rows, as [replicates, groups] blocks. A block's last group stays open (its weighted counts
    carried) until a new score starts, so ties are never split and memory stays one block whatever the number
    of tied samples. Groups of no weight in a replicate are there, with zero counts."""
    open_score, open_neg, open_pos = None, None, None
    while block := list(islice(rows, block_rows)):
        scores = np.array([r[0] for r in block])
        w = weights(np.array([r[1] for r in block])).astype(np.int64)
        positive = np.array([r[2] for r in block], dtype=bool)
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        neg = np.add.reduceat(np.where(positive, 0, w), starts, axis=1)
        pos = np.add.reduceat(np.where(positive, w, 0), starts, axis=1)
        if open_score is not None and scores[0] == open_score:
            neg[:, 0] += open_neg
            pos[:, 0] += open_pos
        elif open_score is not None:
            yield open_neg[:, None], open_pos[:, None]
        if len(starts) > 1:
            yield neg[:, :-1], pos[:, :-1]
        open_score, open_neg, open_pos = scores[-1], neg[:, -1], pos[:, -1]
    if open_score is not None:
        yield open_neg[:, None], open_pos[:, None]


def _score_counts(scores: np.ndarray, positive: np.ndarray) -> list[tuple[float, int, int]]:
    """(distinct score, positives, negatives) rows of one batch."""
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse[positive], minlength=len(values))
    neg = np.bincount(inverse[~positive], minlength=len(values))
    return list(zip(values.tolist(), pos.tolist(), neg.tolist()))


@register("auroc")
class Auroc(RankingMetric):
    """Area under the ROC curve (binary, or one-vs-rest macro), equal to sklearn's roc_auc_score."""

    result_key = "auroc"
    scale = "0–1"

    def from_sorted(self, table: Any) -> float:
        """Mann-Whitney U in integers: pairs (pos, neg) with pos scored higher, ties counted one half."""
        twice_u, negatives_below, positives = 0, 0, 0
        for rows in table.scan():
            pos = np.array([r[1] for r in rows], dtype=np.int64)
            neg = np.array([r[2] for r in rows], dtype=np.int64)
            below = negatives_below + np.cumsum(neg) - neg
            twice_u += int(np.sum(pos * (2 * below + neg)))
            negatives_below += int(neg.sum())
            positives += int(pos.sum())
        if positives == 0 or negatives_below == 0:
            return math.nan
        return twice_u / (2 * positives * negatives_below)

    def replicates_from_groups(self, groups: Iterator[tuple[np.ndarray, np.ndarray]], replicates: int) -> np.ndarray:
        """Twice each replicate's Mann-Whitney U, in integers, over the groups in ascending score."""
        twice_u, negatives, positives = (np.zeros(replicates, np.int64) for _ in range(3))
        for neg, pos in groups:
            below = negatives[:, None] + np.cumsum(neg, axis=1) - neg
            twice_u += np.sum(pos * (2 * below + neg), axis=1)
            negatives += neg.sum(axis=1)
            positives += pos.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where((positives > 0) & (negatives > 0), twice_u / (2 * positives * negatives), math.nan)


@register("average_precision")
class AveragePrecision(RankingMetric):
    """Average precision (binary, or one-vs-rest macro), equal to sklearn's average_precision_score."""

    result_key = "average_precision"
    scale = "0–1"
    descending = True

    def from_sorted(self, table: Any) -> float:
        """sum over distinct thresholds (highest first) of recall increase x precision, as sklearn."""
        weighted = ExactSum()
        tp, fp = 0, 0
        for rows in table.scan(descending=True):
            pos = np.array([r[1] for r in rows], dtype=np.int64)
            neg = np.array([r[2] for r in rows], dtype=np.int64)
            cum_tp = tp + np.cumsum(pos)
            cum_fp = fp + np.cumsum(neg)
            weighted.add(pos * (cum_tp / (cum_tp + cum_fp)))
            tp, fp = int(cum_tp[-1]), int(cum_fp[-1])
        return weighted.value / tp if tp else 0.0

    def replicates_from_groups(self, groups: Iterator[tuple[np.ndarray, np.ndarray]], replicates: int) -> np.ndarray:
        """`from_sorted`'s exact sum of each replicate's terms, over the groups in descending score. A group of no
        positive adds nothing (its term is 0, or 0/0 for a group of no weight, which the resampled corpus lacks)."""
        weighted = np.zeros((replicates, exact_sum.STATE_SIZE), np.int64)
        tp, fp = np.zeros(replicates, np.int64), np.zeros(replicates, np.int64)
        for neg, pos in groups:
            cum_tp = tp[:, None] + np.cumsum(pos, axis=1)
            cum_fp = fp[:, None] + np.cumsum(neg, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                weighted = exact_sum.add_rows(weighted, np.where(pos > 0, pos * (cum_tp / (cum_tp + cum_fp)), 0.0))
            tp, fp = cum_tp[:, -1], cum_fp[:, -1]
        return np.array([exact_sum.value(weighted[b]) / tp[b] if tp[b] else 0.0 for b in range(replicates)])


@register("ece")
class ExpectedCalibrationError(ClassScoreMetric):
    """Expected calibration error with equal-width bins (see the module docstring)."""

    scale = "0–1, lower is better"

    def __init__(
        self,
        scores: str = DEFAULT_SCORES,
        labels: Sequence[str | int] | None = None,
        target_column: str | None = None,
        n_bins: Annotated[int, Field(ge=1, le=100_000)] = 15,
        batch_size: BatchSize = 4096,
    ) -> None:
        super().__init__(scores, labels, target_column, batch_size)
        if n_bins < 1:
            raise MetricConfigError(f"metric 'ece': n_bins must be positive, got {n_bins}")
        self.n_bins = n_bins

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_bins": self.n_bins}

    def start(self, near: Path) -> None:
        self._count = np.zeros(self.n_bins, dtype=np.int64)
        self._correct = np.zeros(self.n_bins, dtype=np.int64)
        self._confidence = np.zeros((self.n_bins, exact_sum.STATE_SIZE), dtype=np.int64)
        self._samples = 0

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Per-bin sample counts, right answers and exact confidence sums of the batch."""
        bins, hit, conf = self._binned(batch)
        count = np.zeros(self.n_bins, dtype=np.int64)
        correct = np.zeros(self.n_bins, dtype=np.int64)
        confidence = np.zeros((self.n_bins, exact_sum.STATE_SIZE), dtype=np.int64)
        for k in np.unique(bins[bins >= 0]).tolist():
            in_bin = bins == k
            count[k] = int(in_bin.sum())
            correct[k] = int(hit[in_bin].sum())
            confidence[k] = exact_sum.add(confidence[k], conf[in_bin])
        return count, correct, confidence, len(hit)

    def _binned(self, batch: SampleBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each sample's bin (-1: confidence 0, in no bin), whether its prediction is right, and its confidence."""
        scores, true = self.scored(batch)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        conf = scores.max(axis=1)
        if (conf < 0).any() or (conf > 1).any():
            raise MetricInputError(f"metric 'ece': {self.scores!r} must hold probabilities in [0, 1]")
        bins = np.searchsorted(edges, conf, side="left") - 1  # bin k holds (edges[k], edges[k+1]]
        return bins, scores.argmax(axis=1) == true, conf

    def merge(self, pass_index: int, partial: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
        count, correct, confidence, samples = partial
        self._count += count
        self._correct += correct
        for k in np.flatnonzero(count).tolist():
            self._confidence[k] = exact_sum.merge(self._confidence[k], confidence[k])
        self._samples += samples

    def finish(self) -> dict[str, float]:
        return {"ece": _ece(self._count, self._correct, self._confidence, self._samples)}

    def bootstrap_refusal(self, replicates: int) -> str | None:
        size = replicates * self.n_bins * exact_sum.STATE_SIZE * 8
        if size > MAX_STATE_BYTES:
            return (f"{replicates:,} replicates of its {self.n_bins:,} bins' exact confidence sums would take "
                    f"{size:,} bytes: lower --bootstrap or n_bins")
        return None

    def bootstrap(self, reader: SpillReader, weights: Callable[[np.ndarray], np.ndarray],
                  replicates: int) -> dict[str, np.ndarray]:
        """ECE of every resampled corpus (sample i counted w_i times), equal to it to the bit, in one pass: each
        replicate's per-bin weighted counts, right answers and exact confidence sums. A confidence sum is the
        weights times each sample's `exact_sum` limbs, a float64 matrix product that is exact: weights below 2^8
        over EXACT_PRODUCT_ROWS samples times limbs below 2^32 stay below 2^52."""
        count = np.zeros((replicates, self.n_bins), np.int64)
        correct = np.zeros((replicates, self.n_bins), np.int64)
        confidence = np.zeros((replicates, self.n_bins, exact_sum.STATE_SIZE), np.int64)
        samples = np.zeros(replicates, np.int64)
        step = max(1, min(EXACT_PRODUCT_ROWS, REPLICATE_CELLS // replicates))
        for batch in reader.iter_batches(self.batch_size, decode=self.needs_text, with_arrays=True):
            bins, hit, conf = self._binned(batch)
            for start in range(0, len(bins), step):
                part = slice(start, start + step)
                w = weights(batch.sample_index[part]).astype(np.int64)
                samples += w.sum(axis=1)
                _add_weighted_bins((count, correct, confidence), w, bins[part], hit[part], conf[part])
        return {"ece": np.array([_ece(count[b], correct[b], confidence[b], samples[b]) for b in range(replicates)])}


def _add_weighted_bins(sums: tuple[np.ndarray, np.ndarray, np.ndarray], w: np.ndarray, bins: np.ndarray,
                       hit: np.ndarray, conf: np.ndarray) -> None:
    """Add each replicate's weighted sample count, right answers and exact confidence sum of every bin of these
    samples (w: [replicates, samples]) to `sums` (count, correct, confidence), in place."""
    count, correct, confidence = sums
    for k in np.unique(bins[bins >= 0]).tolist():
        members = np.flatnonzero(bins == k)
        count[:, k] += w[:, members].sum(axis=1)
        correct[:, k] += w[:, members[hit[members]]].sum(axis=1)
        limbs = exact_sum.per_value(conf[members]).astype(np.float64)
        added = (w[:, members].astype(np.float64) @ limbs).astype(np.int64)
        confidence[:, k] = exact_sum.normalise_rows(confidence[:, k] + added)


def _ece(count: np.ndarray, correct: np.ndarray, confidence: np.ndarray, samples: int) -> float:
    """sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|, from the per-bin sums."""
    if samples == 0:
        return math.nan
    gaps = [
        abs(correct[k] / count[k] - exact_sum.value(confidence[k]) / count[k]) * (count[k] / samples)
        for k in range(len(count))
        if count[k]
    ]
    return math.fsum(gaps)
