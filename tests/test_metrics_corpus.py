"""Corpus metrics (cider, auroc, average_precision, ece, loss_percentiles, distinct_n) over real spills against
their references on the whole data in memory, invariance under chunk size, batch size and sample order, and the
whole library live (Evaluator) vs offline (compute_from_spill)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metric_data import VOCAB_WORDS, Sample, decoded_texts, tokenizer, write_samples
from pycocoevalcap.cider.cider import Cider
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from spilleval import Evaluator
from spilleval.metrics import build_metric, compute_from_spill
from spilleval.metrics.distributions import linear_percentile, percentile_ranks, sample_nll
from spilleval.metrics.inputs import MetricInputError
from spilleval.metrics.runner import MetricConfigError

# probabilities from a small set, so that scores tie often; each row sums to one
PROB_ROWS = {2: [(0.5, 0.5), (0.25, 0.75), (0.75, 0.25), (0.1, 0.9), (1.0, 0.0)],
             3: list(set(itertools.permutations((0.5, 0.25, 0.25)))) + [(0.2, 0.3, 0.5), (0.6, 0.3, 0.1)]}
SCORE_SPECS = [{"name": n, "params": {"target_column": "target"}} for n in ("auroc", "average_precision", "ece")]
caption_words = st.lists(st.sampled_from(VOCAB_WORDS[:30] + ["Red", "CAT", "café", "日本語"]), max_size=7)


@st.composite
def corpus_samples(draw, min_size=1, max_size=30, classes=None):
    """Samples with references, class scores (ties), a target class column and label log-probs (ties)."""
    n = draw(st.integers(min_size, max_size))
    c = classes or draw(st.sampled_from([2, 3]))
    out = []
    for _ in range(n):
        pred, label = draw(caption_words), draw(caption_words)
        refs = draw(st.lists(caption_words.map(" ".join), min_size=1, max_size=3))
        scores = np.array(draw(st.sampled_from(PROB_ROWS[c])), dtype=np.float32)
        width = max(len(pred), len(label))
        logprob = draw(st.lists(st.sampled_from([-0.5, -1.25, -3.0, -0.0625]) | st.floats(-20, 0, width=32),
                                min_size=width, max_size=width))
        out.append(Sample(pred=pred, label=label, columns={"references": refs, "target": draw(st.integers(0, c - 1))},
                          arrays={"class_scores": scores}, logprob=logprob))
    return out


def seeded_corpus(n: int, seed: int) -> list[Sample]:
    """A fixed random data set: 3 classes, the prediction's first word a colour (so classes are predicted)."""
    rng = np.random.default_rng(seed)
    pool = VOCAB_WORDS[:30] + ["café", "日本語"]
    words = lambda k: [str(w) for w in rng.choice(pool, k)]  # noqa: E731
    out = []
    for i in range(n):
        target = int(rng.integers(0, 3))
        pred = [["red", "green", "blue", "cat"][i % 4]] + words(rng.integers(0, 5))
        label = words(rng.integers(0, 6))
        refs = [" ".join(words(rng.integers(0, 6))) for _ in range(rng.integers(1, 4))]
        scores = np.float32(PROB_ROWS[3][rng.integers(0, len(PROB_ROWS[3]))])
        logprob = np.round(-rng.exponential(2.0, max(len(pred), len(label))), 1).tolist()
        out.append(Sample(pred=pred, label=label, arrays={"class_scores": scores}, logprob=logprob,
                          columns={"references": refs, "target": target, "colour": ["red", "green", "blue"][target],
                                   "transcript": refs[0], "question_id": i // 3, "choice_target": i % 3 == 0}))
    return out


# ------------------------------------------------------------------------------------------- references
def reference_cider(samples) -> float:
    """pycocoevalcap's Cider on the same lowercased, whitespace-tokenized captions (it cannot score a corpus whose
    references hold no word at all; every score is 0 then)."""
    if not any(r.split() for s in samples for r in s.columns["references"]):
        return 0.0
    hyps, _ = decoded_texts(samples)
    gts = {i: [r.lower() for r in s.columns["references"]] for i, s in enumerate(samples)}
    res = {i: [h.lower()] for i, h in enumerate(hyps)}
    return float(Cider().compute_score(gts, res)[0])


def reference_scores(samples) -> dict[str, float]:
    y = np.array([s.columns["target"] for s in samples])
    p = np.stack([s.arrays["class_scores"] for s in samples]).astype(np.float64)
    with warnings.catch_warnings():  # sklearn warns where AUROC is undefined (one class only) and returns NaN
        warnings.simplefilter("ignore")
        if p.shape[1] == 2:
            auroc = roc_auc_score(y, p[:, 1]) if len(set(y)) == 2 else math.nan
            ap = average_precision_score(y == 1, p[:, 1])
        else:
            auroc = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=range(p.shape[1]))
            ap = average_precision_score(label_binarize(y, classes=range(p.shape[1])), p, average="macro")
    return {"auroc": auroc, "average_precision": ap, "ece": reference_ece(p, y)}


def reference_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """The textbook equal-width binned ECE (Guo et al. 2017), in float64 on the whole array."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    accurate = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.mean() > 0:
            ece += abs(accurate[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
    return ece


def reference_distinct(samples, n) -> float:
    hyps, _ = decoded_texts(samples)
    grams = [tuple(w[i : i + n]) for w in (h.split() for h in hyps) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reference_losses(samples) -> np.ndarray:
    rows = [np.asarray(s.logprob, dtype=np.float32).astype(np.float64) for s in samples]
    return np.array([-math.fsum(r.tolist()) / len(r) for r in rows if len(r)])


def assert_close(got: dict, want: dict, rel: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-12), key


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(corpus_samples(max_size=40), st.integers(2, 12), st.integers(1, 9), st.lists(st.floats(0, 100), max_size=3))
def test_corpus_metrics_equal_references_on_random_data(tmp_path_factory, samples, chunk_rows, batch_size, extra_q):
    """One spill per example, every corpus metric against its reference on the whole data in memory."""
    spill = write_samples(tmp_path_factory.mktemp("spill"), samples, chunk_rows=chunk_rows)
    q = [50, 90, 99, *extra_q]
    specs = [
        {"name": "cider", "params": {"references_column": "references", "batch_size": batch_size}},
        *[{**s, "params": {**s["params"], "batch_size": batch_size}} for s in SCORE_SPECS],
        {"name": "loss_percentiles", "params": {"percentiles": q, "batch_size": batch_size}},
        {"name": "distinct_n", "params": {"orders": [1, 2, 3], "batch_size": batch_size}},
    ]
    got = compute_from_spill(spill, specs)
    assert got["cider"] == pytest.approx(reference_cider(samples), rel=1e-9, abs=1e-12)
    assert_close({k: got[k] for k in ("auroc", "average_precision", "ece")}, reference_scores(samples))
    assert {k: got[k] for k in got if k.startswith("distinct")} == {
        f"distinct_{n}": reference_distinct(samples, n) for n in (1, 2, 3)
    }
    losses = reference_losses(samples)
    percentiles = [got[f"loss_p{float(x):g}"] for x in q]
    if len(losses):
        assert percentiles == np.percentile(losses, q).tolist()  # to the bit
    else:
        assert all(math.isnan(v) for v in percentiles)


@pytest.mark.parametrize("workers", [1, 2])
def test_distinct_n_takes_sizes_in_any_order_with_repeats_and_gaps(tmp_path, workers):
    """Every size is a column of one table: sizes 3 and 1 (3 asked twice, 2 not at all) each equal the reference
    (a repeated size made two tables of one name before, and failed)."""
    samples = seeded_corpus(40, seed=5)
    spill = write_samples(tmp_path, samples, chunk_rows=7)
    got = compute_from_spill(spill, [{"name": "distinct_n", "params": {"orders": [3, 1, 3], "batch_size": 5}}],
                             workers=workers)
    assert got == {f"distinct_{n}": reference_distinct(samples, n) for n in (3, 1)}
    assert 0 < got["distinct_1"] < got["distinct_3"] <= 1


@pytest.mark.parametrize("targets", [[1, 1, 1], [0], [0, 1, 1, 0]], ids=["one class only", "single sample", "ties"])
def test_scores_edge_cases(tmp_path, targets):
    samples = [Sample(pred=["a"], label=["a"], columns={"target": t}, arrays={"class_scores": np.float32([0.5, 0.5])})
               for t in targets]
    spill = write_samples(tmp_path / "s", samples, chunk_rows=2, with_tokenizer=False)
    assert_close(compute_from_spill(spill, SCORE_SPECS), reference_scores(samples))


def test_binary_scores_as_one_column_and_labels_from_decoded_text(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 50)
    p1 = np.round(rng.random(50), 1).astype(np.float32)
    samples = [Sample(pred=["red"], label=[["red", "blue"][t]], arrays={"class_scores": np.float32([p])})
               for t, p in zip(truth, p1)]
    spill = write_samples(tmp_path / "s", samples, chunk_rows=7)
    params = {"labels": ["red", "blue"], "batch_size": 16}
    specs = [{"name": n, "params": params} for n in ("auroc", "average_precision")]
    got = compute_from_spill(spill, specs)
    assert got["auroc"] == pytest.approx(roc_auc_score(truth, p1.astype(np.float64)), rel=1e-12)
    assert got["average_precision"] == pytest.approx(average_precision_score(truth, p1.astype(np.float64)), rel=1e-12)


def test_score_metrics_need_the_true_class_and_the_array(tmp_path):
    with pytest.raises(MetricConfigError, match="true class"):
        build_metric("auroc")
    samples = [Sample(pred=["a"], label=["a"], columns={"target": 0})]
    spill = write_samples(tmp_path / "s", samples, chunk_rows=2, with_tokenizer=False)
    with pytest.raises(MetricInputError, match="array 'class_scores'.*arrays=\\{'class_scores'"):
        compute_from_spill(spill, SCORE_SPECS[:1])


def test_percentile_interpolation_is_numpys():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 10, 101, 1000]:
        values = np.sort(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4))
        for q in [0, 0.1, 1, 25, 33.3, 50, 66.7, 90, 99, 99.9, 100]:
            lo, hi = percentile_ranks(n, q)
            assert linear_percentile(values[lo], values[hi], n, q) == np.percentile(values, q), (n, q)


def test_per_sample_nll_skips_unsupervised_samples():
    samples = [Sample(pred=["a"], label=["a"], logprob=[-1.0]), Sample(pred=[], label=[], logprob=[]),
               Sample(pred=["a", "b"], label=["a", "b"], logprob=[-1.0, -2.0])]
    from metric_data import to_batch

    assert sample_nll(to_batch(samples)).tolist() == [1.0, 1.5]


# ------------------------------------------------------------------------------------------- invariance
CORPUS_SPECS = [
    {"name": "cider", "params": {"references_column": "references", "batch_size": 4}},
    *SCORE_SPECS,
    {"name": "loss_percentiles", "params": {"batch_size": 5}},
    {"name": "distinct_n", "params": {"batch_size": 3}},
    {"name": "answer_macro_f1", "params": {"batch_size": 6}},
]


@settings(max_examples=5, deadline=None)
@given(corpus_samples(min_size=2, max_size=30), st.integers(2, 9), st.integers(2, 9), st.integers(1, 12),
       st.randoms(use_true_random=False))
def test_corpus_metrics_invariant_to_chunk_size_batch_size_and_order(tmp_path_factory, samples, rows_a, rows_b,
                                                                    batch, rnd):
    order = list(range(len(samples)))
    rnd.shuffle(order)
    a = compute_from_spill(write_samples(tmp_path_factory.mktemp("a"), samples, chunk_rows=rows_a), CORPUS_SPECS)
    spill_b = write_samples(tmp_path_factory.mktemp("b"), samples, chunk_rows=rows_b, order=order, batch_size=batch)
    respecified = [{**s, "params": {**s["params"], "batch_size": batch}} for s in CORPUS_SPECS]
    b = compute_from_spill(spill_b, respecified)
    assert a.keys() == b.keys()
    for key in a:  # exact sums and integer statistics: the same bits, not merely close
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


# ------------------------------------------------------------------------------------------- live = offline
def test_every_metric_live_equals_offline_and_its_reference(tmp_path):
    """All built-in metrics in one Evaluator run (references via the Arrow column, scores via zarr)."""
    samples = seeded_corpus(40, seed=7)
    refs = {"references_column": "references"}
    labels = {"labels": ["red", "green", "blue"], "target_column": "colour"}
    specs = [
        "token_accuracy", "sequence_exact_match", "text_match", "nll", "wer", "cer", "mer", "wil", "wip",
        {"name": "bits_per_byte", "params": {"references_column": "transcript"}}, "mc_accuracy",
        {"name": "ter", "params": refs},
        {"name": "bleu", "params": refs}, {"name": "chrf", "params": refs}, {"name": "rouge", "params": refs},
        {"name": "squad", "params": refs}, {"name": "accuracy", "params": labels},
        {"name": "precision", "params": labels}, {"name": "recall", "params": labels}, {"name": "f1", "params": labels},
        *CORPUS_SPECS,
    ]
    from metric_data import batches_of

    evaluator = Evaluator(tmp_path / "run", metrics=specs, tokenizer=tokenizer(), keep_logprob=True, chunk_rows=9,
                          dataset_length=len(samples))
    for batch in batches_of(samples, 6):
        evaluator.add(batch, vocab_size=len(tokenizer()))
    live = evaluator.finalize()
    offline = compute_from_spill(tmp_path / "run")
    assert offline.keys() == live.keys()
    assert all(offline[k] == live[k] or (math.isnan(live[k]) and math.isnan(offline[k])) for k in live)
    assert live["cider"] == pytest.approx(reference_cider(samples), rel=1e-9)
    assert_close({k: live[k] for k in ("auroc", "average_precision", "ece")}, reference_scores(samples))
    assert [live["loss_p50"], live["loss_p90"], live["loss_p99"]] == np.percentile(reference_losses(samples),
                                                                                   [50, 90, 99]).tolist()


def test_a_missing_column_or_array_fails_at_the_first_batch(tmp_path):
    """Corpus metrics only run at the end: what they read is checked when the first batch is spilled."""
    from metric_data import batches_of

    from spilleval.metrics.runner import MetricConfigError

    samples = [Sample(pred=["a"], label=["a"], columns={"target": 0}) for _ in range(4)]
    for spec, missing in (({"name": "cider", "params": {"references_column": "captions"}}, "column 'captions'"),
                          (SCORE_SPECS[0], "array 'class_scores'")):
        evaluator = Evaluator(tmp_path / spec["name"], metrics=[spec], tokenizer=tokenizer())
        with pytest.raises(MetricConfigError, match=f"{missing}.*Evaluator.update"):  # as itself, from the writer
            for batch in batches_of(samples, 1):
                evaluator.add(batch, vocab_size=len(tokenizer()))
            evaluator.finalize()
        evaluator.abort()
