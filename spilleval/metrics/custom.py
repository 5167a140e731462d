"""The short way to add a metric: a per-sample function whose mean over the corpus is the score.

    from spilleval.metrics import sample_metric

    @sample_metric("answer_length_ratio")
    def answer_length_ratio(prediction: str, label: str) -> float:
        return len(prediction) / max(len(label), 1)

The function gets the decoded prediction and label text of one sample; the registered metric is streaming (an
exact float sum and a count, mergeable across batches and ranks) and is usable by name everywhere:
`Evaluator(metrics=[...])`, `SpillingTrainer(metrics=[...])`, `spilleval compute --metrics ... --plugin module`.
For anything that is not a mean of per-sample values, subclass `StreamingMetric` or `CorpusMetric` and decorate it
with `@register("name")`.
"""

from __future__ import annotations

from typing import Callable

from ..batch import SampleBatch
from .base import StreamingMetric, safe_div
from .registry import register

SampleFunction = Callable[[str, str], float]


def sample_metric(name: str) -> Callable[[SampleFunction], SampleFunction]:
    """Register `fn(prediction_text, label_text) -> float` as the streaming metric `name` (its mean)."""

    def wrap(fn: SampleFunction) -> SampleFunction:
        class SampleMean(StreamingMetric):
            __doc__ = fn.__doc__ or f"Mean over samples of {fn.__name__}(prediction, label)."
            needs_text = True

            def __init__(self) -> None:
                super().__init__()
                self.add_float_state("total")
                self.add_state("samples")

            def update(self, batch: SampleBatch) -> None:
                assert batch.pred_text is not None and batch.label_text is not None
                self.add_float("total", [float(fn(p, t)) for p, t in zip(batch.pred_text, batch.label_text)])
                self.add("samples", len(batch))

            def compute(self) -> dict[str, float]:
                return {name: safe_div(self.value("total"), self.value("samples"))}

        SampleMean.__name__ = SampleMean.__qualname__ = f"SampleMean_{fn.__name__}"
        SampleMean.__module__ = fn.__module__
        register(name)(SampleMean)
        return fn

    return wrap
