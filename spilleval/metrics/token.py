"""Metrics on token ids: no decoding needed, fully vectorised."""

from __future__ import annotations

import math

import numpy as np

from ..batch import SampleBatch
from . import exact_sum
from .base import State, StreamingMetric, safe_div
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

    def sample_states(self, batch: SampleBatch) -> State:
        return {"correct": _per_sample_sums(batch, batch.pred_ids == batch.label_ids), "total": batch.lengths}


@register("sequence_exact_match")
class SequenceExactMatch(StreamingMetric):
    """Fraction of samples whose every supervised token is right (a sample with none counts as right)."""

    sample_mean_outputs = ("sequence_exact_match",)
    scale = "0–1"

    needs_aligned_ids = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("matched")
        self.add_state("samples")

    def update(self, batch: SampleBatch) -> None:
        batch.require_aligned(f"metric {self.name!r}")
        # wrong tokens per row from a prefix sum: empty rows (anywhere, also trailing) count 0
        states = self.sample_states(batch)
        self.add("matched", int(states["matched"].sum()))
        self.add("samples", len(batch))

    def sample_states(self, batch: SampleBatch) -> State:
        wrong_per_sample = _per_sample_sums(batch, batch.pred_ids != batch.label_ids)  # empty rows count 0
        return {"matched": (wrong_per_sample == 0).astype(np.int64), "samples": np.ones(len(batch), np.int64)}

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

    def sample_states(self, batch: SampleBatch) -> State:
        if batch.label_logprob is None:
            raise ValueError("metric 'nll' needs label log-probabilities: evaluate with keep_logprob=True")
        return {"logprob_sum": _per_sample_exact_sums(batch, batch.label_logprob), "tokens": batch.lengths}

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
        self.add_float("nll_sum", self._sample_nll(batch))
        self.add("tokens", batch.num_tokens)

    def sample_states(self, batch: SampleBatch) -> State:
        return {"nll_sum": exact_sum.per_value(self._sample_nll(batch)), "tokens": batch.lengths}

    @staticmethod
    def _sample_nll(batch: SampleBatch) -> np.ndarray:
        if batch.sample_nll is None:
            raise ValueError(
                "metric 'loss' needs each sample's summed label log-probability (the spill's sample_nll column), "
                "which this evaluation did not compute: a spill written before spilleval stored it, or generated "
                "ids. Use 'nll' (keep_logprob=True) instead."
            )
        return batch.sample_nll

    def compute(self) -> dict[str, float]:
        return {"loss": safe_div(self.value("nll_sum"), self.value("tokens"))}


def _per_sample_sums(batch: SampleBatch, per_token: np.ndarray) -> np.ndarray:
    """Sum of a per-token quantity over each sample's tokens (empty samples: 0)."""
    before = np.zeros(len(per_token) + 1, dtype=np.int64)
    np.cumsum(per_token, out=before[1:])
    return before[batch.offsets[1:]] - before[batch.offsets[:-1]]


def _per_sample_exact_sums(batch: SampleBatch, per_token: np.ndarray, slice_tokens: int = 1 << 16) -> np.ndarray:
    """Each sample's exact float sum as an `exact_sum` state row, a slice of tokens at a time (a token's limbs
    take 73 int64s: bounded scratch memory however long the batch)."""
    sums = np.zeros((len(batch), exact_sum.STATE_SIZE), dtype=np.int64)
    row_of_token = np.repeat(np.arange(len(batch)), batch.lengths)
    for start in range(0, len(per_token), slice_tokens):
        rows = row_of_token[start : start + slice_tokens]
        limbs = exact_sum.per_value(per_token[start : start + slice_tokens])
        firsts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # rows are sorted: one segment per sample
        sums[rows[firsts]] += np.add.reduceat(limbs, firsts, axis=0)
    return exact_sum.normalise_rows(sums)
