"""accuracy / precision / recall / f1 over a declared label set against scikit-learn, and their invariance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metric_data import Sample, batches_of, decoded_texts, run_streaming, tokenizer
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from spilleval.metrics import build_metric
from spilleval.metrics.runner import MetricConfigError

NAMES = ("accuracy", "precision", "recall", "f1")
LABEL_POOL = ["red", "green", "blue", "yellow", "cat"]
OTHER_WORDS = ["dog", "two", "café", "😀"]


@st.composite
def classified(draw, min_size=1, max_size=30):
    """(labels, samples): true answers from the label set; predictions right, wrong, outside the set or empty."""
    labels = draw(st.lists(st.sampled_from(LABEL_POOL), min_size=1, max_size=4, unique=True))
    n = draw(st.integers(min_size, max_size))
    samples = []
    for _ in range(n):
        truth = draw(st.sampled_from(labels))
        one_word = st.sampled_from(labels + OTHER_WORDS).map(lambda w: [w])
        pred = draw(st.one_of(one_word, st.just([]), st.lists(st.sampled_from(labels), min_size=2, max_size=2)))
        samples.append(Sample(pred=pred, label=[truth, "</s>"], columns={"target": truth}))
    return labels, samples


def sklearn_results(y_true, y_pred, labels) -> dict[str, float]:
    out = {"accuracy": accuracy_score(y_true, y_pred)}
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        for average in ("micro", "macro", "weighted"):
            out[f"{name}_{average}"] = fn(y_true, y_pred, labels=labels, average=average, zero_division=0)
    return out


def computed(specs, samples, batch_size) -> dict[str, float]:
    return run_streaming(specs, batches_of(samples, batch_size)).compute_streaming()


def specs_for(labels, **params):
    return [{"name": n, "params": {"labels": labels, **params}} for n in NAMES]


@settings(max_examples=20, deadline=None)
@given(classified(), st.integers(1, 8))
def test_text_labels_equal_sklearn(data, batch_size):
    labels, samples = data
    preds, truths = decoded_texts(samples)
    want = sklearn_results([t.strip() for t in truths], [p.strip() for p in preds], labels)
    got = computed(specs_for(labels), samples, batch_size)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got["accuracy"] == want["accuracy"]  # a ratio of counts: bit-exact


@settings(max_examples=15, deadline=None)
@given(classified(), st.integers(1, 8))
def test_true_class_from_a_column_and_token_id_labels(data, batch_size):
    labels, samples = data
    preds, _ = decoded_texts(samples)
    truths = [s.columns["target"] for s in samples]
    want = sklearn_results(truths, [p.strip() for p in preds], labels)
    assert computed(specs_for(labels, target_column="target"), samples, batch_size) == pytest.approx(want, rel=1e-12)

    # token ids: the class is the first supervised token of the label / of the prediction
    ids = [int(i) for i in tokenizer().convert_tokens_to_ids(labels)]
    first = [int(i) for i in tokenizer().convert_tokens_to_ids([s.pred[0] if s.pred else "<pad>" for s in samples])]
    y_true = [int(tokenizer().convert_tokens_to_ids(s.label[0])) for s in samples]
    want = sklearn_results(y_true, first, ids)
    assert computed(specs_for(ids), samples, batch_size) == pytest.approx(want, rel=1e-12)


@settings(max_examples=15, deadline=None)
@given(classified(min_size=2), st.integers(1, 5), st.randoms(use_true_random=False), st.data())
def test_invariant_to_batching_order_and_merge(data, batch_size, rnd, draw):
    labels, samples = data
    order = list(range(len(samples)))
    rnd.shuffle(order)
    split = draw.draw(st.integers(1, len(samples) - 1))
    specs = specs_for(labels)
    whole = run_streaming(specs, batches_of(samples, batch_size))
    left = run_streaming(specs, batches_of(samples, 3, order[:split]))
    left.merge(run_streaming(specs, batches_of(samples, 1, order[split:])).states())
    assert left.compute_streaming() == whole.compute_streaming()
    for a, b in zip(left.states(), whole.states()):
        assert np.array_equal(a["confusion"], b["confusion"])


def test_one_class_only_and_a_single_sample():
    samples = [Sample(pred=["red"], label=["red"])]
    want = sklearn_results(["red"], ["red"], ["red"])
    assert computed(specs_for(["red"]), samples, 1) == want


def test_open_label_set_accuracy_compares_stripped_text():
    samples = [Sample(pred=["red", "cat"], label=["red", "cat"]), Sample(pred=[], label=["two"]),
               Sample(pred=["café"], label=["café", "</s>"])]
    preds, truths = decoded_texts(samples)
    got = computed(["accuracy"], samples, 2)
    assert got == {"accuracy": accuracy_score([t.strip() for t in truths], [p.strip() for p in preds])}


def test_label_set_is_required_for_precision_recall_f1():
    for name in ("precision", "recall", "f1"):
        with pytest.raises(MetricConfigError, match="declared label set.*answer_macro_f1"):
            build_metric(name)
    with pytest.raises(MetricConfigError, match="distinct"):
        build_metric({"name": "f1", "params": {"labels": ["a", "a"]}})


def test_true_class_outside_the_label_set_names_the_sample():
    samples = [Sample(pred=["red"], label=["red"]), Sample(pred=["red"], label=["dog"])]
    with pytest.raises(MetricConfigError, match="'dog' of sample 1 is not in the declared label set"):
        computed(specs_for(["red", "blue"]), samples, 2)


def test_recompute_by_name_reuses_the_recorded_label_set(tmp_path):
    from spilleval import Evaluator
    from spilleval.metrics import compute_from_spill

    samples = [Sample(pred=["red"], label=["red"]), Sample(pred=["blue"], label=["red"]),
               Sample(pred=[], label=["blue"])]
    evaluator = Evaluator(tmp_path / "run", metrics=specs_for(["red", "blue"]), tokenizer=tokenizer())
    for batch in batches_of(samples, 2):
        evaluator.add(batch, vocab_size=len(tokenizer()))
    live = evaluator.finalize()
    assert compute_from_spill(tmp_path / "run", ["f1"]) == {k: v for k, v in live.items() if k.startswith("f1_")}
