"""Sample accounting: a loop that misses, repeats or invents samples gets an error naming it, never a subset's
numbers (a real tiny Llama trained briefly, the default chunk settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spilleval import Evaluator, SpillReader, compute_from_spill
from spilleval.accounting import IncompleteEvaluationError, checked_sample_index, format_ranges
from spilleval.spill import IncompleteSpillError, load_manifest
from spilleval.testing import encode_qa, pad_batch, qa_examples

METRICS = ["token_accuracy", "sequence_exact_match", "nll"]
N = 48


@pytest.fixture(scope="module")
def items(tokenizer):
    return [encode_qa(ex, tokenizer, index=i) for i, ex in enumerate(qa_examples(N, seed=40))]


def run(spill, model, tokenizer, batches, *, dataset_length=N, finalize=True, **kwargs):
    evaluator = Evaluator(spill, METRICS, tokenizer=tokenizer, dataset_length=dataset_length, **kwargs)
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        evaluator.update(logits, batch["labels"], sample_index=batch["index"])
    return evaluator.finalize() if finalize else evaluator


def loader(items, batch_size=8, drop_last=False):
    return list(torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=pad_batch, drop_last=drop_last))


def test_a_dropped_last_batch_is_refused_and_the_spill_kept_partial(trained_model, tokenizer, items, tmp_path):
    with pytest.raises(IncompleteEvaluationError, match=r"covered 40 of dataset_length=48 samples; missing: 40-47"):
        run(tmp_path / "spill", trained_model, tokenizer, loader(items, batch_size=10, drop_last=True))
    assert load_manifest(tmp_path / "spill").status == "partial"  # never "complete"
    with pytest.raises(IncompleteSpillError, match="finished without covering every sample.*allow_partial"):
        compute_from_spill(tmp_path / "spill")
    completeness = SpillReader(tmp_path / "spill", allow_partial=True).completeness()
    assert (completeness.committed, completeness.missing) == (40, [(40, 48)])
    # resume evaluates what is missing; the result equals one complete run
    resumed = run(tmp_path / "spill", trained_model, tokenizer, loader(items, batch_size=10), resume=True)
    complete = run(tmp_path / "complete", trained_model, tokenizer, loader(items))
    assert resumed == complete and 0.1 < complete["token_accuracy"] < 0.95
    assert load_manifest(tmp_path / "spill").status == "complete"


def test_indices_that_restart_in_every_batch_are_an_error(trained_model, tokenizer, items, tmp_path):
    batches = loader(items)
    for batch in batches:
        batch["index"] = torch.arange(len(batch["index"]))  # a collator's running count, per batch
    with pytest.raises(ValueError, match="sample index 0 was already evaluated.*restart at 0"):
        run(tmp_path / "spill", trained_model, tokenizer, batches)
    # a sampler that repeats samples on purpose: they count once, and what is missing is still named
    with pytest.raises(IncompleteEvaluationError, match="covered 8 of dataset_length=48 samples; missing: 8-47"):
        run(tmp_path / "repeats", trained_model, tokenizer, batches, allow_repeats=True)


def test_an_index_outside_the_dataset_fails_at_that_update(trained_model, tokenizer, items, tmp_path):
    evaluator = run(tmp_path / "spill", trained_model, tokenizer, loader(items)[:2], finalize=False)
    batch = loader(items)[2]
    logits = trained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    with pytest.raises(ValueError, match=r"sample_index 55 is outside the dataset: dataset_length=48 allows 0..47"):
        evaluator.update(logits, batch["labels"], sample_index=batch["index"] + 32)
    with pytest.raises(ValueError, match="integer dataset indices, got dtype float32"):
        evaluator.update(logits, batch["labels"], sample_index=batch["index"].float())
    with pytest.raises(ValueError, match=r"\(>= 0\), got -1"):
        evaluator.update(logits, batch["labels"], sample_index=batch["index"] - 17)
    with pytest.raises(ValueError, match="7 entries for a batch of 8"):
        evaluator.update(logits, batch["labels"], sample_index=batch["index"][:7])
    evaluator.update(logits, batch["labels"], sample_index=batch["index"])  # nothing was spilled by the errors
    evaluator.abort()
    assert SpillReader(tmp_path / "spill", allow_partial=True).completeness().committed == 24


def test_without_a_dataset_length_the_samples_seen_are_the_set(trained_model, tokenizer, items, tmp_path):
    results = run(tmp_path / "spill", trained_model, tokenizer, loader(items[:20]), dataset_length=None)
    assert load_manifest(tmp_path / "spill").status == "complete" and len(SpillReader(tmp_path / "spill")) == 20
    assert results == compute_from_spill(tmp_path / "spill")


def test_checked_sample_index_and_format_ranges():
    assert checked_sample_index(np.array([3, 1], dtype=np.uint8), 2, 4).dtype == np.int64
    with pytest.raises(ValueError, match="dtype bool"):
        checked_sample_index(np.array([True, False]), 2, None)
    assert format_ranges([(2, 4), (5, 6), (8, 12)]) == "2-3, 5, 8-11"
    assert format_ranges([(i, i + 1) for i in range(0, 30, 2)], limit=3) == "0, 2, 4 ..."
