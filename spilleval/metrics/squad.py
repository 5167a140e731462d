"""SQuAD v1.1 exact match and token F1, streaming.

`normalize_answer`, `f1_score` and `exact_match_score` give the official SQuAD v1.1 evaluation script's results
(evaluate-v1.1.py; the tests hold them to a verbatim copy); a sample scores the maximum over its references, as in
the script. The state is the sum of exact matches, the exact sum of F1 and the sample count; the results are in
percent, like the script.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ..batch import SampleBatch
from . import exact_sum
from .base import State, StreamingMetric, safe_div
from .inputs import references_of
from .registry import register


_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace: the script's steps in its order, its
    per-character punctuation filter done by `str.translate` (the same characters removed, 10x faster)."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCTUATION)).split())


def f1_score(prediction: str, ground_truth: str) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    """The script's F1 of normalised tokens, its arithmetic unchanged."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def best_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's exact match (0/1) and F1, the best over its references, as the script scores them: each
    string normalised once (the script normalises once per pair and score)."""
    exact, f1 = [], []
    for prediction, refs in zip(predictions, references):
        normal = normalize_answer(prediction)
        normal_refs = [normalize_answer(r) for r in refs]
        exact.append(max(normal == r for r in normal_refs))
        f1.append(max(token_f1(normal.split(), r.split()) for r in normal_refs))
    return np.array(exact, dtype=np.int64), np.array(f1, dtype=np.float64)


@register("squad")
class Squad(StreamingMetric):
    """squad_exact_match and squad_f1 (0-100), max over each sample's references."""

    sample_mean_outputs = ("squad_exact_match", "squad_f1")
    outputs = ("squad_exact_match", "squad_f1")
    scale = "0–100"

    needs_text = True

    def __init__(self, references_column: str | None = None) -> None:
        super().__init__()
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.add_state("exact_match")
        self.add_float_state("f1")
        self.add_state("samples")

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column}

    def update(self, batch: SampleBatch) -> None:
        exact, f1 = self._scores(batch)
        self.add("exact_match", int(exact.sum()))
        self.add_float("f1", f1)
        self.add("samples", len(batch))

    def sample_states(self, batch: SampleBatch) -> State:
        """Each sample scored once (the default rescored sample by sample)."""
        exact, f1 = self._scores(batch)
        return {"exact_match": exact, "f1": exact_sum.per_value(f1), "samples": np.ones(len(batch), np.int64)}

    def _scores(self, batch: SampleBatch) -> tuple[np.ndarray, np.ndarray]:
        assert batch.pred_text is not None
        return best_scores(batch.pred_text, references_of(batch, self.references_column, self.name))

    def compute(self) -> dict[str, float]:
        samples = self.value("samples")
        return {
            "squad_exact_match": safe_div(100.0 * self.value("exact_match"), samples),
            "squad_f1": safe_div(100.0 * self.value("f1"), samples),
        }
