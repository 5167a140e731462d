"""Resume an interrupted evaluation: which samples an earlier run committed, and their streaming metric states.

Design choice: streaming states are *recomputed from the spill*, not checkpointed next to the chunks. On resume,
every chunk the earlier run committed to this rank's shard is read back (CRC-verified) and fed through the same
`MetricSuite.update` the live run used. Why:

- Exact by construction. A chunk is the unit of durability; a checkpointed state would also count the rows that
  were buffered but not yet committed when the process died, and could not be made atomic with the chunk
  without splitting batches at chunk boundaries. Replayed states cover exactly the committed rows, and the
  metrics are invariant to batching, so replay + the rest of the run equals an uninterrupted run.
- No second source of truth in the format: nothing to version, nothing to go stale, and a resumed run may even
  change its metric list (every streaming metric is recomputed from the ids).
- Cheap: one bounded-memory pass over what is on disk (one chunk at a time), far faster than the model forward
  it saves.

Memory: a sparse set of the committed samples (as the reader's de-duplication), plus one chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..batch import SampleBatch
from ..reduce import ReducedBatch
from ..sampleset import SampleSet
from .chunk import read_chunk
from .manifest import ChunkRecord


class CommittedSamples:
    """The dataset indices an earlier run committed to this rank's shard (a sparse set: memory follows what is
    on disk, not the dataset length or the indices a chunk claims)."""

    def __init__(self, size: int = 0) -> None:  # size: kept for callers; a set needs none
        self._seen = SampleSet()

    def __len__(self) -> int:
        return len(self._seen)

    def mark(self, indices: np.ndarray) -> None:
        self._seen.add(np.asarray(indices, dtype=np.int64))

    def contains(self, indices: Any) -> np.ndarray:
        """Boolean mask: which of `indices` are committed."""
        return self._seen.contains(indices)

    def pending(self, dataset_length: int) -> np.ndarray:
        """Indices in [0, dataset_length) that still need evaluating, ascending."""
        everything = SampleSet()
        everything.add_range(0, dataset_length)
        return (everything - self._seen).to_numpy()


def replay_shard(
    shard_dir: Path, records: Sequence[ChunkRecord], on_batch: Callable[[SampleBatch], None]
) -> CommittedSamples:
    """Read the committed chunks of one shard in order, verified, hand each to `on_batch`; return what they hold.

    Chunks are replayed as written (duplicate rows included) so that the replayed states equal the states the
    live run had accumulated over the same rows.
    """
    committed = CommittedSamples()
    for record in records:
        batch = read_chunk(shard_dir / record.name, record, verify=True)
        on_batch(batch)
        committed.mark(batch.sample_index)
    return committed


def keep_rows(
    batch: SampleBatch | ReducedBatch, keep: np.ndarray, columns: dict[str, Any] | None, arrays: dict[str, Any] | None
) -> tuple[SampleBatch | ReducedBatch, dict[str, Any] | None, dict[str, Any] | None]:
    """Only the rows where `keep` is True, with their columns and arrays. A `ReducedBatch` stays on its device.

    Used for the one batch that straddles what an earlier run committed, so no logits are copied for it.
    """
    rows = np.flatnonzero(keep)
    columns = None if columns is None else {k: [v[i] for i in rows] for k, v in columns.items()}
    arrays = None if arrays is None else {k: v[rows] for k, v in arrays.items()}
    if isinstance(batch, SampleBatch):
        return batch.take(rows), columns, arrays
    return batch.take_rows(rows), columns, arrays
