"""Perplexity in the units papers report: bits per byte, byte perplexity and word perplexity, streaming.

Token perplexity (`nll`) depends on the tokenizer; these do not. lm-evaluation-harness's definitions
(`loglikelihood_rolling` tasks, lm_eval/api/task.py and metrics.py), with LL the summed label log-probability of a
document, bytes its UTF-8 length and words `len(re.split(r"\\s+", text))`:
- `bits_per_byte` = -(sum LL / sum bytes) / ln 2;
- `byte_perplexity` = exp(-sum LL / sum bytes);
- `word_perplexity` = exp(-sum LL / sum words).
A document is a sample's supervised tokens: LL sums its label log-probs, and its text is the decoded reference
(the labels, skip_special_tokens=True), or a `references_column` string holding the raw text. Samples without a
supervised token have no document and are left out. The state is an exact float sum and two counts.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..batch import SampleBatch
from .base import StreamingMetric
from .inputs import MetricInputError, references_of
from .registry import register

WHITESPACE = re.compile(r"\s+")


def count_words(text: str) -> int:
    """lm-evaluation-harness's `count_words`: the pieces between runs of whitespace (an empty text is one)."""
    return len(WHITESPACE.split(text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@register("bits_per_byte")
class BitsPerByte(StreamingMetric):
    """bits_per_byte, byte_perplexity and word_perplexity of the supervised text; needs keep_logprob=True."""

    outputs = ("bits_per_byte", "byte_perplexity", "word_perplexity")
    scale = "bits/byte, lower is better"
    scales = {"byte_perplexity": "≥ 1, lower is better", "word_perplexity": "≥ 1, lower is better"}

    needs_logprob = True

    def __init__(self, references_column: str | None = None) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.needs_text = references_column is None
        self.add_float_state("loglikelihood")
        self.add_state("bytes")
        self.add_state("words")

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column}

    def update(self, batch: SampleBatch) -> None:
        if batch.label_logprob is None:
            raise MetricInputError(f"metric {self.name!r} needs label log-probabilities: evaluate with "
                                   "keep_logprob=True")
        if not len(batch):
            return
        texts = references_of(batch, self.references_column, self.name)
        if any(len(t) != 1 for t in texts):
            raise MetricInputError(
                f"metric {self.name!r} takes exactly one text per sample; column {self.references_column!r} holds "
                "several. Store the sample's reference text as one string."
            )
        documents = [t[0] for t, length in zip(texts, batch.lengths.tolist()) if length]
        self.add_float("loglikelihood", batch.label_logprob)  # samples without a supervised token add nothing
        self.add("bytes", sum(map(count_bytes, documents)))
        self.add("words", sum(map(count_words, documents)))

    def compute(self) -> dict[str, float]:
        loglikelihood = self.value("loglikelihood")
        per_byte = _weighted_mean(loglikelihood, int(self.value("bytes")))
        per_word = _weighted_mean(loglikelihood, int(self.value("words")))
        return {
            "bits_per_byte": -per_byte / math.log(2),
            "byte_perplexity": _exp(-per_byte),
            "word_perplexity": _exp(-per_word),
        }


def _weighted_mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # beyond ~709.78
        return math.inf
