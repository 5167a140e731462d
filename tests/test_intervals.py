"""Confidence intervals (`spilleval.intervals`): bootstrap replicates equal the metric computed on the resampled
corpus in memory, to the bit; intervals do not depend on chunking or sample order; the analytic standard error is
the textbook one; the weights are a function of (seed, dataset index)."""

from __future__ import annotations

import json
import math
import statistics
from statistics import NormalDist

import numpy as np
import pytest
from metric_data import VOCAB_WORDS, Sample, batches_of, run_streaming, write_samples
from typer.testing import CliRunner

from spilleval.cli import app
from spilleval.intervals import confidence_intervals
from spilleval.intervals.estimate import replicate_pass
from spilleval.intervals.weights import DrawnWeights, check_resamples, coin_flips, poisson_weights
from spilleval.spill import SpillReader

REFS = {"references_column": "references"}
SPECS = [
    "token_accuracy",
    "sequence_exact_match",
    "nll",
    "text_match",
    "wer",
    {"name": "bleu", "params": REFS},
    {"name": "chrf", "params": REFS},
    {"name": "ter", "params": REFS},
    {"name": "squad", "params": REFS},
    {"name": "rouge", "params": {**REFS, "rouge_types": ["rouge1", "rougeL"]}},
    {"name": "accuracy", "params": {}},
]
CLASSES = VOCAB_WORDS[:4]
CLASS_SPECS = [{"name": "f1", "params": {"labels": CLASSES}}, {"name": "accuracy", "params": {"labels": CLASSES}}]


def make_samples(n: int = 80, seed: int = 0) -> list[Sample]:
    """Predictions right about 60% of the time: metrics far from 0 and 1."""
    rng = np.random.default_rng(seed)
    words = VOCAB_WORDS[:30]
    samples = []
    for _ in range(n):
        label = [str(w) for w in rng.choice(words, size=rng.integers(1, 7))]
        pred = [w if rng.random() < 0.6 else str(rng.choice(words)) for w in label]
        refs = [" ".join(label)] + ([" ".join(reversed(label))] if rng.random() < 0.3 else [])
        logprob = (-rng.exponential(1.5, size=len(label))).astype(np.float32).tolist()
        samples.append(Sample(pred=pred, label=label, columns={"references": refs}, logprob=logprob))
    return samples


