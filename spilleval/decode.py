"""Token ids -> text, batched, with the tokenizer that the spill stores."""

from __future__ import annotations

from typing import Any

from .batch import SampleBatch


class TokenizerMismatchError(ValueError):
    """The tokenizer cannot have produced the spilled ids (vocabulary sizes disagree)."""


def decode_batch(batch: SampleBatch, tokenizer: Any) -> SampleBatch:
    """Fill `pred_text` / `label_text` (skip_special_tokens=True) once per batch; later calls reuse them."""
    if batch.pred_text is None or batch.label_text is None:
        preds = [p.tolist() for p, _ in batch.rows()]
        labels = [lab.tolist() for _, lab in batch.rows()]
        batch.pred_text = tokenizer.batch_decode(preds, skip_special_tokens=True)
        batch.label_text = tokenizer.batch_decode(labels, skip_special_tokens=True)
    return batch


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int) -> None:
    """A tokenizer larger than the model's vocabulary cannot be the one that made these ids."""
    size = len(tokenizer)
    if size > vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer has {size} tokens but the spill's vocabulary has {vocab_size}: it is not the tokenizer "
            "of this model. Evaluate with the model's own tokenizer (tokenizer=...)."
        )
