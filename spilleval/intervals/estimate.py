"""Confidence intervals of a spill's metrics, in one bounded-memory pass over it.

Per-sample-mean outputs (`StreamingMetric.sample_mean_outputs`: exact match, SQuAD F1, ROUGE, accuracy) get the
normal interval from their exact sums of x and x^2; every other streaming output (token accuracy, BLEU, chrF, TER,
WER, F1, nll, loss...) a percentile bootstrap over Poisson replicates keyed by dataset index (`weights`). The pass
is the metrics' own sweep over the spill (`spilleval.metrics.parallel`), in as many worker processes as asked: each
task adds up its samples' replicates (`tally`), a window of samples at a time, and the parent adds the tasks'
sums. Memory per process is the replicate states (resamples x state size) plus one window's per-sample states.
Corpus metrics with a bootstrap of their own (AUROC, average precision, ECE, loss percentiles) run it on the same
workers, a block of replicates per task (`corpus_bootstrap`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..metrics.base import MAX_STATE_BYTES, StreamingMetric
from ..metrics.parallel import TaskPool, compute_in_parallel
from ..metrics.pool import InlineExecutor, worker_pool
from ..metrics.runner import MetricSpec, MetricSuite, suite_for_spill
from .bounds import DEFAULT_LEVEL, Interval, mean_interval, percentile_interval
from .corpus_bootstrap import corpus_bootstraps
from .replicates import MetricReplicates, SampleMeanSums, means_only
from .tally import ReplicatePass, ReplicateRequest, replicate_values, state_width
from .weights import DrawnWeights

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


@dataclass
class IntervalReport:
    """Intervals by output key (unprefixed), and the outputs left without one, with the reason."""

    intervals: dict[str, Interval] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {key: interval.to_json() for key, interval in self.intervals.items()}


def compute_with_intervals(
    reader: Any,
    metrics: Iterable[MetricSpec] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    progress: bool = False,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> tuple[dict[str, float], IntervalReport]:
    """The metrics and their intervals from the same sweep over the spill (each streaming metric's state is the
    sum of its per-sample states, so the replicates give it too), in `workers` processes (None: every usable core)
    or on `executor`: what `spilleval compute` runs."""
    weights = DrawnWeights("poisson", seed, resamples)
    with worker_pool(workers, executor) as (pool, count):
        suite = suite_for_spill(reader, metrics, load_tokenizer=isinstance(pool, InlineExecutor))
        gathered = _replicate_pass(suite, weights, replicate_means=False)
        results = compute_in_parallel(reader, suite, executor=pool, workers=count, progress=progress,
                                      replicates=gathered if gathered.replicates else None)
        report = _streaming_intervals(gathered, resamples, seed, level, TaskPool(pool, count))
        _corpus_intervals(suite, reader, results, resamples, seed, level, report, TaskPool(pool, count))
    return suite.in_order(results), report


def confidence_intervals(
    reader: Any,
    metrics: Iterable[MetricSpec] | None = None,
    *,
    results: dict[str, Any] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    progress: bool = False,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> IntervalReport:
    """Intervals of the metrics recorded in the spill (or `metrics`) at confidence `level`; `results` (the point
    estimates, unprefixed) give the intervals of corpus metrics that are means of 0/1 outcomes."""
    with worker_pool(workers, executor) as (pool, count):
        gathered = replicate_pass(reader, metrics, DrawnWeights("poisson", seed, resamples), progress=progress,
                                  workers=count, executor=pool, replicate_means=False)
        report = _streaming_intervals(gathered, resamples, seed, level, TaskPool(pool, count))
        _corpus_intervals(gathered.suite, reader, results, resamples, seed, level, report, TaskPool(pool, count))
    return report


def _streaming_intervals(gathered: ReplicatePass, resamples: int, seed: int, level: float,
                         pool: TaskPool | None = None) -> IntervalReport:
    """The streaming metrics' intervals from their replicates (and per-sample-mean sums)."""
    report = IntervalReport(skipped=dict(gathered.skipped))
    for name, replicates in gathered.replicates.items():
        means = gathered.means.get(name)
        intervals = {}
        if means is not None:
            for key in means.outputs:
                totals = means.totals(key)
                intervals[key] = mean_interval(*totals, means.count, level) if totals else None
        for key, values in replicate_values(replicates, pool).items():
            if key not in intervals:
                intervals[key] = percentile_interval(values, level, resamples=resamples, seed=seed)
        for key, interval in intervals.items():
            if interval is None:
                report.skipped[key] = "undefined on this data (fewer than two samples, or not finite)"
            else:
                report.intervals[key] = interval
    return report