def make_class_samples(n: int = 90, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = str(rng.choice(CLASSES))
        out.append(Sample(pred=[label if rng.random() < 0.6 else str(rng.choice(CLASSES))], label=[label]))
    return out


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples()


@pytest.fixture(scope="module")
def spill(tmp_path_factory, samples):
    return write_samples(tmp_path_factory.mktemp("ci") / "spill", samples, chunk_rows=7)


def test_weights_are_a_function_of_seed_and_dataset_index():
    index = np.arange(5000)
    weights = poisson_weights(7, index, 64)
    shuffled = np.random.default_rng(1).permutation(index)
    assert np.array_equal(poisson_weights(7, shuffled, 64), weights[:, shuffled])
    assert not np.array_equal(poisson_weights(8, index, 64), weights)
    assert weights.mean() == pytest.approx(1, abs=0.01) and weights.var() == pytest.approx(1, abs=0.02)  # Poisson(1)
    flips = coin_flips(7, index, 64)
    assert np.array_equal(coin_flips(7, shuffled, 64), flips[:, shuffled])
    assert flips.mean() == pytest.approx(0.5, abs=0.01)
    for bad in (-1, 2**21, 1.5, True):
        with pytest.raises(ValueError, match="confidence_resamples"):
            check_resamples(bad)


def test_poisson_draws_read_from_the_top_bits_equal_the_cdf_search(monkeypatch):
    """The draws come from a table of the hash's top 16 bits, and from a search of the CDF where a CDF value falls
    in the bucket: the same draws as the search everywhere, on hashes drawn in every such bucket and at every
    CDF value, one step below it and one above."""
    from spilleval.intervals import weights as module

    def searched(hashes: np.ndarray) -> np.ndarray:
        uniform = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.searchsorted(module._POISSON_CDF, uniform, side="right").astype(np.uint8)

    rng = np.random.default_rng(3)
    cdf = module._POISSON_CDF
    undecided = np.unique((cdf[cdf < 1] * 2.0**16).astype(np.uint64))  # the buckets that hold a CDF value
    assert np.array_equal(undecided, np.flatnonzero(module._STEP_IN_TOP))
    in_steps = (undecided[:, None] << np.uint64(48)) | rng.integers(0, 1 << 48, (len(undecided), 20_000), np.uint64)
    steps = [int(np.ceil(c * 2.0**53)) for c in module._POISSON_CDF]
    at_steps = np.array([(m + d) << 11 | low for m in steps for d in (-1, 0, 1) for low in (0, 2047)
                         if 0 <= m + d < 2**53], dtype=np.uint64)
    spread = rng.integers(0, 2**64 - 1, 1_000_000, dtype=np.uint64, endpoint=True)
    for hashes in (in_steps.reshape(1, -1), at_steps.reshape(1, -1), spread.reshape(1000, -1)):
        monkeypatch.setattr(module, "_hashes", lambda *args, hashes=hashes: hashes)
        assert np.array_equal(module.poisson_weights(0, np.arange(hashes.shape[1]), len(hashes)), searched(hashes))
    assert searched(in_steps.reshape(-1)).max() >= 2 and searched(at_steps).max() >= 15  # the steps are reached


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_bootstrap_replicates_equal_the_metric_on_the_resampled_corpus_in_memory(tmp_path, spill, samples, kind):
    """Replicate b is the corpus in which sample i appears w[b, i] times: computed in memory the slow way, the
    metric gives the same numbers, to the bit, for every output of every metric."""
    specs = SPECS if kind == "text" else CLASS_SPECS
    if kind == "classes":
        samples = make_class_samples()
        spill = write_samples(tmp_path / "classes", samples, chunk_rows=11)
    resamples, seed = 6, 11
    gathered = replicate_pass(SpillReader(spill), specs, DrawnWeights("poisson", seed, resamples))
    weights = poisson_weights(seed, np.arange(len(samples)), resamples)
    replicate_values = {name: r.values() for name, r in gathered.replicates.items()}
    assert set(replicate_values) == {m["name"] if isinstance(m, dict) else m for m in specs}
    for b in range(resamples):
        corpus = [i for i in range(len(samples)) for _ in range(weights[b, i])]
        want = run_streaming(specs, batches_of(samples, 13, corpus)).compute_streaming()
        for values in replicate_values.values():
            for key, per_replicate in values.items():
                assert per_replicate[b] == want[key] or (math.isnan(want[key]) and math.isnan(per_replicate[b])), key


def test_intervals_do_not_depend_on_chunking_or_sample_order(tmp_path, spill, samples):
    order = np.random.default_rng(3).permutation(len(samples)).tolist()
    other = write_samples(tmp_path / "other", samples, chunk_rows=50, order=order, batch_size=3)
    a = confidence_intervals(SpillReader(spill), SPECS, resamples=40, seed=5)
    b = confidence_intervals(SpillReader(other), SPECS, resamples=40, seed=5)
    assert a.to_json() == b.to_json()
    assert not a.skipped
    methods = {key: interval.method for key, interval in a.intervals.items()}
    assert methods["sequence_exact_match"] == methods["squad_f1"] == methods["accuracy"] == methods["rougeL"] == "analytic"
    assert methods["bleu"] == methods["token_accuracy"] == methods["nll"] == methods["ter"] == "bootstrap"
    point = run_streaming(SPECS, batches_of(samples, 16)).compute_streaming()
    for key in ("bleu", "token_accuracy", "chrf", "wer"):
        interval = a.intervals[key]
        assert interval.low < point[key] < interval.high, key


def test_analytic_interval_is_the_textbook_standard_error_of_a_mean(spill, samples):
    """Also for metrics whose outputs are all per-sample means (squad, rouge): their intervals need no replicates,
    and the interval pass draws none for them (it does for the paired tests, which compare replicates)."""
    report = confidence_intervals(SpillReader(spill), SPECS, resamples=10)
    z = NormalDist().inv_cdf(0.975)
    mean_specs = [spec for spec in SPECS if isinstance(spec, dict) and spec["name"] in ("squad", "rouge")]
    per_sample = [run_streaming(mean_specs, batches_of(samples, 1, [i])).compute_streaming()
                  for i in range(len(samples))]
    for key in ("squad_f1", "squad_exact_match", "rouge1", "rougeL"):
        x = [row[key] for row in per_sample]
        standard_error = statistics.stdev(x) / math.sqrt(len(x))
        interval = report.intervals[key]
        assert interval.standard_error == pytest.approx(standard_error, rel=1e-15)
        assert interval.low == pytest.approx(statistics.fmean(x) - z * standard_error, rel=1e-14)
        assert interval.high == pytest.approx(statistics.fmean(x) + z * standard_error, rel=1e-14)
        assert 0 < interval.low < interval.high < (100 if key.startswith("squad") else 1)
    weights = DrawnWeights("poisson", 0, 10)
    for replicate_means, want in ((False, 0), (True, 10)):
        gathered = replicate_pass(SpillReader(spill), mean_specs + ["token_accuracy"], weights,
                                  replicate_means=replicate_means)
        assert [gathered.replicates[name].resamples for name in ("squad", "rouge")] == [want, want]
        assert gathered.replicates["token_accuracy"].resamples == 10


def test_compute_prints_intervals_and_stores_their_shape(spill):
    runner = CliRunner()
    metrics = "token_accuracy,sequence_exact_match,bleu"
    out = runner.invoke(app, ["compute", str(spill), "-m", metrics, "--bootstrap", "50", "--seed", "2", "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    want = confidence_intervals(SpillReader(spill), metrics.split(","), resamples=50, seed=2).to_json()
    assert payload["intervals"] == want
    assert payload["intervals"]["bleu"]["resamples"] == 50 and payload["intervals"]["bleu"]["seed"] == 2
    table = runner.invoke(app, ["compute", str(spill), "-m", metrics, "--bootstrap", "50"])
    assert table.exit_code == 0 and "(95% CI)" in table.output and "±" in table.output
    plain = runner.invoke(app, ["compute", str(spill), "-m", metrics, "--bootstrap", "0", "--json"])
    assert "intervals" not in json.loads(plain.output)


def two_systems(n: int = 300) -> tuple[list[Sample], list[Sample]]:
    """Two systems on one eval set: B right a little more often than A, so the p-value is neither 0 nor 1."""
    rng = np.random.default_rng(4)
    words = VOCAB_WORDS[:30]
    a, b = [], []
    for _ in range(n):
        label = [str(w) for w in rng.choice(words, size=rng.integers(2, 8))]
        refs = {"references": [" ".join(label)]}
        for system, right in ((a, 0.55), (b, 0.59)):
            pred = [w if rng.random() < right else str(rng.choice(words)) for w in label]
            system.append(Sample(pred=pred, label=label, columns=refs))
    return a, b


@pytest.mark.parametrize("test", ["bootstrap", "randomization"])
def test_paired_test_agrees_with_sacrebleu(tmp_path, test):
    """Same statistic and p-value formula as sacrebleu's paired bootstrap / approximate randomization; the draws
    differ (Poisson weights keyed by dataset index vs. numpy's multinomial indices), so the p-values agree within
    the resampling error of 2,000 trials."""
    from metric_data import decoded_texts
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import _paired_ar_test, _paired_bs_test

    from spilleval.intervals.paired import paired_test

    a, b = two_systems()
    spill_a = write_samples(tmp_path / "a", a, chunk_rows=40)
    spill_b = write_samples(tmp_path / "b", b, chunk_rows=17, order=list(reversed(range(len(b)))))
    trials = 2000
    ours = paired_test(SpillReader(spill_a), SpillReader(spill_b), [{"name": "bleu", "params": REFS},
                       {"name": "chrf", "params": REFS}], test=test, trials=trials, seed=1).results
    hyps_a, hyps_b = decoded_texts(a)[0], decoded_texts(b)[0]
    streams = [[s.columns["references"][0] for s in a]]
    for key, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        stats = metric._extract_corpus_statistics(hyps_a, streams)
        baseline = {key: (np.array(stats), metric._aggregate_and_compute(stats))}
        run = _paired_bs_test if test == "bootstrap" else _paired_ar_test
        _, theirs = run(baseline, "b", hyps_b, streams, {key: metric}, trials, -1, 12345)
        assert ours[key].b == pytest.approx(theirs[key].score, rel=1e-12)
        assert ours[key].a == pytest.approx(baseline[key][1].score, rel=1e-12)
        assert 0.01 < theirs[key].p_value < 0.9, "the data should give a p-value that can be compared"
        assert ours[key].p_value == pytest.approx(theirs[key].p_value, abs=0.05), key
        if test == "bootstrap":
            assert ours[key].delta_low < ours[key].delta < ours[key].delta_high


def test_paired_test_of_a_spill_against_itself_finds_nothing(spill):
    from spilleval.intervals.paired import paired_test

    report = paired_test(SpillReader(spill), SpillReader(spill), ["token_accuracy"], trials=200)
    result = report.results["token_accuracy"]
    assert result.delta == 0 and result.delta_low == result.delta_high == 0
    assert result.p_value == 1 / 201  # sacrebleu's formula: no resample beats an observed difference of 0


def test_diff_prints_the_paired_test_and_refuses_it_on_different_samples(tmp_path):
    from spilleval.intervals.paired import paired_test

    a, b = two_systems(60)
    metrics = ["token_accuracy", {"name": "bleu", "params": REFS}]
    spill_a = write_samples(tmp_path / "a", a, chunk_rows=9, metrics=metrics)
    spill_b = write_samples(tmp_path / "b", b, chunk_rows=9, metrics=metrics)
    spill_c = write_samples(tmp_path / "c", b[:50], chunk_rows=9, metrics=metrics, dataset_length=len(b))
    runner = CliRunner()
    outputs = [runner.invoke(app, ["diff", str(spill_a), str(spill_b), "--recompute", "--trials", "300", "--json",
                                   "--workers", str(workers)]) for workers in (1, 2)]
    assert [out.exit_code for out in outputs] == [0, 0], outputs[0].output + outputs[1].output
    payload = json.loads(outputs[0].output)
    assert json.loads(outputs[1].output) == payload  # recompute and paired test on 2 workers: the same bits
    want = paired_test(SpillReader(spill_a), SpillReader(spill_b), trials=300).results
    assert payload["significance"] == {key: result.to_json() for key, result in want.items()}
    assert {"token_accuracy", "bleu", "bleu_precision_4"} <= set(payload["significance"])
    table = runner.invoke(app, ["diff", str(spill_a), str(spill_b), "--recompute", "--trials", "300",
                                "--test", "randomization", "--workers", "1"])
    assert table.exit_code == 0 and "approximate randomization over 300 trials" in " ".join(table.output.split())
    refused = runner.invoke(app, ["diff", str(spill_a), str(spill_c), "--recompute", "--json", "--allow-partial",
                                  "--workers", "1"])
    assert refused.exit_code == 0, (refused.output, refused.exception)
    assert json.loads(refused.output)["significance"] == {}
    assert "not hold the same samples" in json.loads(refused.output)["significance_note"]


def test_intervals_do_not_depend_on_the_world_size(tmp_path, samples):
    """A spill written by 1, 2 or 3 ranks (DistributedSampler's padding duplicates dropped by the reader) gives
    the same intervals, to the bit."""
    from test_metrics_lm import write_ranks

    order = np.random.default_rng(9).permutation(len(samples)).tolist()
    reports = [confidence_intervals(SpillReader(write_ranks(tmp_path / f"w{world}", samples, order, world=world,
                                                            chunk_rows=5 + world, batch_size=3 + world)),
                                    SPECS, resamples=30, seed=4).to_json()
               for world in (1, 2, 3)]
    assert reports[0] == reports[1] == reports[2]
    assert len(reports[0]) > 15


def test_multiple_choice_accuracy_gets_the_interval_of_a_proportion(tmp_path):
    from spilleval.metrics import compute_from_spill

    rng = np.random.default_rng(2)
    samples = []
    for question in range(40):
        right = int(rng.integers(0, 3))
        for choice in range(3):
            logprob = [float(-rng.exponential(1.0))]
            samples.append(Sample(pred=["a"], label=["a"], logprob=logprob,
                                  columns={"question_id": question, "choice_target": choice == right, "choice": "a"}))
    spec = [{"name": "mc_accuracy", "params": {"choice_column": "choice"}}]
    spill = write_samples(tmp_path / "mc", samples, chunk_rows=8, metrics=spec)
    results = compute_from_spill(spill)
    report = confidence_intervals(SpillReader(spill), results=results, resamples=10)
    p, n = results["mc_accuracy"], results["mc_questions"]
    assert 0 < p < 1 and n == 40
    outcomes = [1.0] * round(p * n) + [0.0] * (n - round(p * n))
    interval = report.intervals["mc_accuracy"]
    assert interval.method == "analytic"
    assert interval.standard_error == pytest.approx(statistics.stdev(outcomes) / math.sqrt(n), rel=1e-15)
    assert "mc_questions" not in report.intervals and "mc_accuracy" not in report.skipped


def test_evaluator_stores_intervals_that_inspect_and_report_print(tmp_path):
    import torch

    from spilleval import Evaluator

    generator = torch.Generator().manual_seed(0)
    evaluator = Evaluator(tmp_path / "eval", ["token_accuracy", "sequence_exact_match"], confidence_resamples=200)
    for start in range(0, 96, 16):
        labels = torch.randint(0, 5, (16, 6), generator=generator)
        logits = torch.randn(16, 6, 5, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 5)
        evaluator.update(logits, labels, sample_index=torch.arange(start, start + 16))
    results = evaluator.finalize()
    stored = json.loads((tmp_path / "eval" / "results.json").read_text())["intervals"]
    assert stored == confidence_intervals(SpillReader(tmp_path / "eval"), resamples=200).to_json()
    assert stored["token_accuracy"]["low"] < results["token_accuracy"] < stored["token_accuracy"]["high"]
    runner = CliRunner()
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "eval")], terminal_width=200)
    assert inspected.exit_code == 0 and "(95% CI)" in inspected.output
    reported = runner.invoke(app, ["report", str(tmp_path / "eval"), "-o", str(tmp_path / "r.html")])
    assert reported.exit_code == 0, reported.output
    assert "95% CI" in (tmp_path / "r.html").read_text()
    with pytest.raises(ValueError, match="confidence_resamples"):
        Evaluator(tmp_path / "bad", confidence_resamples=-1)


