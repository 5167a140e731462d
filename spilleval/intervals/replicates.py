"""Bootstrap replicates of a streaming metric's states, and per-sample sums for analytic standard errors.

A streaming metric's state is a sum of per-sample states (`StreamingMetric.sample_states`), so the state of a
resampled corpus in which sample i appears w_i times is sum_i w_i * state_i: a weights-by-states matrix product,
accumulated a window of samples at a time. Integer states and the integer limbs of exact float sums stay integers,
so a replicate equals the metric computed on the resampled corpus held in memory, to the bit, in any order.
Memory: resamples x (the metric's state size), whatever the number of samples.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np

from ..metrics import exact_sum
from ..metrics.base import State, StreamingMetric

_EXACT_IN_FLOAT64 = 2.0**53


class MetricReplicates:
    """The states of `resamples` bootstrap replicates of one streaming metric."""

    def __init__(self, metric: StreamingMetric, resamples: int) -> None:
        self.metric = metric
        self.resamples = resamples
        self.states = {name: np.zeros((resamples, *shape), dtype=np.int64)
                       for name, shape in metric.state_shapes().items()}
        self.observed = copy.copy(metric)  # the corpus itself: every sample once
        self.observed.reset()

    def update(self, sample_states: State, weights: np.ndarray | None) -> None:
        """Add a window: `weights` is (resamples, n) (None when there are no resamples), each state (n, *shape)."""
        self.observed.merge({name: per_sample.sum(axis=0) for name, per_sample in sample_states.items()})
        if not self.resamples:
            return
        for name, per_sample in sample_states.items():
            flat = per_sample.reshape(len(per_sample), -1)
            added = weighted_sum(weights, flat).reshape(self.states[name].shape)
            self.states[name] += added
            if self.metric.is_float_state(name):
                self.states[name] = exact_sum.normalise_rows(self.states[name])

    def values(self) -> dict[str, np.ndarray]:
        """Each output of the metric in every replicate: {output: (resamples,) float64}."""
        return values_of(self.metric, self.states)


def means_only(metric: StreamingMetric) -> bool:
    """Whether every output of the metric is a per-sample mean: an interval needs only `SampleMeanSums`, and
    replicating its states would only cost time (rouge: a 1,000 x 280 product a window)."""
    if not metric.sample_mean_outputs:
        return False
    try:  # the output keys of this instance (its parameters may select them), from its empty state
        outputs = set(metric.compute_state({k: np.zeros(v, np.int64) for k, v in metric.state_shapes().items()}))
    except Exception:  # a custom metric undefined on no samples: replicate, which is only slower
        return False
    return outputs <= set(metric.sample_mean_outputs)


def values_of(metric: StreamingMetric, states: State) -> dict[str, np.ndarray]:
    """Each output of `metric` for every row of `states` (one state per row): {output: (rows,) float64}; {} when
    there are no rows."""
    count = next(iter(states.values())).shape[0]
    rows = [metric.compute_state({k: v[b] for k, v in states.items()}) for b in range(count)]
    return {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]} if rows else {}


class SampleMeanSums:
    """Exact sums of x and x^2 of each per-sample-mean output (x_i: the metric computed on sample i alone)."""

    def __init__(self, metric: StreamingMetric) -> None:
        self.metric = metric
        self.outputs = tuple(metric.sample_mean_outputs)
        self.sums = {key: (exact_sum.zeros(), exact_sum.zeros()) for key in self.outputs}
        self.count = 0

    def update(self, sample_states: State) -> None:
        n = len(next(iter(sample_states.values()))) if sample_states else 0
        per_sample = [self.metric.compute_state({k: v[i] for k, v in sample_states.items()}) for i in range(n)]
        for key in self.outputs:
            x = np.array([row[key] for row in per_sample], dtype=np.float64)
            total, squares = self.sums[key]
            self.sums[key] = (exact_sum.add(total, x), exact_sum.add(squares, exact_squares(x)))
        self.count += n

    def totals(self, key: str) -> tuple[Fraction, Fraction] | None:
        total, squares = (exact_sum.fraction(s) for s in self.sums[key])
        return None if total is None or squares is None else (total, squares)


def weighted_sum(weights: np.ndarray, per_sample: np.ndarray) -> np.ndarray:
    """weights (r, n) @ per_sample (n, k) over integers, exactly: as a float64 BLAS product when every partial sum
    stays below 2^53 (then the order of additions cannot matter), else in int64."""
    bound = float(np.abs(per_sample).max(initial=0)) * float(weights.max(initial=0)) * len(per_sample)
    if bound < _EXACT_IN_FLOAT64:
        return (weights.astype(np.float64) @ per_sample.astype(np.float64)).astype(np.int64)
    return weights.astype(np.int64) @ per_sample.astype(np.int64)


def exact_squares(x: np.ndarray) -> np.ndarray:
    """x^2 as pairs of doubles whose sum is exactly x^2 (Dekker's product with Veltkamp's split), so the sum of
    squares, like the sum, is exact. Assumes |x| < 2^500 (metric values)."""
    square = x * x
    scaled = 134217729.0 * x  # 2^27 + 1
    high = scaled - (scaled - x)
    low = x - high
    error = ((high * high - square) + 2 * high * low) + low * low
    return np.concatenate([square, error])
