"""Corpus BLEU and chrF, streaming, from sacrebleu's own sufficient statistics.

sacrebleu computes a corpus score in two steps: per-segment integer statistics
(`_extract_corpus_statistics`: n-gram matches and totals, lengths), summed over the corpus, then the score from
the sums (`_compute_score_from_stats`). The state here is that sum, so the result equals
`sacrebleu.corpus_bleu` / `corpus_chrf` on the whole data exactly, for any batching or merge order.

Several references per sample come from a dataset column (`references_column`). sacrebleu's corpus API takes
reference *streams* of equal length; a sample with fewer references is padded with `None`, which sacrebleu drops
per segment. The batch is padded the same way, so a variable number of references per sample equals
`corpus_bleu(hyps, streams)` with the whole corpus padded with `None`.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from sacrebleu.metrics import BLEU, CHRF

from ..batch import SampleBatch
from .base import NgramOrder, StreamingMetric
from .inputs import references_of
from .registry import register


def reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-sample reference lists -> sacrebleu's reference streams, shorter lists padded with None."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


class SacrebleuStatsMetric(StreamingMetric):
    """Sums a sacrebleu metric's segment statistics; subclasses name the sacrebleu class and the result key."""

    needs_text = True
    scorer_class: type = BLEU
    result_key = ""

    def __init__(self, references_column: str | None, **options: Any) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.options = options
        self.scorer = self.scorer_class(**options)
        width = len(self.scorer._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", (width,))

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column, **self.options}

    def update(self, batch: SampleBatch) -> None:
        if not len(batch):
            return
        assert batch.pred_text is not None
        streams = reference_streams(references_of(batch, self.references_column, self.name))
        stats = self.scorer._extract_corpus_statistics(batch.pred_text, streams)
        self.add("stats", np.asarray(stats, dtype=np.int64).sum(axis=0))

    def compute(self) -> dict[str, float]:
        stats = [int(x) for x in self.value("stats")]
        return {self.result_key: float(self.scorer._compute_score_from_stats(stats).score)}


@register("bleu")
class Bleu(SacrebleuStatsMetric):
    """Corpus BLEU (0-100), equal to `sacrebleu.corpus_bleu` with the same options (default tokenizer 13a)."""

    scorer_class = BLEU
    result_key = "bleu"

    def __init__(
        self,
        references_column: str | None = None,
        tokenize: str = BLEU.TOKENIZER_DEFAULT,
        lowercase: bool = False,
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        effective_order: bool = False,
    ) -> None:
        super().__init__(
            references_column,
            tokenize=tokenize,
            lowercase=lowercase,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            effective_order=effective_order,
        )


@register("chrf")
class Chrf(SacrebleuStatsMetric):
    """Corpus chrF (0-100; chrF++ with word_order=2), equal to `sacrebleu.corpus_chrf` with the same options."""

    scorer_class = CHRF
    result_key = "chrf"

    def __init__(
        self,
        references_column: str | None = None,
        char_order: NgramOrder = CHRF.CHAR_ORDER,
        word_order: Annotated[int, Field(ge=0, le=32)] = CHRF.WORD_ORDER,
        beta: Annotated[int, Field(ge=0, le=1000)] = CHRF.BETA,
        lowercase: bool = False,
        whitespace: bool = False,
        eps_smoothing: bool = False,
    ) -> None:
        super().__init__(
            references_column,
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