def test_loss_percentile_replicates_equal_numpy_on_the_resampled_losses(spill, samples):
    from spilleval.metrics.registry import build_metric

    metric = build_metric({"name": "loss_percentiles", "params": {"percentiles": [0, 10, 50, 90, 99, 100]}})
    weights = poisson_weights(6, np.arange(len(samples)), 25)
    values = metric.bootstrap(SpillReader(spill), lambda index: poisson_weights(6, index, 25), 25)
    losses = np.array([-math.fsum(np.float64(x) for x in s.logprob) / len(s.logprob) for s in samples])
    for b in range(25):
        resampled = np.repeat(losses, weights[b])
        for q in (0, 10, 50, 90, 99, 100):
            assert values[f"loss_p{q}"][b] == np.percentile(resampled, q), (b, q)
    report = confidence_intervals(SpillReader(spill), ["loss_percentiles"], resamples=50)
    assert set(report.intervals) == {"loss_p50", "loss_p90", "loss_p99"} and not report.skipped


@pytest.mark.parametrize("name", ["auroc", "average_precision", "ece"])
@pytest.mark.parametrize("classes", [2, 3, 9])
def test_score_metric_replicates_equal_the_metric_on_the_resampled_corpus(tmp_path, classes, name):
    """Scores quantised to a few values (many ties, tie groups longer than a scan block, confidences on the ECE bin
    edges) and two, three or nine classes (a macro mean of 9: numpy sums 8 or more values pairwise): every
    replicate equals the metric computed on the corpus with sample i repeated w_i times, to the bit, and
    replicates differ."""
    from spilleval.metrics.registry import build_metric

    rng = np.random.default_rng(classes)
    names = VOCAB_WORDS[:classes]
    n = 700
    true = rng.integers(0, classes, size=n)
    scores = rng.dirichlet(np.ones(classes), size=n)
    scores[np.arange(n), true] += 0.6 / classes  # right more often than not, far from always
    scores = np.round(scores / scores.sum(axis=1, keepdims=True), 1).astype(np.float32)
    samples = [Sample(pred=[names[t]], label=[names[t]], arrays={"class_scores": scores[i]})
               for i, t in enumerate(true)]
    spec = {"name": name, "params": {"labels": names, "batch_size": 64}}
    spill = write_samples(tmp_path / "s", samples, chunk_rows=50)
    metric = build_metric(spec)
    resamples = 8
    values = metric.bootstrap(SpillReader(spill), lambda index: poisson_weights(3, index, resamples), resamples)
    weights = poisson_weights(3, np.arange(n), resamples)
    assert len(set(values[name].tolist())) == resamples and 0.05 < values[name].mean() < 0.95
    for b in range(resamples):
        order = [i for i in range(n) for _ in range(weights[b, i])]
        resampled = write_samples(tmp_path / f"r{b}", [samples[i] for i in order], chunk_rows=500, batch_size=500)
        want = build_metric(spec).compute(SpillReader(resampled))[name]
        assert values[name][b] == want, b


