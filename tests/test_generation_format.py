"""Generated rows: ragged label rows in the batch and the spill, prompts and end-of-sequence cuts, and token metrics
that refuse rows which are not aligned. Fast: no model here (tests/test_generation.py runs real ones)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_manifest, split_batch, write_spill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spilleval.batch import SampleBatch
from spilleval.decode import decode_batch
from spilleval.generation import GenerationEval, generated_mask, left_padded_prompts
from spilleval.metrics import build_metrics
from spilleval.metrics.runner import MetricConfigError, MetricSuite
from spilleval.report.scores import exact_match, token_f1
from spilleval.spill import SpillReader


def ragged_batch(rng: np.random.Generator, n: int, vocab: int, *, equal: bool = False) -> SampleBatch:
    """Generated rows and reference rows of independent lengths (or equal lengths, still ragged)."""
    preds = [rng.integers(0, vocab, rng.integers(0, 9)).tolist() for _ in range(n)]
    labels = [p if equal else rng.integers(0, vocab, rng.integers(0, 9)).tolist() for p in preds]
    refs = [[f"ref {i}", f"other {i}"][: 1 + i % 2] for i in range(n)]
    return SampleBatch.from_rows(range(n), preds, labels, vocab_size=vocab, aligned=False,
                                 columns={"references": refs})


def rows_of(batch: SampleBatch) -> list[tuple[int, list[int], list[int]]]:
    return [(int(batch.sample_index[i]), p.tolist(), q.tolist()) for i, (p, q) in enumerate(batch.rows())]


@st.composite
def ragged_cases(draw):
    n = draw(st.integers(1, 30))
    vocab = draw(st.sampled_from([40, 70_000]))
    batch = ragged_batch(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), n, vocab,
                         equal=draw(st.booleans()))
    return batch, vocab, draw(st.integers(1, n)), draw(st.integers(1, n))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_cases())
def test_ragged_rows_round_trip_through_the_spill(case):
    batch, vocab, write_size, chunk_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        manifest = dataclasses.replace(make_manifest(vocab, dataset_length=len(batch)), task="generation")
        write_spill(Path(tmp) / "s", split_batch(batch, write_size), manifest, chunk_rows=chunk_rows)
        reader = SpillReader(Path(tmp) / "s")
        got = SampleBatch.concat(list(reader.iter_batches(3)))
        assert not got.aligned  # generated rows stay ragged, even where a row has its reference's length
        assert rows_of(got) == rows_of(batch)
        assert got.columns["references"] == batch.columns["references"]
        table = reader.table()
        assert table.column("pred_ids").to_pylist() == [p for _, p, _ in rows_of(batch)]
        assert table.column("label_ids").to_pylist() == [q for _, _, q in rows_of(batch)]
        last = len(batch) - 1
        assert rows_of(reader.get(last)) == [rows_of(batch)[last]]


def test_take_and_concat_keep_each_side_and_mix_with_aligned_batches():
    rng = np.random.default_rng(0)
    ragged = ragged_batch(rng, 6, 50)
    picked = ragged.take(np.array([4, 0, 5]))
    assert rows_of(picked) == [rows_of(ragged)[i] for i in (4, 0, 5)]
    aligned = SampleBatch.from_rows([6], [[1, 2]], [[1, 3]], vocab_size=50, columns={"references": [["x"]]})
    joined = SampleBatch.concat([ragged, aligned])
    assert not joined.aligned and rows_of(joined) == rows_of(ragged) + rows_of(aligned)
    with pytest.raises(ValueError, match="as many ids"):
        SampleBatch.from_rows([0], [[1, 2]], [[1]], vocab_size=50)


def test_decoding_reads_each_side_on_its_own(tokenizer):
    ids = lambda text: tokenizer.convert_tokens_to_ids(text.split())  # noqa: E731
    batch = SampleBatch.from_rows([0, 1], [ids("red cat </s>"), ids("two")], [ids("red </s>"), ids("one plus two")],
                                  vocab_size=len(tokenizer), aligned=False)
    decode_batch(batch, tokenizer)
    assert batch.pred_text == ["red cat", "two"] and batch.label_text == ["red", "one plus two"]


def test_token_metrics_refuse_generated_rows_clearly(tokenizer):
    batch = ragged_batch(np.random.default_rng(1), 3, 50, equal=True)
    for metric in build_metrics(["token_accuracy", "sequence_exact_match"]):
        with pytest.raises(ValueError, match="position by position.*text metrics"):
            metric.update(batch)
    with pytest.raises(MetricConfigError, match="token_accuracy.*position by position"):
        MetricSuite(["token_accuracy", "bleu"], tokenizer=tokenizer).check(has_logprob=False, task="generation")
    with pytest.raises(MetricConfigError, match="sequence_exact_match"):
        GenerationEval(["sequence_exact_match"]).check(tokenizer)
    with pytest.raises(MetricConfigError, match="log-probabilities"):
        GenerationEval(["nll"]).check(tokenizer)
    GenerationEval(["bleu", "rouge", "cider", "squad", "answer_macro_f1"]).check(tokenizer)


def test_metric_names_get_the_references_column():
    config = GenerationEval(["bleu", "answer_macro_f1", {"name": "rouge", "params": {}}], references_column="caps")
    assert config.metrics == [{"name": "bleu", "params": {"references_column": "caps"}}, "answer_macro_f1",
                              {"name": "rouge", "params": {}}]


def test_per_sample_scores_of_generated_rows():
    batch = SampleBatch.from_rows([0, 1, 2, 3], [[5, 6, 7], [5, 6], [], [9, 9]], [[5, 6, 7], [5, 6, 8], [], [9]],
                                  vocab_size=50, aligned=False)
    assert exact_match(batch).tolist() == [1.0, 0.0, 1.0, 0.0]
    # bag overlap: 2*common / (len pred + len label)
    np.testing.assert_allclose(token_f1(batch), [1.0, 4 / 5, 1.0, 2 / 3])


# ----------------------------------------------------------------------------------------------- prompts
def prompts_brute_force(input_ids, mask, labels, pad):
    rows = []
    for ids, m, lab in zip(input_ids.tolist(), mask.tolist(), labels.tolist()):
        kept = [(i, q) for i, q, a in zip(ids, lab, m) if a]
        first = next((k for k, (_, q) in enumerate(kept) if q != -100), len(kept))
        rows.append([i for i, _ in kept[:first]])
    width = max(map(len, rows))
    return [[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows]


@pytest.mark.parametrize("side", ["right", "left"])
def test_prompts_end_where_the_labels_start_and_are_left_padded(side):
    from spilleval.testing import pad_batch

    items = [
        {"input_ids": [2, 10, 11, 12, 20, 3], "labels": [-100, -100, -100, -100, 20, 3]},
        {"input_ids": [2, 13, 21, 3], "labels": [-100, -100, 21, 3]},
        {"input_ids": [2, 14, 15], "labels": [-100, -100, -100]},  # no answer: all prompt
    ]
    batch = pad_batch(items, side=side)
    prompt, mask = left_padded_prompts(batch["input_ids"], batch["attention_mask"], batch["labels"], pad_token_id=0)
    want_prompt, want_mask = prompts_brute_force(batch["input_ids"], batch["attention_mask"], batch["labels"], 0)
    assert prompt.tolist() == want_prompt and mask.tolist() == want_mask
    assert prompt.tolist() == [[2, 10, 11, 12], [0, 0, 2, 13], [0, 2, 14, 15]]


def test_generated_rows_end_at_the_first_end_of_sequence_id():
    sequences = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 5, 3, 0]])
    assert generated_mask(sequences, [3]).sum(1).tolist() == [2, 4, 1]
    assert generated_mask(sequences, [3], skip=1).sum(1).tolist() == [2, 4, 3]  # BART starts with </s>
    assert generated_mask(sequences, [8, 3]).sum(1).tolist() == [2, 4, 1]
    assert generated_mask(sequences, []).all()
