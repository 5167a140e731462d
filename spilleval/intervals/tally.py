"""The replicate pass as map/merge, so the intervals' pass runs on the same workers as the metrics.

A task of a parallel sweep (`spilleval.metrics.parallel`) that carries a `ReplicateRequest` feeds its batches to a
`ReplicateTally`: each supported streaming metric's per-sample states, a window at a time, weighted into the
replicates (`MetricReplicates`), summed into the observed state and, for per-sample means, into exact sums of x and
x^2 (`SampleMeanSums`); the other streaming metrics are updated as usual. The task sends `partial()`; the parent
adds the partials up (`ReplicatePass.merge`). Every part is an integer sum (replicate states, limbs of exact float
sums), so the replicates are the same bits for any number of workers and any task boundaries, and equal to the
single pass over the spill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batch import SampleBatch
from ..metrics import exact_sum
from ..metrics.base import StreamingMetric
from ..metrics.registry import import_modules, registering_modules
from .replicates import MetricReplicates, SampleMeanSums, values_of
from .weights import DrawnWeights

if TYPE_CHECKING:
    from ..metrics.parallel import TaskPool
    from ..metrics.runner import MetricSuite

MAX_WINDOW_ROWS = 256  # weights and hashes of one window: 1,000 resamples x 256 samples x 8 bytes = 2 MiB
WINDOW_BYTES = 64 * 2**20  # one window's per-sample states, all metrics together


@dataclass(frozen=True)
class ReplicateRequest:
    """What the tasks of a sweep add up besides the metrics' states (picklable, sent with each task): the
    replicates under `weights` of the streaming metrics named in `metrics`."""

    weights: DrawnWeights
    metrics: tuple[str, ...]
    means_only: tuple[str, ...] = ()  # metrics whose every output is a per-sample mean: sums of x and x^2 suffice

    def resamples(self, metric: StreamingMetric) -> int:
        return 0 if metric.name in self.means_only else self.weights.rows

    def tally(self, suite: "MetricSuite") -> "ReplicateTally":
        return ReplicateTally(self, suite)


@dataclass
class MetricPartial:
    """One metric's share of a task: replicate states and per-sample-mean sums."""

    replicates: dict[str, np.ndarray]
    mean_sums: dict[str, tuple[np.ndarray, np.ndarray]] | None
    count: int


class ReplicateTally:
    """A task's replicates (worker side). `update` takes every batch of the task; `partial` is what travels."""

    def __init__(self, request: ReplicateRequest, suite: "MetricSuite") -> None:
        self.weights = request.weights
        self.metrics = [m for m in suite.streaming if m.name in request.metrics]
        self.others = [m for m in suite.streaming if m.name not in request.metrics]
        self.replicates = {m.name: MetricReplicates(m, request.resamples(m)) for m in self.metrics}
        self.means = {m.name: SampleMeanSums(m) for m in self.metrics if m.sample_mean_outputs}
        self.window_rows = window_rows(self.metrics)
        self.replicated = any(r.resamples for r in self.replicates.values())  # else no weights to draw

    def update(self, batch: SampleBatch) -> None:
        for start in range(0, len(batch), self.window_rows):
            window = batch.slice(start, min(start + self.window_rows, len(batch)))
            weights = self.weights(window.sample_index) if self.replicated else None
            for metric in self.metrics:
                states = metric.sample_states(window)
                self.replicates[metric.name].update(states, weights)
                if metric.name in self.means:
                    self.means[metric.name].update(states)
        for metric in self.others:
            metric.update(batch)

    def partial(self) -> dict[str, MetricPartial]:
        """The task's replicates; the observed states (every sample once) go into the metrics themselves, which
        were not updated otherwise, so the task's streaming states are whole."""
        out = {}
        for metric in self.metrics:
            replicates, means = self.replicates[metric.name], self.means.get(metric.name)
            metric.merge(replicates.observed.state())
            out[metric.name] = MetricPartial(replicates.states, dict(means.sums) if means is not None else None,
                                             means.count if means is not None else 0)
        return out


@dataclass
class ReplicatePass:
    """What one pass gathered (parent side): each metric's replicate states and per-sample-mean sums."""

    suite: "MetricSuite"
    replicates: dict[str, MetricReplicates]
    means: dict[str, SampleMeanSums]
    skipped: dict[str, str]
    request: ReplicateRequest | None = field(default=None)

    def merge(self, partial: dict[str, MetricPartial]) -> None:
        """Add a task's partial (in any order: integer sums)."""
        for name, part in partial.items():
            replicates = self.replicates[name]
            for state, added in part.replicates.items():
                total = replicates.states[state] + added
                replicates.states[state] = (exact_sum.normalise_rows(total) if replicates.metric.is_float_state(state)
                                            else total)
            if part.mean_sums is not None:
                means = self.means[name]
                for key, (total, squares) in part.mean_sums.items():
                    have_total, have_squares = means.sums[key]
                    means.sums[key] = (exact_sum.merge(have_total, total), exact_sum.merge(have_squares, squares))
                means.count += part.count


def window_rows(metrics: list[StreamingMetric]) -> int:
    """Rows of a window whose per-sample states stay within WINDOW_BYTES, all metrics together."""
    width = sum(state_width(m) for m in metrics)
    return int(np.clip(WINDOW_BYTES // max(1, width * 8), 1, MAX_WINDOW_ROWS))


def state_width(metric: StreamingMetric) -> int:
    """Integers in one of the metric's states, all arrays together."""
    return sum(int(np.prod(shape)) for shape in metric.state_shapes().values())


def replicate_values(replicates: MetricReplicates, pool: "TaskPool | None" = None) -> dict[str, np.ndarray]:
    """Each output of the metric in every replicate ({output: (replicates,) float64}), `MetricReplicates.values`
    with the replicates shared out among `pool`'s workers: computing an output from a state runs the reference
    library's Python per replicate (chrF: about 1 ms, a second for 1,000 replicates in one process)."""
    metric = replicates.metric
    rows = replicates.resamples
    if pool is None or pool.workers <= 1 or rows < 2 * pool.workers:
        return replicates.values()
    step = math.ceil(rows / pool.workers)
    jobs = [(metric.spec(), registering_modules([metric]),
             {name: states[start:start + step] for name, states in replicates.states.items()})
            for start in range(0, rows, step)]
    return stacked(pool.map(values_of_states, jobs))


def stacked(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each output's values of blocks of replicates, in block order: the values of all the replicates."""
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}


def values_of_states(spec: dict[str, Any], modules: tuple[str, ...], states: dict[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
    """Each output of the metric `spec` for every row of `states` (in a worker: the metric is rebuilt from its
    spec, after importing the module that registers it)."""
    from ..metrics.registry import build_metric

    import_modules(modules)
    return values_of(build_metric(spec), states)