def test_score_metric_bootstraps_walk_replicates_in_blocks_of_any_size(tmp_path, monkeypatch):
    """A block of one row (each replicate's counts carried across every block) and the default blocks give the
    same replicates; a thousand replicates fit one step of the scan or of ECE's exact products."""
    from spilleval.metrics import scores as score_module
    from spilleval.metrics.registry import build_metric

    rng = np.random.default_rng(5)
    n = 300
    probs = np.round(rng.random(n), 2).astype(np.float32)
    truth = (rng.random(n) < probs).astype(int)
    samples = [Sample(pred=["a"], label=["a"], arrays={"class_scores": [probs[i]]}, columns={"target": int(truth[i])})
               for i in range(n)]
    spill = write_samples(tmp_path / "s", samples, chunk_rows=40)
    weights = DrawnWeights("poisson", 4, 1000)
    specs = [{"name": name, "params": {"target_column": "target"}} for name in ("auroc", "average_precision", "ece")]
    default = [build_metric(spec).bootstrap(SpillReader(spill), weights, 1000) for spec in specs]
    monkeypatch.setattr(score_module, "REPLICATE_CELLS", 1000)  # one row (ECE: one sample) per step
    for spec, want in zip(specs, default):
        got = build_metric(spec).bootstrap(SpillReader(spill), weights, 1000)
        assert np.array_equal(got[spec["name"]], want[spec["name"]], equal_nan=True), spec["name"]
    report = confidence_intervals(SpillReader(spill), [*specs[:2], {"name": "ece", "params": {
        "target_column": "target", "n_bins": 1000}}], resamples=1000, seed=4)
    assert set(report.intervals) == {"auroc", "average_precision"} and list(report.skipped) == ["ece"]
    assert "lower --bootstrap or n_bins" in report.skipped["ece"]  # 1000 bins x 1000 replicates: 568 MB
    for spec, replicates in zip(specs[:2], default):
        name = spec["name"]
        interval = report.intervals[name]
        assert interval.low < build_metric(spec).compute(SpillReader(spill))[name] < interval.high
        assert (interval.low, interval.high) == tuple(np.quantile(replicates[name], [0.025, 0.975]))


