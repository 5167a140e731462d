"""Classification over decoded answer strings with an open label set: the classes are only known at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..batch import SampleBatch
from .base import BatchSize
from .mapmerge import MapMergeMetric
from .ngram_table import NgramCountWriter, prefix_keys, write_runs
from .registry import register

Rows = tuple[np.ndarray, pa.Array, np.ndarray]  # (prefix keys, answers, [tp, fp, fn] counts)


@register("answer_macro_f1")
class AnswerMacroF1(MapMergeMetric):
    """Macro-F1 over decoded answers, classes = every answer seen as label or prediction.

    Equals `sklearn.metrics.f1_score(labels, preds, average="macro")` on the whole data, to the bit. One pass over
    the spill; the (true positives, false positives, false negatives) of each distinct answer go to an on-disk
    table of sorted runs (`ngram_table.py`) keyed by the answer's first bytes (`prefix_keys`), so that the merged
    table is in code point order, the order of sklearn's sorted classes; each task writes its answers as a run,
    the parent merges runs. The final mean takes numpy's mean over the per-answer F1 in that order, as sklearn
    does: 8 bytes per distinct answer, at the end only.
    """

    scale = "0–1"

    needs_text = True

    def __init__(self, batch_size: BatchSize = 4096) -> None:
        self.batch_size = batch_size

    def params(self) -> dict[str, int]:
        return {"batch_size": self.batch_size}

    def start(self, near: Path) -> None:
        self._runs = self.scratch_directory(near)
        self._table = NgramCountWriter(self._runs / "answers", pool=self.pool)

    def context(self, pass_index: int) -> str:
        return str(self._runs)

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> Rows:
        return _answer_counts(batch.pred_text or [], batch.label_text or [])

    def reduce_task(self, pass_index: int, partials: list[Rows], context: Any) -> list[list[str]]:
        """The runs the task's answer counts were written to."""
        return [write_runs(context, partials)]

    def merge(self, pass_index: int, partial: list[str]) -> None:
        for run in partial:
            self._table.adopt(run)

    def finish(self) -> dict[str, float]:
        f1 = np.concatenate(self._table.summarize(answer_f1) or [np.zeros(0)])
        return {"answer_macro_f1": float(np.mean(f1)) if len(f1) else 0.0}


def answer_f1(blocks: Iterator[np.ndarray]) -> np.ndarray:
    """Each answer's F1, in key order, from [rows, (tp, fp, fn)] blocks of counts."""
    return np.concatenate([_f1(counts) for counts in blocks] or [np.zeros(0)])


def _f1(counts: np.ndarray) -> np.ndarray:
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    return 2 * tp / (2 * tp + fp + fn)  # every answer was seen, so 2tp + fp + fn > 0


def _answer_counts(preds: list[str], labels: list[str]) -> Rows:
    """One row per sample and side: the label with [1, 0, 0] where the prediction equals it, otherwise the
    prediction with [0, 1, 0] and the label with [0, 0, 1]; equal answers are summed when the run is written."""
    size = min(len(preds), len(labels))
    pred = pa.array(preds[:size], pa.large_string())
    label = pa.array(labels[:size], pa.large_string())
    hit = pc.equal(pred, label)
    miss = pc.invert(hit)
    texts = pa.concat_arrays([label.filter(hit), pred.filter(miss), label.filter(miss)])
    misses = len(texts) - size  # each miss adds two rows
    counts = np.zeros((len(texts), 3), dtype=np.int64)
    counts[np.arange(len(texts)), np.repeat([0, 1, 2], [size - misses, misses, misses])] = 1
    return prefix_keys(texts), texts, counts