def _corpus_intervals(suite: MetricSuite, reader: Any, results: dict[str, Any] | None, resamples: int, seed: int,
                      level: float, report: IntervalReport, pool: TaskPool | None = None) -> None:
    """Corpus metrics: a proportion's normal interval from its point estimate, or the metric's own bootstrap (on
    the pool's workers, a block of replicates each: `corpus_bootstrap`)."""
    bootstrapped = []
    for metric in suite.corpus:
        if metric.binary_mean_outputs and results is not None:
            report.skipped.pop(metric.name, None)
            _binary_mean_intervals(metric.binary_mean_outputs, results, level, report)
            continue
        refusal = metric.bootstrap_refusal(resamples)
        if refusal is not None:
            report.skipped[metric.name] = refusal
        else:
            bootstrapped.append(metric)
    values = corpus_bootstraps(bootstrapped, reader, DrawnWeights("poisson", seed, resamples), pool)
    for metric, outputs in zip(bootstrapped, values):
        if outputs is None:
            continue
        report.skipped.pop(metric.name, None)
        for key, replicates in outputs.items():
            interval = percentile_interval(replicates, level, resamples=resamples, seed=seed)
            if interval is None:
                report.skipped[key] = "undefined on this data (no finite replicate)"
            else:
                report.intervals[key] = interval


def _binary_mean_intervals(outputs: dict[str, str], results: dict[str, Any], level: float,
                           report: IntervalReport) -> None:
    """mean ± z * SE of a proportion p over n outcomes, from p and n: x is 0 or 1, so sum(x) = sum(x^2) = p * n."""
    for key, count_key in outputs.items():
        p, n = results.get(key), results.get(count_key)
        interval = None
        if isinstance(p, float) and math.isfinite(p) and isinstance(n, int):
            right = Fraction(round(p * n))
            interval = mean_interval(right, right, n, level)
        if interval is None:
            report.skipped[key] = "undefined on this data (fewer than two outcomes)"
        else:
            report.intervals[key] = interval


def replicate_pass(
    reader: Any,
    metrics: Iterable[MetricSpec] | None,
    weights: DrawnWeights,
    *,
    progress: bool = False,
    workers: int | None = 1,
    executor: Executor | None = None,
    replicate_means: bool = True,
) -> ReplicatePass:
    """One sweep over the spill: every supported streaming metric's weighted states under `weights` (and nothing
    else: the corpus metrics and the streaming metrics without replicates are not computed). Without
    `replicate_means`, metrics whose outputs are all per-sample means get only their sums of x and x^2."""
    with worker_pool(workers, executor) as (pool, count):
        suite = suite_for_spill(reader, metrics, load_tokenizer=isinstance(pool, InlineExecutor))
        gathered = _replicate_pass(suite, weights, replicate_means=replicate_means)
        if gathered.replicates:
            supported = MetricSuite([r.metric for r in gathered.replicates.values()], tokenizer=suite.tokenizer)
            compute_in_parallel(reader, supported, executor=pool, workers=count, progress=progress,
                                replicates=gathered)
    return gathered


def _replicate_pass(suite: MetricSuite, weights: DrawnWeights, *, replicate_means: bool) -> ReplicatePass:
    """The parent's empty replicate sums for `suite`'s supported metrics, and why the others have none."""
    supported, skipped = _supported(suite, weights.rows)
    request = ReplicateRequest(weights, tuple(m.name for m in supported),
                               () if replicate_means else tuple(m.name for m in supported if means_only(m)))
    return ReplicatePass(
        suite=suite,
        replicates={m.name: MetricReplicates(m, request.resamples(m)) for m in supported},
        means={m.name: SampleMeanSums(m) for m in supported if m.sample_mean_outputs},
        skipped=skipped,
        request=request,
    )


def _supported(suite: MetricSuite, replicates: int) -> tuple[list[StreamingMetric], dict[str, str]]:
    """Streaming metrics whose replicate states fit the state bound; a reason for every other metric."""
    supported, skipped = [], {}
    for metric in suite.streaming:
        size = state_width(metric) * 8 * replicates
        if size > MAX_STATE_BYTES:
            skipped[metric.name] = (f"{replicates:,} replicates of its state would take {size:,} bytes: "
                                    "lower --bootstrap")
        else:
            supported.append(metric)
    for metric in suite.corpus:
        skipped[metric.name] = ("a corpus metric whose statistic is not a sum over samples (ranks, document "
                                "frequencies, an open label set): no interval")
    return supported, skipped
