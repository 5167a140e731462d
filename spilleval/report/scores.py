"""Per-sample scores: one number per sample, for ranking (`worst`), plots (`report`), flips (`diff`) and `show`.

These are not the corpus metrics: the mean of per-sample token accuracy weighs every sample equally, while the
corpus `token_accuracy` weighs every token. They are defined once, here, so that every command scores a sample
the same way. Each scorer is vectorised over a `SampleBatch` and returns one float per sample (NaN: undefined).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..batch import SampleBatch, concat_ranges


class ScoreError(ValueError):
    """A per-sample score that does not exist, or that this spill cannot provide."""


@dataclass(frozen=True)
class SampleScore:
    name: str
    compute: Callable[[SampleBatch], np.ndarray]
    higher_is_better: bool
    description: str
    needs_logprob: bool = False
    needs_text: bool = False
    positional: bool = False  # compares ids position by position: meaningless on generated rows
    resolution: float = 1e-3  # histogram bin width in `report` (values are quantized to it)
    upper: float = 1.0  # values above are clipped into the last histogram bin

    def goodness(self, values: np.ndarray) -> np.ndarray:
        """Values oriented so that smaller is worse (what `worst` ranks by)."""
        return values if self.higher_is_better else -values


_SCORES: dict[str, SampleScore] = {}


def per_sample(name: str, *, higher_is_better: bool, description: str, **options) -> Callable:
    """Decorator: register a vectorised per-sample scorer under `name`."""

    def wrap(fn: Callable[[SampleBatch], np.ndarray]) -> Callable[[SampleBatch], np.ndarray]:
        _SCORES[name] = SampleScore(name, fn, higher_is_better, description, **options)
        return fn

    return wrap


def available_scores() -> dict[str, SampleScore]:
    return dict(_SCORES)


def resolve_scores(names: Iterable[str], *, has_logprob: bool, has_tokenizer: bool) -> list[SampleScore]:
    """Scorers by name, failing before any pass when one is unknown or cannot run on this spill."""
    out = []
    for name in names:
        score = _SCORES.get(name)
        if score is None:
            raise ScoreError(f"unknown per-sample score {name!r}. Known: {', '.join(_SCORES)}")
        if score.needs_logprob and not has_logprob:
            raise ScoreError(
                f"per-sample score {name!r} needs label log-probabilities, but this spill was written without "
                "them: evaluate with keep_logprob=True, or pick another score (token_accuracy, token_f1, ...)"
            )
        if score.needs_text and not has_tokenizer:
            raise ScoreError(f"per-sample score {name!r} decodes text, but the spill has no tokenizer/ directory")
        out.append(score)
    return out


def default_scores(*, has_logprob: bool) -> list[SampleScore]:
    """The scores every command shows: cheap (no decoding), and NLL when log-probs were kept."""
    names = ["token_accuracy", "exact_match", "token_f1"] + (["nll"] if has_logprob else []) + ["length"]
    return [_SCORES[n] for n in names]


def score_batch(batch: SampleBatch, scores: Iterable[SampleScore]) -> dict[str, np.ndarray]:
    return {s.name: np.asarray(s.compute(batch), dtype=np.float64) for s in scores}


# ----------------------------------------------------------------------------------------------- the scorers
def _row_of_token(batch: SampleBatch) -> np.ndarray:
    return np.repeat(np.arange(len(batch)), batch.lengths)


def _row_of_label(batch: SampleBatch) -> np.ndarray:
    return np.repeat(np.arange(len(batch)), batch.label_lengths)


def _compared_per_row(batch: SampleBatch) -> np.ndarray:
    """Positions compared per sample: the row length, or for generated rows the longer of the two sides (a
    missing or extra generated id is a wrong position)."""
    return batch.lengths if batch.aligned else np.maximum(batch.lengths, batch.label_lengths)


def _per_row_sum(batch: SampleBatch, values: np.ndarray) -> np.ndarray:
    """Sum of per-token values per sample (empty samples sum to 0)."""
    return np.bincount(_row_of_token(batch), weights=values, minlength=len(batch))


def _wrong_per_row(batch: SampleBatch) -> np.ndarray:
    if batch.aligned:
        return _per_row_sum(batch, (batch.pred_ids != batch.label_ids).astype(np.float64))
    return _compared_per_row(batch) - _ragged_matches_per_row(batch)


def _ragged_matches_per_row(batch: SampleBatch) -> np.ndarray:
    """Positions i < min(len(pred), len(label)) where pred[i] == label[i], per sample."""
    common = np.minimum(batch.lengths, batch.label_lengths)
    pred = batch.pred_ids[concat_ranges(batch.offsets[:-1], common)]
    label = batch.label_ids[concat_ranges(batch.label_row_offsets[:-1], common)]
    row = np.repeat(np.arange(len(batch)), common)
    return np.bincount(row, weights=(pred == label).astype(np.float64), minlength=len(batch))


@per_sample("token_accuracy", higher_is_better=True, positional=True,
            description="fraction of the sample's supervised tokens predicted right (1 for an empty sample)")
def token_accuracy(batch: SampleBatch) -> np.ndarray:
    lengths = _compared_per_row(batch)
    correct = lengths - _wrong_per_row(batch)
    return np.divide(correct, lengths, out=np.ones(len(batch)), where=lengths > 0)


@per_sample("exact_match", higher_is_better=True, resolution=1.0,
            description="1 when every supervised token is right, as the sequence_exact_match metric counts it")
def exact_match(batch: SampleBatch) -> np.ndarray:
    return (_wrong_per_row(batch) == 0).astype(np.float64)


@per_sample("token_f1", higher_is_better=True,
            description="F1 of the predicted and reference token-id bags (SQuAD-style overlap, on ids)")
def token_f1(batch: SampleBatch) -> np.ndarray:
    rows = _row_of_token(batch).astype(np.uint64)
    width = np.uint64(max(int(batch.pred_ids.max(initial=0)), int(batch.label_ids.max(initial=0))) + 1)
    pred_keys, pred_counts = np.unique(rows * width + batch.pred_ids.astype(np.uint64), return_counts=True)
    label_rows = rows if batch.aligned else _row_of_label(batch).astype(np.uint64)
    label_keys, label_counts = np.unique(label_rows * width + batch.label_ids.astype(np.uint64), return_counts=True)
    common, in_pred, in_label = np.intersect1d(pred_keys, label_keys, assume_unique=True, return_indices=True)
    overlap = np.minimum(pred_counts[in_pred], label_counts[in_label]).astype(np.float64)
    overlap_per_row = np.bincount((common // width).astype(np.int64), weights=overlap, minlength=len(batch))
    total = (batch.lengths + batch.label_lengths).astype(np.float64)
    return np.divide(2.0 * overlap_per_row, total, out=np.ones(len(batch)), where=total > 0)


@per_sample("nll", higher_is_better=False, needs_logprob=True, resolution=0.01, upper=100.0,
            description="mean negative log-likelihood of the sample's labels (needs keep_logprob=True)")
def nll(batch: SampleBatch) -> np.ndarray:
    if batch.label_logprob is None:
        raise ScoreError("per-sample score 'nll' needs label log-probabilities (evaluate with keep_logprob=True)")
    lengths = batch.lengths
    total = -_per_row_sum(batch, batch.label_logprob.astype(np.float64))
    return np.divide(total, lengths, out=np.full(len(batch), np.nan), where=lengths > 0)


@per_sample("length", higher_is_better=False, resolution=1.0, upper=float(2**20),
            description="supervised tokens in the sample (worst = longest)")
def length(batch: SampleBatch) -> np.ndarray:
    return batch.label_lengths.astype(np.float64)


@per_sample("text_exact_match", higher_is_better=True, needs_text=True, resolution=1.0,
            description="1 when the decoded prediction equals the decoded reference (skip_special_tokens=True)")
def text_exact_match(batch: SampleBatch) -> np.ndarray:
    if batch.pred_text is None or batch.label_text is None:
        raise ScoreError("per-sample score 'text_exact_match' needs decoded text")
    return np.array([p == r for p, r in zip(batch.pred_text, batch.label_text)], dtype=np.float64)
