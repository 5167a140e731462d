"""Is B better than A on the same eval set? Paired bootstrap resampling and approximate randomization.

Both follow sacrebleu's `--paired-bs` / `--paired-ar` (`sacrebleu.significance`): the test statistic, the p-value
`(c + 1) / (trials + 1)` and the delta's percentile interval. The difference is how samples are drawn: each
sample's weight (bootstrap) or coin (randomization) is a function of (seed, dataset index), so the two spills are
read in separate bounded-memory passes, in any chunking and order, and the same items are resampled together.

Randomization swaps the two systems' outputs of a sample when its coin says so; with per-sample states s_a, s_b and
the coins m, the pseudo-systems' states are `sum(s_a) - m @ s_a + m @ s_b` and the mirror image.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import exact_sum
from ..metrics.base import State
from ..metrics.parallel import TaskPool
from ..metrics.pool import worker_pool
from ..metrics.runner import MetricSpec
from .bounds import DEFAULT_LEVEL
from .corpus_bootstrap import corpus_bootstraps
from .estimate import DEFAULT_RESAMPLES, DEFAULT_SEED, replicate_pass
from .replicates import MetricReplicates
from .tally import replicate_values
from .weights import DrawnWeights

TESTS = ("bootstrap", "randomization")


@dataclass(frozen=True)
class PairedResult:
    """One metric output: A, B, B − A with its interval, and the p-value of "the difference is chance"."""

    a: float
    b: float
    delta_low: float
    delta_high: float
    p_value: float
    test: str
    trials: int
    seed: int
    level: float

    @property
    def delta(self) -> float:
        return self.b - self.a

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "delta": self.delta, "delta_low": self.delta_low,
                "delta_high": self.delta_high, "p_value": self.p_value, "test": self.test, "trials": self.trials,
                "seed": self.seed, "level": self.level}


@dataclass
class PairedReport:
    results: dict[str, PairedResult]
    skipped: dict[str, str]


def paired_test(
    reader_a: Any,
    reader_b: Any,
    metrics: Iterable[MetricSpec] | None = None,
    *,
    test: str = "bootstrap",
    trials: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
    progress: bool = False,
    workers: int | None = 1,
    executor: Executor | None = None,
) -> PairedReport:
    """Paired significance of B − A for every streaming metric output of A's recorded metrics (or `metrics`).
    The spills must hold the same samples (the caller checks: `spilleval diff` does)."""
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, not {test!r}")
    specs = list(metrics) if metrics is not None else reader_a.manifest.metrics
    # row 0: every sample once (the observed systems)
    weights = DrawnWeights("poisson" if test == "bootstrap" else "coin", seed, trials, observed_row=True)
    results: dict[str, PairedResult] = {}
    with worker_pool(workers, executor) as (processes, count):
        passes = [replicate_pass(r, specs, weights, progress=progress, workers=count, executor=processes)
                  for r in (reader_a, reader_b)]
        pool = TaskPool(processes, count)
        for name, replicates_a in passes[0].replicates.items():
            replicates_b = passes[1].replicates[name]
            if test == "bootstrap":
                values = _paired_bootstrap(replicate_values(replicates_a, pool), replicate_values(replicates_b, pool))
            else:
                values = _randomization(replicates_a, replicates_b, pool)
            for key, (observed_a, observed_b, statistic, deltas) in values.items():
                results[key] = _result(observed_a, observed_b, statistic, deltas, test, trials, seed, level)
        skipped = {**passes[0].skipped, **passes[1].skipped}
        if test == "bootstrap":  # corpus metrics have their own bootstraps, and no randomization test
            _paired_corpus_bootstraps(passes[0].suite.corpus, passes[1].suite.corpus, (reader_a, reader_b), weights,
                                      pool, skipped, results, (test, trials, seed, level))
    return PairedReport(results, skipped)


def _paired_corpus_bootstraps(metrics_a: list, metrics_b: list, readers: tuple[Any, Any], weights: DrawnWeights,
                              pool: TaskPool, skipped: dict[str, str], results: dict[str, PairedResult],
                              settings: tuple[str, int, int, float]) -> None:
    """The paired bootstrap of each corpus metric from its own bootstraps of A and of B (`corpus_bootstraps`)."""
    chosen = []
    for metric_a, metric_b in zip(metrics_a, metrics_b):
        refusal = metric_a.bootstrap_refusal(weights.rows)
        if refusal is not None:
            skipped[metric_a.name] = refusal
        else:
            chosen.append((metric_a, metric_b))
    values_a = corpus_bootstraps([a for a, _ in chosen], readers[0], weights, pool)
    values_b = corpus_bootstraps([b for _, b in chosen], readers[1], weights, pool)
    for (metric_a, _), a, b in zip(chosen, values_a, values_b):
        if a is None or b is None:
            continue
        skipped.pop(metric_a.name, None)
        for key, (observed_a, observed_b, statistic, deltas) in _paired_bootstrap(a, b).items():
            results[key] = _result(observed_a, observed_b, statistic, deltas, *settings)


def _paired_bootstrap(values_a: dict[str, np.ndarray], values_b: dict[str, np.ndarray]) -> dict[str, tuple]:
    """sacrebleu's paired bootstrap: |Δ| of each resample, centred on its mean, against the observed |Δ|
    (row 0 of the values: the observed systems)."""
    out = {}
    for key in values_a:
        deltas = values_b[key][1:] - values_a[key][1:]
        statistic = np.abs(deltas) - np.abs(deltas).mean()
        out[key] = (values_a[key][0], values_b[key][0], statistic, deltas)
    return out


def _randomization(a: MetricReplicates, b: MetricReplicates, pool: TaskPool) -> dict[str, tuple]:
    """sacrebleu's approximate randomization: |Δ| of the pseudo-systems against the observed |Δ|."""
    values_a, values_b = replicate_values(a, pool), replicate_values(b, pool)
    pseudo_a, pseudo_b = replicate_values(_swap(a, b), pool), replicate_values(_swap(b, a), pool)
    out = {}
    for key in values_a:
        statistic = np.abs(pseudo_b[key] - pseudo_a[key])
        out[key] = (values_a[key][0], values_b[key][0], statistic, None)
    return out


def _swap(own: MetricReplicates, other: MetricReplicates) -> MetricReplicates:
    """The pseudo-system that keeps `own`'s outputs except where the coin swaps in `other`'s."""
    swapped = MetricReplicates(own.metric, own.states[next(iter(own.states))].shape[0] - 1)
    for name, states in own.states.items():
        combined: State = states[:1] - states[1:] + other.states[name][1:]
        if own.metric.is_float_state(name):
            combined = exact_sum.normalise_rows(combined)
        swapped.states[name] = combined
    return swapped


def _result(a: float, b: float, statistic: np.ndarray, deltas: np.ndarray | None, test: str, trials: int,
            seed: int, level: float) -> PairedResult:
    observed = abs(b - a)
    p_value = (int(np.sum(statistic > observed)) + 1) / (len(statistic) + 1)
    if deltas is not None and np.isfinite(deltas).any():
        low, high = np.quantile(deltas[np.isfinite(deltas)], [(1 - level) / 2, (1 + level) / 2])
    else:
        low = high = float("nan")
    return PairedResult(float(a), float(b), float(low), float(high), p_value, test, trials, seed, level)


