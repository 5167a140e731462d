"""Every foundation metric equals its in-memory reference on the whole data, and is invariant to batch size,
chunk size, sample order and split-and-merge of states (hypothesis property tests)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_manifest, split_batch, write_spill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from spilleval.batch import SampleBatch
from spilleval.metrics import MetricSuite, available_metrics, compute_from_spill
from spilleval.metrics.runner import MetricConfigError

ALL = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]
STREAMING = ["token_accuracy", "sequence_exact_match", "text_match", "nll"]


# ----------------------------------------------------------------------------------------------- references
def reference_metrics(batch: SampleBatch, tokenizer) -> dict[str, float]:
    """Plain, obviously-right computations on the whole data held in memory."""
    preds = [p.tolist() for p, _ in batch.rows()]
    labels = [lab.tolist() for _, lab in batch.rows()]
    pred_text = [tokenizer.decode(p, skip_special_tokens=True) for p in preds]
    label_text = [tokenizer.decode(lab, skip_special_tokens=True) for lab in labels]
    flat_pred = [x for p in preds for x in p]
    flat_label = [x for lab in labels for x in lab]
    correct = sum(p == lab for p, lab in zip(flat_pred, flat_label))
    # the motivating example's closure, completed: character agreement over the label string's length
    bit_correct = sum(sum(1 for i, ch in enumerate(lab) if i < len(p) and p[i] == ch)
                      for p, lab in zip(pred_text, label_text))
    bit_total = sum(len(lab) for lab in label_text)
    nll = -math.fsum(batch.label_logprob.astype(np.float64).tolist()) / len(flat_label) if flat_label else -0.0
    return {
        "token_accuracy": correct / len(flat_label) if flat_label else 0.0,
        "sequence_exact_match": sum(p == lab for p, lab in zip(preds, labels)) / len(preds),
        "exact_match_accuracy": sum(p == lab for p, lab in zip(pred_text, label_text)) / len(preds),
        "bit_match_accuracy": bit_correct / bit_total if bit_total else 0.0,
        "nll": nll,
        "perplexity": math.exp(nll),
        "answer_macro_f1": float(f1_score(label_text, pred_text, average="macro")),
    }


# ----------------------------------------------------------------------------------------------- data
def qa_like_batch(rng: np.random.Generator, n: int, vocab: int, *, p_correct: float) -> SampleBatch:
    """Short answers over the tokenizer's vocabulary: ids 0-4 are special (skipped when decoding), a small
    answer set so that classes repeat, predictions right most of the time or one token off."""
    answers = [rng.integers(0, vocab, size=rng.integers(0, 4)).tolist() for _ in range(6)]
    labels = [answers[i] for i in rng.integers(0, len(answers), size=n)]
    preds = []
    for lab in labels:
        pred = list(lab)
        if pred and rng.random() > p_correct:
            pred[rng.integers(len(pred))] = int(rng.integers(0, vocab))
        preds.append(pred)
    logprobs = [(-rng.exponential(1.5, size=len(lab))).astype(np.float32).tolist() for lab in labels]
    return SampleBatch.from_rows(np.arange(n), preds, labels, vocab_size=vocab, logprobs=logprobs)


@st.composite
def metric_cases(draw):
    n = draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p_correct = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    return {
        "rng": rng,
        "n": n,
        "p_correct": p_correct,
        "batch_size": draw(st.integers(1, n)),
        "chunk_rows": draw(st.integers(1, n)),
        "read_batch": draw(st.integers(1, n + 5)),
        "order": draw(st.permutations(range(n))),
        "parts": draw(st.integers(1, min(n, 5))),
    }


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    """Exactly equal: same integers, same floats to the last bit (no tolerance)."""
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], f"{key}: {got[key]!r} != {want[key]!r}"


def assert_matches_reference(got: dict[str, float], want: dict[str, float]) -> None:
    """Exactly equal, except that the mean of the per-class F1 scores may be rounded better than numpy's
    pairwise sum in sklearn (the spill's sum is exact, so it can differ in the last bit): 1e-12 relative."""
    assert_same({k: v for k, v in got.items() if k != "answer_macro_f1"},
                {k: v for k, v in want.items() if k != "answer_macro_f1"})
    if "answer_macro_f1" in want:
        assert math.isclose(got["answer_macro_f1"], want["answer_macro_f1"], rel_tol=1e-12, abs_tol=0.0)


def spill_and_compute(directory: Path, batches, tokenizer, n: int, **compute_kwargs) -> dict[str, float]:
    manifest = make_manifest(len(tokenizer), has_logprob=True, metrics=ALL, dataset_length=n)
    chunk_rows = compute_kwargs.pop("chunk_rows")
    spill = write_spill(directory, batches, manifest, tokenizer=tokenizer, chunk_rows=chunk_rows)
    return compute_from_spill(spill, **compute_kwargs)


def live(batches, tokenizer, names=STREAMING) -> MetricSuite:
    suite = MetricSuite(names, tokenizer=tokenizer)
    for batch in batches:
        suite.update(batch)
    return suite


# ----------------------------------------------------------------------------------------------- properties
@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metric_cases())
def test_metrics_equal_reference_and_are_invariant(tokenizer, case):
    vocab = len(tokenizer)
    data = qa_like_batch(case["rng"], case["n"], vocab, p_correct=case["p_correct"])
    want = reference_metrics(data, tokenizer)
    shuffled = data.take(np.array(case["order"]))

    # live: batch size and order
    streaming = live(split_batch(shuffled, case["batch_size"]), tokenizer).compute_streaming()
    assert_same(streaming, {k: v for k, v in want.items() if k != "answer_macro_f1"})

    # split-and-merge: states of disjoint parts (other ranks) merged in any order
    cuts = np.sort(case["rng"].choice(np.arange(1, case["n"]), size=case["parts"] - 1, replace=False))
    parts = [live([p], tokenizer) for p in np.split(np.arange(case["n"]), cuts) for p in [shuffled.take(p)]]
    merged = MetricSuite(STREAMING, tokenizer=tokenizer)
    for part in reversed(parts):
        merged.merge(part.states())
    assert_same(merged.compute_streaming(), streaming)

    # offline from the spill, the corpus metric included: one spill in dataset order and one chunk, and one with
    # the drawn order, write batches, chunk size and read batch size must give the same bits
    with tempfile.TemporaryDirectory() as tmp:
        canonical = spill_and_compute(Path(tmp) / "canonical", [data], tokenizer, case["n"], chunk_rows=None)
        assert_matches_reference(canonical, want)
        drawn = spill_and_compute(Path(tmp) / "drawn", split_batch(shuffled, case["batch_size"]), tokenizer,
                                  case["n"], chunk_rows=case["chunk_rows"], batch_size=case["read_batch"])
        assert_same(drawn, canonical)
        corpus = compute_from_spill(Path(tmp) / "drawn",
                                    [{"name": "answer_macro_f1", "params": {"batch_size": case["read_batch"]}}])
        assert_same(corpus, {"answer_macro_f1": canonical["answer_macro_f1"]})


