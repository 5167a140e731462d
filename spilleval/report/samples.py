"""What a person reads about one sample: its decoded tokens, which positions are wrong, and its per-sample scores.

The token-level diff is positional: position i is wrong when pred_ids[i] != label_ids[i]. Teacher-forced
predictions are aligned with the labels; a generated row may be shorter or longer than its reference, and a
position only one side has is wrong. A generated sample is therefore shown as text instead: the prediction and
every reference of the item (the spill's references column), each marked when the prediction matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..batch import SampleBatch
from ..spill import SpillReader
from .scan import RankedSample, iter_scored
from .scores import SampleScore, exact_match, score_batch

DEFAULT_MAX_TOKENS = 256  # tokens shown per sample; scores always cover the whole sample


@dataclass
class SampleView:
    sample_index: int
    scores: dict[str, float]
    prediction: str  # decoded with skip_special_tokens=True, as the text metrics see it
    reference: str
    pred_pieces: list[str]  # one decoded piece per shown prediction id, with its leading space
    label_pieces: list[str]  # the same for the reference ids
    wrong: list[int]  # shown positions where the prediction differs from the label (or one side has none)
    pred_length: int  # ids in the whole prediction row
    length: int  # supervised (reference) tokens in the sample
    wrong_total: int  # wrong positions in the whole sample
    columns: dict[str, Any]
    references: list["ReferenceView"] | None = None  # generated samples: every reference, matched or not

    @property
    def truncated(self) -> bool:
        return len(self.label_pieces) < self.length or len(self.pred_pieces) < self.pred_length

    def side(self, which: str) -> Iterator[tuple[str, bool, str | None]]:
        """(piece, right, the other side's piece at that position or None) for the "reference" or "prediction"."""
        pieces, other = (self.label_pieces, self.pred_pieces) if which == "reference" else \
            (self.pred_pieces, self.label_pieces)
        wrong = set(self.wrong)
        for i, piece in enumerate(pieces):
            yield piece, i not in wrong, other[i] if i < len(other) else None

    def hidden(self, which: str) -> int:
        """Ids of that side not shown (beyond --max-tokens)."""
        return (self.length - len(self.label_pieces)) if which == "reference" else \
            (self.pred_length - len(self.pred_pieces))

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_index": self.sample_index,
            "scores": self.scores,
            "prediction": self.prediction,
            "reference": self.reference,
            "prediction_tokens": self.pred_pieces,
            "reference_tokens": self.label_pieces,
            "wrong_positions": self.wrong,
            "wrong_tokens": self.wrong_total,
            "length": self.length,
            "truncated": self.truncated,
            "columns": self.columns,
            **({"references": [r.to_json() for r in self.references]} if self.references is not None else {}),
        }


@dataclass
class ReferenceView:
    text: str
    match: str  # "exact" (equal but for surrounding spaces), "normalized" (equal after SQuAD normalisation) or ""

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "match": self.match or None}