def test_diff_of_score_metrics_pairs_their_own_bootstraps(tmp_path):
    """`diff` of two systems on the same samples: auroc, average_precision and ece are paired (their replicates
    share each sample's weights), observed values are the metrics' own."""
    from spilleval.intervals.paired import paired_test
    from spilleval.metrics.registry import build_metric

    rng = np.random.default_rng(8)
    n = 400
    truth = rng.integers(0, 2, size=n)
    sharp = np.clip(truth + rng.normal(0, 0.45, size=n), 0, 1).astype(np.float32)
    blunt = np.clip(truth + rng.normal(0, 0.9, size=n), 0, 1).astype(np.float32)
    spills = [write_samples(tmp_path / name, [Sample(pred=["a"], label=["a"], arrays={"class_scores": [p[i]]},
                                                     columns={"target": int(truth[i])}) for i in range(n)],
                            chunk_rows=64) for name, p in (("a", blunt), ("b", sharp))]
    specs = [{"name": name, "params": {"target_column": "target"}} for name in ("auroc", "average_precision", "ece")]
    report = paired_test(SpillReader(spills[0]), SpillReader(spills[1]), specs, trials=300, seed=2)
    assert not report.skipped
    for spec in specs:
        name = spec["name"]
        result = report.results[name]
        a, b = (build_metric(spec).compute(SpillReader(s))[name] for s in spills)
        assert (result.a, result.b) == (a, b) and result.delta_low < b - a < result.delta_high
        assert result.p_value < 0.05, name  # sharper scores: better ranking and calibration, on 400 samples


