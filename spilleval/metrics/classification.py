"""accuracy / precision / recall / f1 over a declared label set, from a streaming confusion matrix.

The class of a sample is decided by `ClassTarget` (see `inputs.py`): decoded text matched against string labels,
the first supervised token against token-id labels, or a dataset column for the true class. The state is the
L x (L+1) confusion matrix (true class x predicted class, the last column for predictions outside the label set),
so every average is exact and mergeable. The numbers equal scikit-learn's
`accuracy_score(y_true, y_pred)` and `precision/recall/f1_score(y_true, y_pred, labels=labels, average=...,
zero_division=0)` on the whole data, with y_pred holding the raw prediction (outside the set or not).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..batch import SampleBatch
from .base import State, StreamingMetric, safe_div
from .inputs import NOT_A_LABEL, ClassTarget, column_of
from .registry import register
from .runner import MetricConfigError

AVERAGES = ("micro", "macro", "weighted")


class ConfusionMetric(StreamingMetric):
    """Shared state and class mapping; subclasses choose what `compute` reports."""

    needs_labels = True

    def __init__(self, labels: Sequence[str | int] | None = None, target_column: str | None = None) -> None:
        super().__init__()
        if labels is None and self.needs_labels:
            raise MetricConfigError(
                f"metric {self.name!r} needs the declared label set: "
                f"metrics=[{{'name': {self.name!r}, 'params': {{'labels': ['yes', 'no']}}}}]. "
                "For an open label set (classes known only at the end) use 'answer_macro_f1'."
            )
        self.target = ClassTarget(labels, target_column, self.name)
        self.needs_columns = (target_column,) if target_column else ()
        self.needs_text = self.target.needs_text or labels is None
        self.num_labels = len(self.target.labels or [])
        if self.num_labels:
            self.add_state("confusion", (self.num_labels, self.num_labels + 1))

    def params(self) -> dict[str, Any]:
        return {"labels": self.target.labels, "target_column": self.target.target_column}

    def update(self, batch: SampleBatch) -> None:
        cells = np.bincount(self._cells(batch), minlength=self.num_labels * (self.num_labels + 1))
        self.add("confusion", cells.reshape(self.num_labels, self.num_labels + 1))

    def sample_states(self, batch: SampleBatch) -> State:
        if not self.num_labels:
            return super().sample_states(batch)
        one_hot = np.zeros((len(batch), self.num_labels * (self.num_labels + 1)), dtype=np.int64)
        one_hot[np.arange(len(batch)), self._cells(batch)] = 1
        return {"confusion": one_hot.reshape(len(batch), self.num_labels, self.num_labels + 1)}

    def _cells(self, batch: SampleBatch) -> np.ndarray:
        """Each sample's cell in the flattened confusion matrix (true class x predicted class or not-a-label)."""
        true = self.target.true_classes(batch)
        pred = self.target.predicted_classes(batch)
        pred = np.where(pred == NOT_A_LABEL, self.num_labels, pred)
        return true * (self.num_labels + 1) + pred

    def per_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true positives, predicted count, true count) per declared label."""
        confusion = self.value("confusion")
        labelled = confusion[:, : self.num_labels]
        return np.diagonal(labelled).copy(), labelled.sum(axis=0), confusion.sum(axis=1)

    def averages(self, kind: str) -> dict[str, float]:
        """micro / macro / weighted precision, recall or f1, as scikit-learn with zero_division=0."""
        tp, predicted, true = self.per_class()
        numerator = {"precision": tp, "recall": tp, "f1": 2 * tp}[kind]
        denominator = {"precision": predicted, "recall": true, "f1": predicted + true}[kind]
        per_class = np.divide(numerator, denominator, out=np.zeros(len(tp)), where=denominator > 0)
        weights = true.sum()
        return {
            f"{kind}_micro": safe_div(numerator.sum(), denominator.sum()),
            f"{kind}_macro": float(np.average(per_class)),
            f"{kind}_weighted": float(np.average(per_class, weights=true)) if weights else 0.0,
        }


@register("accuracy")
class Accuracy(ConfusionMetric):
    """Fraction of samples whose predicted class is the true class.

    Without `labels` the label set is open: a sample is right when its stripped decoded prediction equals its
    stripped decoded label (or the `target_column` value); the state is then two counts.
    """

    scale = "0–1"

    needs_labels = False
    sample_mean_outputs = ("accuracy",)

    def __init__(self, labels: Sequence[str | int] | None = None, target_column: str | None = None) -> None:
        super().__init__(labels, target_column)
        if not self.num_labels:
            self.add_state("correct")
            self.add_state("samples")

    def update(self, batch: SampleBatch) -> None:
        if self.num_labels:
            super().update(batch)
            return
        assert batch.pred_text is not None and batch.label_text is not None
        column = self.target.target_column
        truth = batch.label_text if column is None else [str(v) for v in column_of(batch, column, self.name)]
        self.add("correct", sum(p.strip() == t.strip() for p, t in zip(batch.pred_text, truth)))
        self.add("samples", len(batch))

    def compute(self) -> dict[str, float]:
        if self.num_labels:
            confusion = self.value("confusion")
            return {"accuracy": safe_div(np.trace(confusion[:, : self.num_labels]), confusion.sum())}
        return {"accuracy": safe_div(self.value("correct"), self.value("samples"))}


@register("precision")
class Precision(ConfusionMetric):
    """precision_micro / _macro / _weighted over the declared labels."""

    outputs = ("precision_micro", "precision_macro", "precision_weighted")
    scale = "0–1"

    def compute(self) -> dict[str, float]:
        return self.averages("precision")


@register("recall")
class Recall(ConfusionMetric):
    """recall_micro / _macro / _weighted over the declared labels."""

    outputs = ("recall_micro", "recall_macro", "recall_weighted")
    scale = "0–1"

    def compute(self) -> dict[str, float]:
        return self.averages("recall")


@register("f1")
class F1(ConfusionMetric):
    """f1_micro / _macro / _weighted over the declared labels."""

    outputs = ("f1_micro", "f1_macro", "f1_weighted")
    scale = "0–1"

    def compute(self) -> dict[str, float]:
        return self.averages("f1")