def reference_views(prediction: str, references: list[str]) -> list[ReferenceView]:
    """Each reference with whether the prediction matches it (what answer_exact_match and squad_exact_match
    count)."""
    from ..metrics.squad import exact_match_score
    from .text_scores import answer_matches

    exact = answer_matches(prediction, references)
    return [ReferenceView(r, "exact" if same else "normalized" if exact_match_score(prediction, r) else "")
            for r, same in zip(references, exact)]


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded string (its leading space included), special tokens kept.

    Decodes every prefix once (one batched call) and takes the differences, which is exact for any tokenizer
    whose decoding of a prefix is a prefix of the decoding; elsewhere (e.g. a split UTF-8 byte) the token is
    decoded alone.
    """
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f" {i}" if k else str(i) for k, i in enumerate(ids)]
    prefixes = tokenizer.batch_decode(
        [ids[: k + 1] for k in range(len(ids))], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    pieces, previous = [], ""
    for token, text in zip(ids, prefixes):
        if text.startswith(previous):
            pieces.append(text[len(previous):])
        else:
            pieces.append(tokenizer.decode([token], skip_special_tokens=False))
        previous = text
    return pieces


def sample_views(
    batch: SampleBatch,
    scores: dict[str, np.ndarray],
    tokenizer: Any,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    references_column: str | None = None,
    text_view: bool = False,
) -> list[SampleView]:
    """A view per row of `batch` (already chosen: this decodes, so call it on the few samples shown). With
    `text_view` (a generation spill, see `view_options`) each sample gets its references: the `references_column`
    of the spill, else the decoded label."""
    views = []
    for row in range(len(batch)):
        pred, label = batch.row(row)
        shown = slice(0, max_tokens)
        wrong_mask = _wrong_positions(pred, label)
        prediction, reference = _decode(tokenizer, pred), _decode(tokenizer, label)
        columns = {name: values[row] for name, values in batch.columns.items()}
        references = None
        if text_view:
            refs = _as_list(columns.pop(references_column)) if references_column in columns else [reference]
            references = reference_views(prediction, refs)
        views.append(
            SampleView(
                sample_index=int(batch.sample_index[row]),
                scores={name: float(values[row]) for name, values in scores.items()},
                prediction=prediction,
                reference=reference,
                pred_pieces=token_pieces(tokenizer, pred[shown]),
                label_pieces=token_pieces(tokenizer, label[shown]),
                wrong=np.flatnonzero(wrong_mask[shown]).tolist(),
                pred_length=len(pred),
                length=len(label),
                wrong_total=int(wrong_mask.sum()),
                columns=columns,
                references=references,
            )
        )
    return views


def view_options(reader: SpillReader) -> dict[str, Any]:
    """How `sample_views` shows this spill's samples: generated text with its references on a generation spill."""
    from ..metrics.runner import GENERATION_TASK
    from .text_scores import references_column

    generation = reader.manifest.task == GENERATION_TASK
    return {"text_view": generation, "references_column": references_column(reader) if generation else None}


def _as_list(value: Any) -> list[str]:
    """A references cell (one string, or a list with None padding) as the list of its strings."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v is not None]


def _wrong_positions(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Boolean per position of the longer side: the ids differ, or only one side has the position."""
    common = min(len(pred), len(label))
    wrong = np.ones(max(len(pred), len(label)), dtype=bool)
    wrong[:common] = pred[:common] != label[:common]
    return wrong


def ranked_views(ranked: Sequence[RankedSample], tokenizer: Any, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 **options: Any) -> list[SampleView]:
    """Views of `WorstSamples.result()`, in its order, with the scores computed during the pass."""
    if not ranked:
        return []
    rows = SampleBatch.concat([r.row for r in ranked])
    scores = {name: np.array([r.scores[name] for r in ranked]) for name in ranked[0].scores}
    return sample_views(rows, scores, tokenizer, max_tokens=max_tokens, **options)


def _decode(tokenizer: Any, ids: np.ndarray) -> str:
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def first_samples(
    reader: SpillReader,
    scores: list[SampleScore],
    n: int,
    *,
    only_wrong: bool = False,
    progress_bar: bool = False,
) -> tuple[SampleBatch | None, dict[str, np.ndarray]]:
    """The first n samples in stored order (only those not exactly right with only_wrong); stops reading early."""
    picked: list[SampleBatch] = []
    picked_scores: list[dict[str, np.ndarray]] = []
    count = 0
    for batch, values in iter_scored(reader, scores, progress_bar=progress_bar, desc="finding samples"):
        rows = np.flatnonzero(exact_match(batch) < 1) if only_wrong else np.arange(len(batch))
        rows = rows[: n - count]
        if len(rows):
            picked.append(batch.take(rows))
            picked_scores.append({name: v[rows] for name, v in values.items()})
            count += len(rows)
        if count >= n:
            break
    if not picked:
        return None, {}
    return SampleBatch.concat(picked), {name: np.concatenate([p[name] for p in picked_scores]) for name in values}


def samples_by_index(
    reader: SpillReader, indices: Sequence[int], scores: list[SampleScore], *, only_wrong: bool = False
) -> tuple[SampleBatch, dict[str, np.ndarray]]:
    """The samples with these dataset indices, in the order given (a KeyError names a missing one)."""
    chosen = SampleBatch.concat([reader.get(int(i)) for i in indices])
    if only_wrong:
        chosen = chosen.take(np.flatnonzero(exact_match(chosen) < 1))
    if any(s.needs_text for s in scores):
        reader.decode(chosen)
    return chosen, score_batch(chosen, scores)
