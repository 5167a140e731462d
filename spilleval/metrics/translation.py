"""Corpus BLEU, chrF and TER, streaming, from sacrebleu's own sufficient statistics.

sacrebleu computes a corpus score in two steps: per-segment statistics (`_extract_corpus_statistics`: n-gram
matches and totals, lengths; for TER the edits and the average reference length), summed over the corpus, then the
score from the sums (`_compute_score_from_stats`). The state here is that sum, so the result equals
`sacrebleu.corpus_bleu` / `corpus_chrf` / `corpus_ter` on the whole data for any batching or merge order: exactly
for the integer statistics of BLEU and chrF; TER's average reference length of a sample with several references is
a float, summed exactly here (sacrebleu adds them in corpus order, which can round differently in the last bits).

Several references per sample come from a dataset column (`references_column`). sacrebleu's corpus API takes
reference *streams* of equal length; a sample with fewer references is padded with `None`, which sacrebleu drops
per segment. The batch is padded the same way, so a variable number of references per sample equals
`corpus_bleu(hyps, streams)` with the whole corpus padded with `None`.

sacrebleu is imported when one of these metrics is built (it is a dependency of spilleval).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field

from ..batch import SampleBatch
from . import exact_sum
from .base import NgramOrder, State, StreamingMetric
from .deps import require
from .inputs import references_of
from .registry import register


def reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-sample reference lists -> sacrebleu's reference streams, shorter lists padded with None."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


class SacrebleuStatsMetric(StreamingMetric):
    """Sums a sacrebleu metric's integer segment statistics; subclasses name the sacrebleu class."""

    needs_text = True
    scorer_class = ""  # the class's name in sacrebleu.metrics

    def __init__(self, references_column: str | None, **options: Any) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.options = options
        self.scorer = getattr(require("sacrebleu.metrics", self.name), self.scorer_class)(**options)
        self.declare_states()

    def declare_states(self) -> None:
        width = len(self.scorer._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", (width,))

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column, **self.options}

    def update(self, batch: SampleBatch) -> None:
        if not len(batch):
            return
        for name, per_sample in self.states_of(self.segment_statistics(batch)).items():
            self.merge({name: per_sample.sum(axis=0)})

    def sample_states(self, batch: SampleBatch) -> State:
        return self.states_of(self.segment_statistics(batch) if len(batch) else [])

    def segment_statistics(self, batch: SampleBatch) -> list[list[Any]]:
        """sacrebleu's statistics of each sample (segment) of the batch."""
        assert batch.pred_text is not None
        streams = reference_streams(references_of(batch, self.references_column, self.name))
        return self.scorer._extract_corpus_statistics(batch.pred_text, streams)

    def states_of(self, stats: list[list[Any]]) -> State:
        """Per-sample states from sacrebleu's segment statistics."""
        return {"stats": np.asarray(stats, dtype=np.int64).reshape(len(stats), -1)}

    def score(self) -> Any:
        """sacrebleu's score object for the summed statistics."""
        return self.scorer._compute_score_from_stats([int(x) for x in self.value("stats")])

    def compute(self) -> dict[str, float]:
        return {self.name: float(self.score().score)}


@register("bleu")
class Bleu(SacrebleuStatsMetric):
    """Corpus BLEU (0-100), equal to `sacrebleu.corpus_bleu` with the same options (default tokenizer 13a), and
    its n-gram precisions `bleu_precision_1` .. `_4` (0-100, smoothed) as sacrebleu reports them
    (`BLEUScore.precisions`)."""

    outputs = ("bleu", "bleu_precision_1", "bleu_precision_2", "bleu_precision_3", "bleu_precision_4")
    scale = "0–100"

    scorer_class = "BLEU"

    def __init__(
        self,
        references_column: str | None = None,
        tokenize: str = "13a",
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

    def compute(self) -> dict[str, float]:
        score = self.score()
        precisions = {f"bleu_precision_{n}": float(p) for n, p in enumerate(score.precisions, start=1)}
        return {"bleu": float(score.score), **precisions}


@register("chrf")
class Chrf(SacrebleuStatsMetric):
    """Corpus chrF (0-100; chrF++ with word_order=2), equal to `sacrebleu.corpus_chrf` with the same options."""

    scale = "0–100"

    scorer_class = "CHRF"

    def __init__(
        self,
        references_column: str | None = None,
        char_order: NgramOrder = 6,
        word_order: Annotated[int, Field(ge=0, le=32)] = 0,
        beta: Annotated[int, Field(ge=0, le=1000)] = 2,
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


@register("ter")
class Ter(SacrebleuStatsMetric):
    """Corpus TER (0-100, lower is better), equal to `sacrebleu.corpus_ter` with the same options.

    sacrebleu's segment statistics are the fewest edits to any reference (an integer) and the average length of the
    references (a float): the state is the integer sum of the edits and the exact float sum of the lengths.
    """

    scale = "0–100+, lower is better"

    scorer_class = "TER"

    def __init__(
        self,
        references_column: str | None = None,
        normalized: bool = False,
        no_punct: bool = False,
        asian_support: bool = False,
        case_sensitive: bool = False,
    ) -> None:
        super().__init__(
            references_column,
            normalized=normalized,
            no_punct=no_punct,
            asian_support=asian_support,
            case_sensitive=case_sensitive,
        )

    def declare_states(self) -> None:
        self.add_state("edits")
        self.add_float_state("reference_length")

    def states_of(self, stats: list[list[Any]]) -> State:
        return {
            "edits": np.array([int(edits) for edits, _ in stats], dtype=np.int64),
            "reference_length": exact_sum.per_value([length for _, length in stats]),
        }

    def score(self) -> Any:
        return self.scorer._compute_score_from_stats([int(self.value("edits")), self.value("reference_length")])
