"""Count every dataset sample once in the streaming metrics, exactly as the reader keeps it once.

Samplers repeat samples: `DistributedSampler` and accelerate pad the last batches with samples that another rank
(or the same one) also evaluates. The reader keeps the **first occurrence in (rank, chunk, row) order** and drops
the rest; the streaming metrics follow the same rule in two steps:

1. On each rank, `FirstSeen` passes only a sample's first occurrence on that rank to the metrics (rows arrive in
   the order they are committed, so this is the reader's rule within a shard).
2. At the end, the ranks find which of their samples a lower rank holds as well (`Coordinator.sample_owners`)
   and `subtract_rows` takes those rows' contribution back out of the states. Streaming states are sums, so the
   contribution of a few rows is their own state, read back from this rank's shard; the rows re-read are the
   duplicates only (fewer than the world size with `DistributedSampler`).

What remains on each rank is the contribution of exactly the rows the reader keeps, so the merged states equal a
single-process run, and `spilleval compute` on the spill, whatever the world size.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .batch import SampleBatch
from .decode import decode_batch
from .metrics.runner import MetricSuite
from .sampleset import SampleSet
from .spill.chunk import read_chunk, read_sample_index
from .spill.reader import scan_shard


class FirstSeen:
    """The sample indices this rank has passed to the metrics, a sparse set like the reader's.

    `allow_repeats=False` (a single process, where no sampler pads, unless the user says so) makes a repeated index
    an error: it means the loop's indices are not dataset indices (e.g. they restart at 0 in every batch), and
    dropping the repeats would silently evaluate a subset.
    """

    def __init__(self, *, allow_repeats: bool = True) -> None:
        self.present = SampleSet()
        self.allow_repeats = allow_repeats

    def fresh(self, batch: SampleBatch) -> SampleBatch:
        """The rows of `batch` whose sample this rank has not seen before (first of repeats within the batch)."""
        index = batch.sample_index
        if len(index) == 0:
            return batch
        if index.min() < 0:
            raise ValueError(f"sample_index must hold dataset indices (>= 0), got {int(index.min())}")
        keep = self.present.first_occurrences(index)
        if keep is None:
            return batch
        if not self.allow_repeats:
            raise ValueError(
                f"sample index {int(index[~keep][0])} was already evaluated: in a single process every row needs its "
                "own dataset index. The loop's indices repeat (do they restart at 0 in every batch?): pass each "
                "row's index in the dataset, or Evaluator(..., allow_repeats=True) if the sampler repeats samples on "
                "purpose (they count once)."
            )
        return batch.take(np.flatnonzero(keep))


def subtract_rows(suite: MetricSuite, shard_dir: Path, samples: SampleSet) -> int:
    """Take out of `suite`'s streaming states the first row of this shard of every sample in `samples`.
    Returns the number of rows taken out."""
    if not suite.streaming or not len(samples):
        return 0
    twins = [copy.deepcopy(metric) for metric in suite.streaming]
    for twin in twins:
        twin.reset()
    pending = samples.copy()
    removed = 0
    for record in scan_shard(shard_dir):
        if not pending.count_range(record.min_index, record.max_index + 1):
            continue
        chunk_dir = shard_dir / record.name
        index = read_sample_index(chunk_dir, record)
        _, first = np.unique(index, return_index=True)
        rows = np.sort(first[pending.contains(index[first])])
        if len(rows) == 0:
            continue
        batch = read_chunk(chunk_dir, record).take(rows)
        pending.discard(batch.sample_index)
        if any(twin.needs_text for twin in twins):
            decode_batch(batch, suite.tokenizer)
        for twin in twins:
            twin.update(batch)
        removed += len(rows)
    suite.merge([{name: -value for name, value in twin.state().items()} for twin in twins])
    return removed