def test_answer_macro_f1_equals_sklearn_with_many_classes(tokenizer, tmp_path):
    """Many classes (hundreds of distinct answers), many chunks."""
    rng = np.random.default_rng(5)
    vocab = len(tokenizer)
    n = 400
    labels = [rng.integers(5, vocab, size=rng.integers(1, 3)).tolist() for _ in range(n)]
    preds = [lab if rng.random() < 0.6 else rng.integers(5, vocab, size=len(lab)).tolist() for lab in labels]
    data = SampleBatch.from_rows(np.arange(n), preds, labels, vocab_size=vocab)
    manifest = make_manifest(vocab, metrics=["answer_macro_f1"], dataset_length=n)
    spill = write_spill(tmp_path / "spill", split_batch(data, 37), manifest, tokenizer=tokenizer, chunk_rows=50)
    want = reference_metrics(SampleBatch.from_rows(np.arange(n), preds, labels, vocab_size=vocab,
                                                   logprobs=[[0.0] * len(x) for x in labels]), tokenizer)
    assert_matches_reference(compute_from_spill(spill), {"answer_macro_f1": want["answer_macro_f1"]})


def test_nll_is_exact_whatever_the_batching():
    """Compensated float sums: the same bits for any batch split, however the magnitudes mix."""
    rng = np.random.default_rng(6)
    logprob = np.concatenate([-rng.exponential(1.0, 3000), -rng.exponential(1e-6, 3000), [-50.0, -1e-30]])
    logprob = rng.permutation(logprob).astype(np.float32)
    data = SampleBatch(np.arange(len(logprob)), np.arange(len(logprob) + 1), np.zeros(len(logprob), np.uint16),
                       np.zeros(len(logprob), np.uint16), label_logprob=logprob)
    want = -math.fsum(logprob.astype(np.float64).tolist()) / len(logprob)
    for size in (1, 7, 1000, len(logprob)):
        got = live(split_batch(data, size), None, ["nll"]).compute_streaming()
        assert got["nll"] == want and got["perplexity"] == math.exp(want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0, max_size=40),
                min_size=1, max_size=6))
