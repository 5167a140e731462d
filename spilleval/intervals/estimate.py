"""Confidence intervals of a spill's metrics, in one bounded-memory pass over it.

Per-sample-mean outputs (`StreamingMetric.sample_mean_outputs`: exact match, SQuAD F1, ROUGE, accuracy) get the
normal interval from their exact sums of x and x^2; every other streaming output (token accuracy, BLEU, chrF, TER,
WER, F1, nll, loss...) a percentile bootstrap over Poisson replicates keyed by dataset index (`weights`). The pass
reads the spill a window of samples at a time; memory is the replicate states (resamples x state size) plus one
window's per-sample states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ..decode import decode_batch
from ..metrics.base import MAX_STATE_BYTES, StreamingMetric
from ..metrics.runner import (
    MetricSpec,
    MetricSuite,
    suite_for_spill,
)
from .bounds import DEFAULT_LEVEL, Interval, mean_interval, percentile_interval
from .replicates import MetricReplicates, SampleMeanSums
from .weights import poisson_weights

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
MAX_WINDOW_ROWS = 256  # weights and hashes of one window: 1,000 resamples x 256 samples x 8 bytes = 2 MiB
WINDOW_BYTES = 64 * 2**20  # one window's per-sample states, all metrics together

Weights = Callable[[np.ndarray], np.ndarray]  # dataset indices (n,) -> (replicates, n) integer weights


@dataclass
class IntervalReport:
    """Intervals by output key (unprefixed), and the outputs left without one, with the reason."""

    intervals: dict[str, Interval] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {key: interval.to_json() for key, interval in self.intervals.items()}


@dataclass
class ReplicatePass:
    """What one pass gathered: each metric's replicate states and per-sample-mean sums."""

    suite: MetricSuite
    replicates: dict[str, MetricReplicates]
    means: dict[str, SampleMeanSums]
    skipped: dict[str, str]


def compute_with_intervals(
    reader: Any,
    metrics: Iterable[MetricSpec] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    progress: bool = False,
    corpus_workers: int | None = 1,
) -> tuple[dict[str, float], IntervalReport]:
    """The metrics and their intervals, the streaming metrics from the same single pass (each metric's state is
    the sum of its per-sample states): what `spilleval compute` runs."""
    report, gathered = _intervals(reader, metrics, resamples, seed, level, progress)
    suite = gathered.suite
    alone = [m for m in suite.streaming if m.name not in gathered.replicates]  # replicates too large to keep
    for metric in suite.streaming:
        if metric not in alone:
            metric.merge(gathered.replicates[metric.name].observed.state())
    for batch in _windows(reader, suite, alone, progress=False) if alone else ():
        for metric in alone:
            metric.update(batch)
    results = suite.compute_streaming()
    results.update(suite.compute_corpus(reader, workers=corpus_workers))
    _corpus_intervals(suite, reader, results, resamples, seed, level, report)
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
) -> IntervalReport:
    """Intervals of the metrics recorded in the spill (or `metrics`) at confidence `level`; `results` (the point
    estimates, unprefixed) give the intervals of corpus metrics that are means of 0/1 outcomes."""
    report, gathered = _intervals(reader, metrics, resamples, seed, level, progress)
    _corpus_intervals(gathered.suite, reader, results, resamples, seed, level, report)
    return report


def _intervals(reader: Any, metrics: Iterable[MetricSpec] | None, resamples: int, seed: int, level: float,
               progress: bool) -> tuple[IntervalReport, ReplicatePass]:
    """The streaming metrics' intervals from one replicate pass."""
    gathered = replicate_pass(reader, metrics, lambda index: poisson_weights(seed, index, resamples), resamples,
                              progress=progress)
    report = IntervalReport(skipped=dict(gathered.skipped))
    for name, replicates in gathered.replicates.items():
        means = gathered.means.get(name)
        for key, values in replicates.values().items():
            interval = None
            if means is not None and key in means.outputs:
                totals = means.totals(key)
                interval = mean_interval(*totals, means.count, level) if totals else None
            else:
                interval = percentile_interval(values, level, resamples=resamples, seed=seed)
            if interval is None:
                report.skipped[key] = "undefined on this data (fewer than two samples, or not finite)"
            else:
                report.intervals[key] = interval
    return report, gathered


def _corpus_intervals(suite: MetricSuite, reader: Any, results: dict[str, Any] | None, resamples: int, seed: int,
                      level: float, report: IntervalReport) -> None:
    """Corpus metrics: a proportion's normal interval from its point estimate, or the metric's own bootstrap."""
    for metric in suite.corpus:
        if metric.binary_mean_outputs and results is not None:
            report.skipped.pop(metric.name, None)
            _binary_mean_intervals(metric.binary_mean_outputs, results, level, report)
            continue
        replicate_values = metric.bootstrap(reader, lambda index: poisson_weights(seed, index, resamples), resamples)
        if replicate_values is not None:
            report.skipped.pop(metric.name, None)
            for key, values in replicate_values.items():
                interval = percentile_interval(values, level, resamples=resamples, seed=seed)
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
    weights: Weights,
    replicates: int,
    *,
    progress: bool = False,
) -> ReplicatePass:
    """One pass over the spill: every supported metric's weighted states under `weights`."""
    suite = suite_for_spill(reader, metrics)
    supported, skipped = _supported(suite, replicates)
    gathered = ReplicatePass(
        suite=suite,
        replicates={m.name: MetricReplicates(m, replicates) for m in supported},
        means={m.name: SampleMeanSums(m) for m in supported if m.sample_mean_outputs},
        skipped=skipped,
    )
    if not supported:
        return gathered
    for batch in _windows(reader, suite, supported, progress=progress):
        batch_weights = weights(batch.sample_index)
        for metric in supported:
            states = metric.sample_states(batch)
            gathered.replicates[metric.name].update(states, batch_weights)
            if metric.name in gathered.means:
                gathered.means[metric.name].update(states)
    return gathered


def _supported(suite: MetricSuite, replicates: int) -> tuple[list[StreamingMetric], dict[str, str]]:
    """Streaming metrics whose replicate states fit the state bound; a reason for every other metric."""
    supported, skipped = [], {}
    for metric in suite.streaming:
        size = _state_width(metric) * 8 * replicates
        if size > MAX_STATE_BYTES:
            skipped[metric.name] = (f"{replicates:,} replicates of its state would take {size:,} bytes: "
                                    "lower --bootstrap")
        else:
            supported.append(metric)
    for metric in suite.corpus:
        skipped[metric.name] = ("a corpus metric whose statistic is not a sum over samples (ranks, document "
                                "frequencies, an open label set): no interval")
    return supported, skipped


def _state_width(metric: StreamingMetric) -> int:
    return sum(int(np.prod(shape)) for shape in metric.state_shapes().values())


def _windows(reader: Any, suite: MetricSuite, metrics: list[StreamingMetric], *, progress: bool) -> Iterator[Any]:
    """The spill in windows small enough that their per-sample states stay within WINDOW_BYTES."""
    width = sum(_state_width(m) for m in metrics)
    rows = int(np.clip(WINDOW_BYTES // max(1, width * 8), 1, MAX_WINDOW_ROWS))
    batches = reader.iter_batches(rows, **suite.reads())
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="confidence intervals", unit="window", leave=False)
    needs_text = any(m.needs_text for m in metrics)
    for batch in batches:
        yield decode_batch(batch, suite.tokenizer) if needs_text else batch
