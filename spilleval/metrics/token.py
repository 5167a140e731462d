"""Metrics on token ids: no decoding needed, fully vectorised."""

from __future__ import annotations

import math

import numpy as np

from ..batch import SampleBatch
from .base import StreamingMetric, safe_div
from .registry import register


@register("token_accuracy")
class TokenAccuracy(StreamingMetric):
    """Fraction of supervised tokens whose argmax equals the label."""

    scale = "0–1"

    needs_aligned_ids = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct")
        self.add_state("total")

    def update(self, batch: SampleBatch) -> None:
        batch.require_aligned(f"metric {self.name!r}")
        self.add("correct", int(np.count_nonzero(batch.pred_ids == batch.label_ids)))
        self.add("total", batch.num_tokens)

    def compute(self) -> dict[str, float]:
        return {"token_accuracy": safe_div(self.value("correct"), self.value("total"))}


@register("sequence_exact_match")
class SequenceExactMatch(StreamingMetric):
    """Fraction of samples whose every supervised token is right (a sample with none counts as right)."""

    scale = "0–1"

    needs_aligned_ids = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("matched")
        self.add_state("samples")

    def update(self, batch: SampleBatch) -> None:
        batch.require_aligned(f"metric {self.name!r}")
        # wrong tokens per row from a prefix sum: empty rows (anywhere, also trailing) count 0
        wrong_before = np.zeros(len(batch.pred_ids) + 1, dtype=np.int64)
        np.cumsum(batch.pred_ids != batch.label_ids, out=wrong_before[1:])
        wrong_per_sample = wrong_before[batch.offsets[1:]] - wrong_before[batch.offsets[:-1]]
        self.add("matched", int(np.count_nonzero(wrong_per_sample == 0)))
        self.add("samples", len(batch))

    def compute(self) -> dict[str, float]:
        return {"sequence_exact_match": safe_div(self.value("matched"), self.value("samples"))}


@register("nll")
class NegativeLogLikelihood(StreamingMetric):
    """Mean negative log-likelihood per supervised token and its perplexity (needs keep_logprob=True)."""

    outputs = ("nll", "perplexity")
    scale = "nats/token, lower is better"
    scales = {"perplexity": "≥ 1, lower is better"}

    needs_logprob = True

    def __init__(self) -> None:
        super().__init__()
        self.add_float_state("logprob_sum")
        self.add_state("tokens")

    def update(self, batch: SampleBatch) -> None:
        if batch.label_logprob is None:
            raise ValueError("metric 'nll' needs label log-probabilities: evaluate with keep_logprob=True")
        self.add_float("logprob_sum", batch.label_logprob)
        self.add("tokens", batch.num_tokens)

    def compute(self) -> dict[str, float]:
        nll = -safe_div(self.value("logprob_sum"), self.value("tokens"))
        return {"nll": nll, "perplexity": math.exp(nll) if nll < 700 else math.inf}


@register("loss")
class TokenWeightedLoss(StreamingMetric):
    """The eval loss `SpillingTrainer` reports as `eval_loss`: the cross-entropy of the supervised tokens, averaged
    over tokens (not over batches), from each sample's summed label log-probability.

    It is the `nll` metric's number without storing a log-probability per token (8 bytes per sample instead of 4
    per token), so the spill can always carry it. Token-weighted and exact, it does not depend on the batch size,
    the padding of the last batch or the world size, where transformers' own `eval_loss` (a mean of per-batch means,
    scaled by the number of processes under DDP with `average_tokens_across_devices`) does.
    """

    scale = "nats/token, lower is better"

    needs_sample_nll = True

    def __init__(self) -> None:
        super().__init__()
        self.add_float_state("nll_sum")
        self.add_state("tokens")

    def update(self, batch: SampleBatch) -> None:
        if batch.sample_nll is None:
            raise ValueError(
                "metric 'loss' needs each sample's summed label log-probability (the spill's sample_nll column), "
                "which this evaluation did not compute: a spill written before spilleval stored it, or generated "
                "ids. Use 'nll' (keep_logprob=True) instead."
            )
        self.add_float("nll_sum", batch.sample_nll)
        self.add("tokens", batch.num_tokens)

    def compute(self) -> dict[str, float]:
        return {"loss": safe_div(self.value("nll_sum"), self.value("tokens"))}
