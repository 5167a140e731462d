"""Classification over decoded answer strings with an open label set: the classes are only known at the end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..batch import SampleBatch
from .base import BatchSize
from .mapmerge import MapMergeMetric
from .registry import register


@register("answer_macro_f1")
class AnswerMacroF1(MapMergeMetric):
    """Macro-F1 over decoded answers, classes = every answer seen as label or prediction.

    Equals `sklearn.metrics.f1_score(labels, preds, average="macro")` on the whole data, to the bit. One pass over
    the spill; the (true positives, false positives, false negatives) of each distinct answer go to an on-disk
    table, so memory does not hold the answer strings. The final mean takes numpy's mean over the per-answer F1 in
    sorted order, as sklearn does: 8 bytes per distinct answer, at the end only.
    """

    scale = "0–1"

    needs_text = True

    def __init__(self, batch_size: BatchSize = 4096) -> None:
        self.batch_size = batch_size

    def params(self) -> dict[str, int]:
        return {"batch_size": self.batch_size}

    def start(self, near: Path) -> None:
        self._table = self.scratch(near).counter("answers", counts=("tp", "fp", "fn"))

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> list[tuple[str, int, int, int]]:
        return _answer_counts(batch.pred_text or [], batch.label_text or [])

    def merge(self, pass_index: int, partial: list[tuple[str, int, int, int]]) -> None:
        self._table.add(partial)

    def finish(self) -> dict[str, float]:
        # SQLite orders TEXT by UTF-8 bytes, which is code point order: the order of sklearn's sorted classes
        f1 = np.concatenate([_f1(rows) for rows in self._table.scan()] or [np.zeros(0)])
        return {"answer_macro_f1": float(np.mean(f1)) if len(f1) else 0.0}


def _f1(rows: list[tuple[str, int, int, int]]) -> np.ndarray:
    counts = np.array([r[1:] for r in rows], dtype=np.int64)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    return 2 * tp / (2 * tp + fp + fn)  # every answer was seen, so 2tp + fp + fn > 0


def _answer_counts(preds: list[str], labels: list[str]) -> list[tuple[str, int, int, int]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for pred, label in zip(preds, labels):
        if pred == label:
            tp[label] += 1
        else:
            fp[pred] += 1
            fn[label] += 1
    return [(answer, tp[answer], fp[answer], fn[answer]) for answer in tp.keys() | fp.keys() | fn.keys()]
