"""ROUGE-1/2/L/Lsum: the mean over samples of rouge-score's per-sample F-measure, streaming.

Each sample is scored by `rouge_score.rouge_scorer.RougeScorer.score_multi` (with several references, the
reference of highest F per ROUGE type, as rouge-score does); the state is one compensated sum per type and the
sample count. This is the plain mean, not rouge-score's bootstrap `BootstrapAggregator`. rougeLsum splits
sentences on newlines, like rouge-score. rouge-score is an optional extra (`pip install 'spilleval[rouge]'`), imported
when the metric is built.
"""

from __future__ import annotations

from typing import Annotated, Any, Sequence

import numpy as np
from pydantic import Field

from ..batch import SampleBatch
from . import exact_sum
from .base import State, StreamingMetric, safe_div
from .deps import require
from .inputs import references_of
from .registry import register

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@register("rouge")
class Rouge(StreamingMetric):
    """Mean F-measure per ROUGE type (0-1), keys rouge1, rouge2, rougeL, rougeLsum."""

    outputs = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scale = "0–1"

    needs_text = True

    def __init__(
        self,
        references_column: str | None = None,
        rouge_types: Annotated[Sequence[str], Field(max_length=16)] = ROUGE_TYPES,
        use_stemmer: bool = False,
    ) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.rouge_types = list(rouge_types)
        self.sample_mean_outputs = tuple(self.rouge_types)  # mean F-measure over samples
        self.use_stemmer = use_stemmer
        rouge_scorer = require("rouge_score.rouge_scorer", self.name)  # an optional extra; imports nltk
        self.scorer = rouge_scorer.RougeScorer(self.rouge_types, use_stemmer=use_stemmer)
        for rouge_type in self.rouge_types:
            self.add_float_state(rouge_type)
        self.add_state("samples")

    def params(self) -> dict[str, Any]:
        return {
            "references_column": self.references_column,
            "rouge_types": self.rouge_types,
            "use_stemmer": self.use_stemmer,
        }

    def update(self, batch: SampleBatch) -> None:
        for rouge_type, fmeasures in self._fmeasures(batch).items():
            self.add_float(rouge_type, fmeasures)
        self.add("samples", len(batch))

    def sample_states(self, batch: SampleBatch) -> State:
        """Each sample scored once, its F-measures as exact-sum states (the default rescored sample by sample)."""
        states = {t: exact_sum.per_value(f) for t, f in self._fmeasures(batch).items()}
        return {**states, "samples": np.ones(len(batch), np.int64)}

    def _fmeasures(self, batch: SampleBatch) -> dict[str, np.ndarray]:
        assert batch.pred_text is not None
        refs = references_of(batch, self.references_column, self.name)
        scores = [self.scorer.score_multi(r, p) for p, r in zip(batch.pred_text, refs)]
        return {t: np.array([s[t].fmeasure for s in scores], dtype=np.float64) for t in self.rouge_types}

    def compute(self) -> dict[str, float]:
        samples = self.value("samples")
        return {t: safe_div(self.value(t), samples) for t in self.rouge_types}
