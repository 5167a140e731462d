"""Corpus metrics' own bootstraps on every worker: the replicates cut into blocks, one task per (metric, block).

A corpus metric's bootstrap (`CorpusMetric.bootstrap`: AUROC, average precision, ECE, loss percentiles) computes
replicate b from the weights of replicate b alone, and those are a function of (seed, dataset index, b)
(`weights.DrawnWeights`). So a block of replicates is a task of its own: each worker opens the spill, rebuilds the
metric from its spec and runs its bootstrap on its block's weights; the parent stacks the blocks' values in order.
The values are those of one bootstrap over every replicate, to the bit (tested at 1 and 3 workers): each
replicate's arithmetic is integer counts and exact sums, whatever the replicates computed beside it.

Each task reads the spill (and the ranking metrics sort their rows on disk) again: on 20,000 samples that read is
0.02-0.12 s against 2.3-4.7 s of replicate work in one process (BENCHMARKS.md, "intervals"), which the blocks
divide among the workers. In one process, the bootstrap runs as before, over every replicate at once.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..metrics.base import CorpusMetric
from ..metrics.parallel import TaskPool, spill_state
from ..metrics.registry import build_metric, import_modules, registering_modules
from .tally import stacked
from .weights import DrawnWeights

if TYPE_CHECKING:
    from ..spill import SpillReader

MIN_BLOCK_REPLICATES = 32  # a block's replicates, at least: the scans are vectorised over a block's replicates

Values = dict[str, np.ndarray] | None


def corpus_bootstraps(metrics: Sequence[CorpusMetric], reader: "SpillReader", weights: DrawnWeights,
                      pool: TaskPool | None = None) -> list[Values]:
    """Each metric's `bootstrap(reader, weights, weights.rows)` ({output: (rows,) values}, or None where it has
    none), computed by the pool's workers a block of replicates at a time."""
    count = min(pool.workers, weights.rows // MIN_BLOCK_REPLICATES) if pool is not None else 1
    blocks = weights.blocks(max(1, count))
    if pool is None or len(blocks) == 1:
        return [metric.bootstrap(reader, weights, weights.rows) for metric in metrics]
    where = (os.fspath(reader.path), reader.allow_partial, spill_state(reader))
    own = [metric for metric in metrics if type(metric).bootstrap is not CorpusMetric.bootstrap]
    jobs = [(metric.spec(), registering_modules([metric]), where, block) for metric in own for block in blocks]
    parts = iter(pool.map(bootstrap_block, jobs))
    values = {id(metric): [next(parts) for _ in blocks] for metric in own}
    return [_stacked(values[id(metric)]) if id(metric) in values else None for metric in metrics]


def bootstrap_block(spec: dict[str, Any], modules: tuple[str, ...], where: tuple[str, bool, str],
                    weights: DrawnWeights) -> Values:
    """In a worker: the metric's bootstrap on one block of replicates, on its own reader of the spill."""
    from ..spill import SpillReader

    import_modules(modules)
    spill_dir, allow_partial, state = where
    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    if spill_state(reader) != state:
        raise RuntimeError(f"the spill {spill_dir} changed while its intervals were computed: compute them again")
    return build_metric(spec).bootstrap(reader, weights, weights.rows)


def _stacked(blocks: list[Values]) -> Values:
    """The blocks' values of one metric (None: it has no bootstrap after all)."""
    return None if any(block is None for block in blocks) else stacked(blocks)  # type: ignore[arg-type]