def test_ece_refuses_a_bootstrap_that_would_not_fit_and_says_why():
    from spilleval.metrics.registry import build_metric

    metric = build_metric({"name": "ece", "params": {"target_column": "target", "n_bins": 1000}})
    assert metric.bootstrap_refusal(200) is None
    assert "lower --bootstrap or n_bins" in metric.bootstrap_refusal(1000)


def test_compute_with_intervals_gives_compute_from_spills_numbers_in_one_pass(spill):
    from spilleval.intervals import compute_with_intervals
    from spilleval.metrics import compute_from_spill

    specs = [*SPECS, "loss_percentiles"]
    results, report = compute_with_intervals(SpillReader(spill), specs, resamples=20, seed=1)
    assert results == compute_from_spill(spill, specs)
    assert list(results) == list(compute_from_spill(spill, specs))
    assert report.to_json() == confidence_intervals(SpillReader(spill), specs, resamples=20, seed=1).to_json()


def test_corpus_bootstraps_on_workers_give_the_one_process_replicates(tmp_path):
    """The corpus metrics' own bootstraps (auroc, average_precision, ece, loss_percentiles), cut into blocks of
    replicates on 3 workers, give every replicate of the one-process bootstrap, to the bit; so do `compute`'s
    intervals at the default 1,000 resamples and `diff`'s paired bootstrap (its observed row in the first block)."""
    from spilleval.intervals.corpus_bootstrap import corpus_bootstraps
    from spilleval.intervals.paired import paired_test
    from spilleval.metrics.parallel import TaskPool
    from spilleval.metrics.pool import local_executor, shutdown
    from spilleval.metrics.registry import build_metric

    rng = np.random.default_rng(11)
    n = 400
    truth = rng.integers(0, 2, size=n)
    spills = []
    for name, noise in (("a", 0.9), ("b", 0.45)):
        probs = np.round(np.clip(truth + rng.normal(0, noise, size=n), 0, 1), 2).astype(np.float32)
        samples = [Sample(pred=["a"], label=["a"], arrays={"class_scores": [probs[i]]},
                          columns={"target": int(truth[i])}, logprob=[float(-rng.exponential(1.5))]) for i in range(n)]
        spills.append(write_samples(tmp_path / name, samples, chunk_rows=64))
    specs = [*({"name": name, "params": {"target_column": "target"}} for name in ("auroc", "average_precision", "ece")),
             {"name": "loss_percentiles", "params": {"percentiles": [10, 50, 90]}}]
    weights = DrawnWeights("poisson", 4, 1000)
    metrics = [build_metric(spec) for spec in specs]
    alone = [metric.bootstrap(SpillReader(spills[1]), weights, 1000) for metric in metrics]
    pool = local_executor(3)
    try:
        spread = corpus_bootstraps(metrics, SpillReader(spills[1]), weights, TaskPool(pool, 3))
    finally:
        shutdown(pool)
    for spec, want, got in zip(specs, alone, spread):
        assert want.keys() == got.keys(), spec
        for key in want:
            assert np.array_equal(want[key], got[key], equal_nan=True), key
            assert len(set(want[key].tolist())) > 100, key  # replicates differ

    reports = [confidence_intervals(SpillReader(spills[1]), [*specs, "distinct_n"], workers=workers)
               for workers in (1, 3)]
    assert reports[0].to_json() == reports[1].to_json() and len(reports[0].intervals) == 6
    assert reports[0].skipped == reports[1].skipped and "distinct_n" in reports[1].skipped  # no bootstrap of its own
    paired = [paired_test(SpillReader(spills[0]), SpillReader(spills[1]), specs, trials=200, seed=2, workers=workers)
              for workers in (1, 3)]
    assert paired[0] == paired[1] and not paired[0].skipped
    assert paired[0].results["auroc"].p_value < 0.05  # sharper scores rank better


