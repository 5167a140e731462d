"""What a metric reads from a batch besides the ids: reference strings, the class of a sample, class scores.

References. A metric with `references_column="references"` reads that dataset column, stored in the spill next
to the predictions (`Evaluator.update(..., columns={"references": refs})`, one `str` or `list[str]` per sample).
`None` entries of a list are dropped (sacrebleu's convention for a variable number of references). With
`references_column=None` the single reference is the decoded label text.

Classes. A declared label set `labels=[...]` fixes the classes:
- strings: the class of a sample is its decoded text with surrounding whitespace stripped
  (`" yes"` -> `"yes"`); a prediction that is not one of the labels is a wrong answer of no class.
- integers: token ids; the class of a sample is its first supervised token (label or argmax prediction).
- `target_column="label"` takes the true class from a dataset column instead (a label of `labels`, or, with no
  `labels`, a class index).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..batch import SampleBatch
from .runner import MetricConfigError

NOT_A_LABEL = -1  # predicted class index of a prediction outside the declared label set


class MetricInputError(MetricConfigError):
    """A batch lacks what a metric needs to read (a column, an array, a label of the declared set)."""


def references_of(batch: SampleBatch, column: str | None, metric: str) -> list[list[str]]:
    """The reference strings of every sample of the batch (at least one each)."""
    if column is None:
        if batch.label_text is None:
            raise MetricInputError(f"metric {metric!r} needs decoded label text: the batch was not decoded")
        return [[text] for text in batch.label_text]
    values = column_of(batch, column, metric)
    refs = [_as_references(v, column, metric) for v in values]
    for position, sample_refs in enumerate(refs):
        if not sample_refs:
            raise MetricInputError(
                f"metric {metric!r}: sample {int(batch.sample_index[position])} has no reference in column "
                f"{column!r}. Give every sample at least one reference string."
            )
    return refs


def column_of(batch: SampleBatch, column: str, metric: str) -> list[Any]:
    try:
        return batch.columns[column]
    except KeyError:
        have = ", ".join(sorted(batch.columns)) or "none"
        raise MetricInputError(
            f"metric {metric!r} reads the dataset column {column!r}, but the spilled batch has columns: {have}. "
            f"Pass it while evaluating (Evaluator.update(..., columns={{{column!r}: [...]}})) or name another "
            "column with the metric's parameter."
        ) from None


def _as_references(value: Any, column: str, metric: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) or x is None for x in value):
        return [x for x in value if x is not None]
    raise MetricInputError(
        f"metric {metric!r}: column {column!r} must hold a string or a list of strings per sample, got "
        f"{type(value).__name__}"
    )


class ClassTarget:
    """Maps samples to class indices 0..L-1 of a declared label set (see the module docstring)."""

    def __init__(self, labels: Sequence[str | int] | None, target_column: str | None, metric: str) -> None:
        self.metric = metric
        self.target_column = target_column
        self.labels = None if labels is None else _check_labels(list(labels), metric)
        self.by_token = self.labels is not None and isinstance(self.labels[0], int)
        self._index = None if self.labels is None else {label: i for i, label in enumerate(self.labels)}

    @property
    def needs_text(self) -> bool:
        """Decoded text is read when string labels classify the prediction or the label text."""
        return self.labels is not None and not self.by_token

    def true_classes(self, batch: SampleBatch, num_classes: int | None = None) -> np.ndarray:
        """int64 [B] class indices; raises naming the sample when one is not a declared class."""
        if self.target_column is not None:
            values = column_of(batch, self.target_column, self.metric)
            if self._index is None:
                return self._class_indices(batch, values, num_classes)
        elif self._index is None:
            raise MetricInputError(
                f"metric {self.metric!r} needs the true class of each sample: pass labels=[...] (the declared "
                "label set) or target_column='...' (a dataset column holding the class index)."
            )
        else:
            values = self._sample_keys(batch, use_labels=True)
        classes = np.array([self._index.get(v, NOT_A_LABEL) for v in values], dtype=np.int64)
        bad = np.flatnonzero(classes == NOT_A_LABEL)
        if len(bad):
            i = int(bad[0])
            raise MetricInputError(
                f"metric {self.metric!r}: the true class {values[i]!r} of sample {int(batch.sample_index[i])} is not "
                f"in the declared label set {self.labels!r}. Add it to labels=[...], or use 'answer_macro_f1' for an "
                "open label set."
            )
        return classes

    def predicted_classes(self, batch: SampleBatch) -> np.ndarray:
        """int64 [B] class indices of the predictions; NOT_A_LABEL for a prediction outside the label set."""
        if self._index is None:
            raise MetricInputError(f"metric {self.metric!r} classifies predictions only with labels=[...]")
        keys = self._sample_keys(batch, use_labels=False)
        return np.array([self._index.get(k, NOT_A_LABEL) for k in keys], dtype=np.int64)

    def _sample_keys(self, batch: SampleBatch, *, use_labels: bool) -> list[Any]:
        if self.by_token:
            ids, offsets = (batch.label_ids, batch.label_row_offsets) if use_labels else (batch.pred_ids, batch.offsets)
            first = np.full(len(batch), NOT_A_LABEL, dtype=np.int64)
            supervised = np.diff(offsets) > 0
            first[supervised] = ids[offsets[:-1][supervised]]
            return first.tolist()
        texts = batch.label_text if use_labels else batch.pred_text
        if texts is None:
            raise MetricInputError(f"metric {self.metric!r} needs decoded text: the batch was not decoded")
        return [t.strip() for t in texts]

    def _class_indices(self, batch: SampleBatch, values: list[Any], num_classes: int | None) -> np.ndarray:
        """Column values taken as class indices (no labels declared): integers in [0, num_classes)."""
        for i, v in enumerate(values):
            is_int = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            if not is_int or v < 0 or (num_classes is not None and v >= num_classes):
                raise MetricInputError(
                    f"metric {self.metric!r}: column {self.target_column!r} of sample {int(batch.sample_index[i])} "
                    f"holds {v!r}, not a class index in [0, {num_classes}). Store integer class indices, or pass "
                    "labels=[...] to map label values to indices."
                )
        return np.asarray(values, dtype=np.int64)


def _check_labels(labels: list[Any], metric: str) -> list[Any]:
    kinds = {type(x) for x in labels}
    if not labels or not (kinds <= {str} or kinds <= {int}):
        raise MetricConfigError(
            f"metric {metric!r}: labels must be a non-empty list of strings or of token ids, got {labels!r}"
        )
    if len(set(labels)) != len(labels):
        raise MetricConfigError(f"metric {metric!r}: labels must be distinct, got {labels!r}")
    return labels
