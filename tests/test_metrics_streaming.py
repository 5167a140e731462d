"""Streaming text metrics (bleu and its n-gram precisions, chrf, ter, rouge, wer, cer, mer, wil, wip, squad) against
their reference libraries on the whole data, and their invariance under batch size, sample order and split-and-merge
of states."""

from __future__ import annotations

import re
import string
from collections import Counter

import jiwer
import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from metric_data import Sample, batches_of, decoded_texts, run_streaming, text_samples
from rouge_score.rouge_scorer import RougeScorer

from spilleval.metrics import build_metric
from spilleval.metrics.inputs import MetricInputError
from spilleval.metrics.runner import MetricConfigError
from spilleval.metrics.translation import reference_streams

REFS = {"references_column": "references"}
TEXT_SPECS = [
    {"name": "bleu", "params": REFS},
    {"name": "chrf", "params": REFS},
    {"name": "chrf", "params": {**REFS, "word_order": 2}},
    {"name": "rouge", "params": REFS},
    {"name": "squad", "params": REFS},
    {"name": "ter", "params": REFS},
    {"name": "ter", "params": {**REFS, "normalized": True, "no_punct": True, "case_sensitive": True}},
    {"name": "wer", "params": {}},
    {"name": "cer", "params": {}},
    {"name": "mer", "params": {}},
    {"name": "wil", "params": {}},
    {"name": "wip", "params": {}},
]
# results from integer statistics must be bit-exact, not merely close
INTEGER_STATE = {"bleu", "chrf", "wer", "cer", "mer", "wil", "wip"}
BLEU_PRECISIONS = [f"bleu_precision_{n}" for n in range(1, 5)]


# --------------------------------------------------------------------------- the official SQuAD v1.1 script
def _official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
    prediction_tokens = _official_normalize_answer(prediction).split()
    ground_truth_tokens = _official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def _official_em(prediction, ground_truth):
    return _official_normalize_answer(prediction) == _official_normalize_answer(ground_truth)


