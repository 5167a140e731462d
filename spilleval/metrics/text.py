"""Metrics on decoded text (the spill's tokenizer, skip_special_tokens=True)."""

from __future__ import annotations

from ..batch import SampleBatch
from .base import StreamingMetric, safe_div
from .registry import register


def char_agreement(pred: str, label: str) -> int:
    """Positions i < len(label) where pred[i] == label[i]."""
    return sum(1 for p, lab in zip(pred, label) if p == lab)


@register("text_match")
class TextMatch(StreamingMetric):
    """Decoded-text agreement: exact_match_accuracy (whole string) and bit_match_accuracy (character by position).

    The streaming closure of the motivating example, built in, under its key names (so existing charts continue):
    - exact_match_accuracy: decoded prediction == decoded label (`skip_special_tokens=True`). Not the same number
      as `sequence_exact_match`, which compares token ids: two id sequences can decode to the same text (special
      tokens, another tokenization of the same string), and it has no tokenizer to need.
    - bit_match_accuracy: despite its name, no bits are compared: the characters of the decoded prediction that
      equal the decoded label's character at the same position, over the labels' length, summed over the corpus.
    (The closure's `num_samples` is not a metric to chart: the sample count is in results.json's provenance,
    `dataset.samples`.)
    """

    sample_mean_outputs = ("exact_match_accuracy",)
    outputs = ("bit_match_accuracy", "exact_match_accuracy")
    scale = "0–1"

    needs_text = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("bit_correct")
        self.add_state("bit_total")
        self.add_state("exact_match")
        self.add_state("samples")

    def update(self, batch: SampleBatch) -> None:
        assert batch.pred_text is not None and batch.label_text is not None
        for pred, label in zip(batch.pred_text, batch.label_text):
            self.add("bit_correct", char_agreement(pred, label))
            self.add("bit_total", len(label))
            self.add("exact_match", int(pred == label))
        self.add("samples", len(batch))

    def compute(self) -> dict[str, float]:
        return {
            "bit_match_accuracy": safe_div(self.value("bit_correct"), self.value("bit_total")),
            "exact_match_accuracy": safe_div(self.value("exact_match"), self.value("samples")),
        }
