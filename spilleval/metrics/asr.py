"""Word and character error rates, and jiwer's MER / WIL / WIP, from corpus edit counts, streaming.

jiwer's `process_words` / `process_characters` align each reference with its hypothesis and count hits,
substitutions, deletions and insertions. Those four integers per batch are the state, so every result is
jiwer's corpus measure over the whole list, not a mean of per-sample measures, computed from the sums with jiwer's
own formulas and edge cases (`jiwer.process.process_words`):

- WER = (S + D + I) / (H + S + D); with no reference word at all, the number of insertions.
- MER = (S + D + I) / (H + S + D + I); with no reference word: 0 if no hypothesis word either, else 1.
- WIP = H / (H + S + D) * H / (H + S + I) (0 with no hypothesis word; with no reference word: 1 if no hypothesis
  word either, else 0); WIL = 1 - WIP.

They equal `jiwer.wer` / `cer` / `mer` / `wil` / `wip(refs, hyps)` with jiwer's default transforms. jiwer is an
optional extra (`pip install 'spilleval[asr]'`), imported when one of these metrics is built.
"""

from __future__ import annotations

from typing import Any

from ..batch import SampleBatch
from .base import StreamingMetric
from .deps import require
from .inputs import MetricInputError, references_of
from .registry import register

COUNTS = ("hits", "substitutions", "deletions", "insertions")


class EditCountMetric(StreamingMetric):
    """Sums jiwer's alignment counts; subclasses name the alignment (words or characters) and the measure."""

    needs_text = True
    alignment = "process_words"

    def __init__(self, references_column: str | None = None) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.process = getattr(require("jiwer", self.name), self.alignment)
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

    def counts(self) -> tuple[int, int, int, int]:
        """(hits, substitutions, deletions, insertions) over the corpus."""
        hits, subs, dels, ins = (int(self.value(c)) for c in COUNTS)
        return hits, subs, dels, ins

    def compute(self) -> dict[str, float]:
        return {self.name: self.measure(*self.counts())}

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        raise NotImplementedError


def error_rate(hits: int, subs: int, dels: int, ins: int) -> float:
    if hits + subs + dels == 0:
        return float(ins)
    return float(subs + dels + ins) / float(hits + subs + dels)


def word_information_preserved(hits: int, subs: int, dels: int, ins: int) -> float:
    reference_words, hypothesis_words = hits + subs + dels, hits + subs + ins
    if reference_words == 0:
        return 1.0 if hypothesis_words == 0 else 0.0
    if hypothesis_words == 0:
        return 0.0
    return (float(hits) / reference_words) * (float(hits) / hypothesis_words)


@register("wer")
class WordErrorRate(EditCountMetric):
    """Corpus word error rate, equal to `jiwer.wer(references, hypotheses)`."""

    scale = "≥ 0, lower is better"

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        return error_rate(hits, subs, dels, ins)


@register("cer")
class CharacterErrorRate(EditCountMetric):
    """Corpus character error rate, equal to `jiwer.cer(references, hypotheses)`."""

    scale = "≥ 0, lower is better"

    alignment = "process_characters"

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        return error_rate(hits, subs, dels, ins)


@register("mer")
class MatchErrorRate(EditCountMetric):
    """Corpus match error rate, equal to `jiwer.mer(references, hypotheses)`."""

    scale = "0–1, lower is better"

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        if hits + subs + dels == 0:
            return 0.0 if ins == 0 else 1.0
        return float(subs + dels + ins) / float(hits + subs + dels + ins)


@register("wip")
class WordInformationPreserved(EditCountMetric):
    """Corpus word information preserved, equal to `jiwer.wip(references, hypotheses)`."""

    scale = "0–1"

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        return word_information_preserved(hits, subs, dels, ins)


@register("wil")
class WordInformationLost(EditCountMetric):
    """Corpus word information lost (1 - WIP), equal to `jiwer.wil(references, hypotheses)`."""

    scale = "0–1, lower is better"

    def measure(self, hits: int, subs: int, dels: int, ins: int) -> float:
        return 1 - word_information_preserved(hits, subs, dels, ins)
