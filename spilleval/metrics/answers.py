"""Classification over decoded answer strings with an open label set: the classes are only known at the end."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from .base import CorpusMetric
from .registry import register

if TYPE_CHECKING:
    from ..spill import SpillReader


@register("answer_macro_f1")
class AnswerMacroF1(CorpusMetric):
    """Macro-F1 over decoded answers, classes = every answer seen as label or prediction.

    Equals `sklearn.metrics.f1_score(labels, preds, average="macro")` on the whole data. Memory: one pass over
    the spill, three counters per distinct answer string (not per sample).
    """

    needs_text = True

    def __init__(self, batch_size: int = 4096) -> None:
        self.batch_size = batch_size

    def params(self) -> dict[str, int]:
        return {"batch_size": self.batch_size}

    def compute(self, reader: "SpillReader") -> dict[str, float]:
        tp: Counter[str] = Counter()
        fp: Counter[str] = Counter()
        fn: Counter[str] = Counter()
        for batch in reader.iter_batches(self.batch_size, decode=True, with_arrays=False):
            for pred, label in zip(batch.pred_text or [], batch.label_text or []):
                if pred == label:
                    tp[label] += 1
                else:
                    fp[pred] += 1
                    fn[label] += 1
        classes = set(tp) | set(fp) | set(fn)
        if not classes:
            return {"answer_macro_f1": 0.0}
        f1 = np.array([_f1(tp[c], fp[c], fn[c]) for c in sorted(classes)], dtype=np.float64)
        # numpy's (pairwise) mean over sorted classes, as sklearn averages: bit-identical, not only close
        return {"answer_macro_f1": float(np.mean(f1))}


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0
