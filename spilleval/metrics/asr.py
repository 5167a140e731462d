"""Word and character error rates from corpus edit counts, streaming.

jiwer's `process_words` / `process_characters` align each reference with its hypothesis and count hits,
substitutions, deletions and insertions. Those four integers per batch are the state, so the result is
jiwer's corpus rate (S + D + I) / (H + S + D) over the whole list, not a mean of per-sample rates, and it equals
`jiwer.wer(refs, hyps)` / `jiwer.cer(refs, hyps)` exactly (jiwer's default transforms). With no reference word
at all, jiwer reports the number of insertions, and so does this metric.
"""

from __future__ import annotations

from typing import Any, Callable

import jiwer

from ..batch import SampleBatch
from .base import StreamingMetric
from .inputs import MetricInputError, references_of
from .registry import register

COUNTS = ("hits", "substitutions", "deletions", "insertions")


class EditCountMetric(StreamingMetric):
    """Sums jiwer's alignment counts; subclasses name the jiwer function and the result key."""

    needs_text = True
    process: Callable[..., Any] = staticmethod(jiwer.process_words)
    result_key = ""

    def __init__(self, references_column: str | None = None) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        for count in COUNTS:
            self.add_state(count)

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column}

    def update(self, batch: SampleBatch) -> None:
        if not len(batch):
            return
        assert batch.pred_text is not None
        refs = references_of(batch, self.references_column, self.name)
        if any(len(r) != 1 for r in refs):
            raise MetricInputError(
                f"metric {self.name!r} takes exactly one reference per sample; column "
                f"{self.references_column!r} holds several. Store a single transcript per sample."
            )
        output = self.process([r[0] for r in refs], batch.pred_text)
        for count in COUNTS:
            self.add(count, getattr(output, count))

    def compute(self) -> dict[str, float]:
        hits, subs, dels, ins = (int(self.value(c)) for c in COUNTS)
        if hits + subs + dels == 0:
            return {self.result_key: float(ins)}
        return {self.result_key: float(subs + dels + ins) / float(hits + subs + dels)}


@register("wer")
class WordErrorRate(EditCountMetric):
    """Corpus word error rate, equal to `jiwer.wer(references, hypotheses)`."""

    process = staticmethod(jiwer.process_words)
    result_key = "wer"


@register("cer")
class CharacterErrorRate(EditCountMetric):
    """Corpus character error rate, equal to `jiwer.cer(references, hypotheses)`."""

    process = staticmethod(jiwer.process_characters)
    result_key = "cer"