def _official_squad(preds, refs):
    f1 = exact_match = total = 0
    for prediction, ground_truths in zip(preds, refs):
        total += 1
        exact_match += max(_official_em(prediction, gt) for gt in ground_truths)
        f1 += max(_official_f1(prediction, gt) for gt in ground_truths)
    return {"squad_exact_match": 100.0 * exact_match / total, "squad_f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------- references on the whole data
def reference_results(samples: list[Sample], word_order_chrf: bool = True) -> dict[str, float]:
    hyps, labels = decoded_texts(samples)
    refs = [[r for r in s.columns["references"] if r is not None] for s in samples]
    streams = reference_streams(refs)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    rouge = [scorer.score_multi(r, h) for h, r in zip(hyps, refs)]
    bleu = sacrebleu.corpus_bleu(hyps, streams)
    ter_options = {"normalized": True, "no_punct": True, "case_sensitive": True}
    return {
        "bleu": bleu.score,
        **dict(zip(BLEU_PRECISIONS, bleu.precisions)),
        "chrf": sacrebleu.corpus_chrf(hyps, streams).score,
        "chrf++": sacrebleu.metrics.CHRF(word_order=2).corpus_score(hyps, streams).score,
        **{t: float(np.mean([s[t].fmeasure for s in rouge])) for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
        **_official_squad(hyps, refs),
        "ter": sacrebleu.corpus_ter(hyps, streams).score,
        "ter-options": sacrebleu.metrics.TER(**ter_options).corpus_score(hyps, streams).score,
        "wer": jiwer.wer(labels, hyps),
        "cer": jiwer.cer(labels, hyps),
        "mer": jiwer.mer(labels, hyps),
        "wil": jiwer.wil(labels, hyps),
        "wip": jiwer.wip(labels, hyps),
    }


def computed(samples: list[Sample], batch_size: int) -> dict[str, float]:
    out = {}
    for spec in TEXT_SPECS:
        result = run_streaming([spec], batches_of(samples, batch_size)).compute_streaming()
        if spec["params"].get("word_order") == 2:
            result = {"chrf++": result["chrf"]}
        if spec["params"].get("normalized"):
            result = {"ter-options": result["ter"]}
        out.update(result)
    return out


def assert_parity(samples: list[Sample], batch_size: int = 5) -> None:
    got, want = computed(samples, batch_size), reference_results(samples)
    assert got.keys() == want.keys()
    for key in want:
        if key in INTEGER_STATE or key in BLEU_PRECISIONS or key == "squad_exact_match":
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


@settings(max_examples=25, deadline=None)
@given(text_samples(), st.integers(1, 9))
def test_text_metrics_equal_references_on_random_data(samples, batch_size):
    assert_parity(samples, batch_size)


def _s(pred, label, refs):
    return Sample(pred=pred.split(), label=label.split(), columns={"references": refs})


EDGE_CASES = {
    "single sample": [_s("red cat", "red cat", ["a red cat"])],
    "empty predictions": [_s("", "blue dog", ["blue dog", "the dog"]), _s("", "two", ["two"])],
    "empty reference strings": [_s("red", "red", [""]), _s("cat", "dog", ["", "dog"])],
    "unicode": [_s("café 日本語 😀", "café naïve", ["café 日本語", "ÉCOLE 😀 naïve"]),
                _s("Ünïcödé", "ÉCOLE", ["ünïcödé"])],
    "punctuation and articles": [_s("The cat end.", "a cat", ["the cat.", "An cat, end"]), _s("it's", "it's", ["its"])],
    "empty transcripts (jiwer's edge cases)": [_s("red cat", "", ["red"]), _s("", "", ["cat"])],
    "empty transcripts and predictions": [_s("", "", ["red"])],
    "variable number of references": [_s("one", "one", ["one"]), _s("two three", "two", ["two", "three", "two three"])],
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_text_metrics_equal_references_on_edge_cases(case):
    assert_parity(EDGE_CASES[case], batch_size=1)
    assert_parity(EDGE_CASES[case], batch_size=len(EDGE_CASES[case]))


@settings(max_examples=20, deadline=None)
@given(text_samples(min_size=2), st.integers(1, 6), st.integers(1, 6), st.randoms(use_true_random=False),
       st.data())
def test_invariant_to_batch_size_order_and_split_merge(samples, size_a, size_b, rnd, data):
    order = list(range(len(samples)))
    rnd.shuffle(order)
    split = data.draw(st.integers(1, len(samples) - 1))
    for spec in TEXT_SPECS:
        whole = run_streaming([spec], batches_of(samples, size_a))
        shuffled = run_streaming([spec], batches_of(samples, size_b, order))
        left = run_streaming([spec], batches_of(samples, size_a, range(split)))
        right = run_streaming([spec], batches_of(samples, size_b, range(split, len(samples))))
        left.merge(right.states())
        expected = whole.compute_streaming()
        for other in (shuffled, left):
            got = other.compute_streaming()
            if spec["name"] in INTEGER_STATE | {"ter"}:  # TER: an integer and an exact float sum
                assert got == expected
                for a, b in zip(other.states(), whole.states()):
                    assert all(np.array_equal(a[k], b[k]) for k in a)
            else:
                assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_references_column_names_the_dataset_column():
    samples = [_s("red", "blue", ["red", "green"]), _s("cat", "dog", ["dog"])]
    samples[0].columns["targets"] = "red"
    samples[1].columns["targets"] = "cat"
    hyps, _ = decoded_texts(samples)
    from_column = run_streaming([{"name": "wer", "params": {"references_column": "targets"}}], batches_of(samples, 2))
    assert from_column.compute_streaming()["wer"] == jiwer.wer(["red", "cat"], hyps) == 0.0


def test_missing_references_column_is_a_clear_error():
    metric = build_metric({"name": "bleu", "params": {"references_column": "refs"}})
    with pytest.raises(MetricConfigError, match="column 'refs'.*columns=\\{'refs'"):
        run_streaming([metric], batches_of([_s("a", "a", ["a"])], 1))


def test_sample_without_reference_is_a_clear_error():
    with pytest.raises(MetricInputError, match="sample 0 has no reference"):
        run_streaming([{"name": "squad", "params": REFS}], batches_of([_s("a", "a", [])], 1))


def test_wer_rejects_several_references():
    with pytest.raises(MetricInputError, match="exactly one reference"):
        run_streaming([{"name": "wer", "params": REFS}], batches_of([_s("a", "a", ["a", "b"])], 1))


ANSWER_PIECES = list(string.punctuation + string.ascii_letters + " \t\nÄéß–") + ["the", "a", "An", " an "]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ANSWER_PIECES), max_size=30).map("".join), st.text(max_size=20))
def test_squad_normalisation_and_f1_equal_the_official_script(text, other):
    """The faster normalisation (str.translate) and the once-per-string scoring give the script's values."""
    from spilleval.metrics.squad import exact_match_score, f1_score, normalize_answer

    assert normalize_answer(text) == _official_normalize_answer(text)
    assert normalize_answer(other) == _official_normalize_answer(other)
    assert f1_score(text, other) == _official_f1(text, other)
    assert exact_match_score(text, other) == _official_em(text, other)