def test_exact_sums_of_many_rows_at_once_equal_each_rows_fsum(rows):
    """`exact_sum.add_rows` (a bootstrap's replicates of a float sum) is `add` of each row: math.fsum's value,
    whatever the magnitudes, subnormals, signs, NaN and infinities."""
    from spilleval.metrics import exact_sum

    width = max(len(row) for row in rows)
    values = np.zeros((len(rows), width))
    for r, row in enumerate(rows):
        values[r, : len(row)] = row
    start = np.stack([exact_sum.add(exact_sum.zeros(), [0.1 * r, -3e-310]) for r in range(len(rows))])
    got = exact_sum.add_rows(start, values)
    for r in range(len(rows)):
        assert np.array_equal(got[r], exact_sum.add(start[r], values[r]))
        finite = [x for x in rows[r] if math.isfinite(x)]
        if len(finite) == len(rows[r]):
            try:
                want = math.fsum([0.1 * r, -3e-310, *finite])
            except OverflowError:  # fsum's intermediate overflow; the superaccumulator has headroom
                continue
            assert exact_sum.value(got[r]) == want


# ----------------------------------------------------------------------------------------------- edge cases
def test_empty_rows_and_empty_data(tokenizer):
    data = SampleBatch.from_rows([0, 1, 2], [[], [7], []], [[], [8], []], vocab_size=len(tokenizer),
                                 logprobs=[[], [-0.5], []])
    got = live([data], tokenizer).compute_streaming()
    assert got["token_accuracy"] == 0.0 and got["sequence_exact_match"] == 2 / 3
    assert got["exact_match_accuracy"] == 2 / 3 and got["nll"] == 0.5
    nothing = live([], tokenizer).compute_streaming()
    assert nothing["token_accuracy"] == 0.0 and nothing["exact_match_accuracy"] == 0.0


def test_registry_names():
    names = available_metrics()
    for name in ALL:
        assert name in names


def test_text_metric_without_tokenizer_and_nll_without_logprobs_fail_early():
    with pytest.raises(MetricConfigError, match="need a tokenizer"):
        MetricSuite(["text_match"]).check(has_logprob=False)
    with pytest.raises(MetricConfigError, match="keep_logprob=True"):
        MetricSuite(["nll"]).check(has_logprob=False)
    with pytest.raises(KeyError, match="unknown metric bleu_typo. Did you mean bleu"):
        MetricSuite(["bleu_typo"])