def test_score_bootstraps_on_a_local_dask_cluster_give_the_one_process_intervals(tmp_path):
    """`spilleval compute --dask local`: the blocks of replicates run as Dask tasks, with the same intervals."""
    pytest.importorskip("distributed")
    rng = np.random.default_rng(12)
    truth = rng.integers(0, 2, size=300)
    probs = np.round(np.clip(truth + rng.normal(0, 0.6, size=300), 0, 1), 2).astype(np.float32)
    spill = write_samples(tmp_path / "s", [Sample(pred=["a"], label=["a"], arrays={"class_scores": [p]},
                                                  columns={"target": int(t)}) for p, t in zip(probs, truth)],
                          chunk_rows=64)
    metric_args = ["-m", ",".join(f"{name}(target_column=target)" for name in ("auroc", "average_precision", "ece"))]
    runner = CliRunner()
    outputs = [runner.invoke(app, ["compute", str(spill), "--json", "--bootstrap", "200", *metric_args, *args])
               for args in (["--workers", "1"], ["--dask", "local", "--workers", "2"])]
    for out in outputs:
        assert out.exit_code == 0, out.output
    payloads = [json.loads(out.output) for out in outputs]
    assert payloads[0]["intervals"] == payloads[1]["intervals"] and len(payloads[0]["intervals"]) == 3
