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

Memory: one byte per dataset sample for the committed set (as the reader's de-duplication), plus one chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..batch import SampleBatch
from ..reduce import ReducedBatch
from .chunk import read_chunk
from .manifest import ChunkRecord


class CommittedSamples:
    """The dataset indices an earlier run committed to this rank's shard (a bitmap, one byte per sample)."""

    def __init__(self, size: int = 0) -> None:
        self._seen = np.zeros(size, dtype=bool)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._seen))

    def mark(self, indices: np.ndarray) -> None:
        if len(indices) == 0:
            return
        top = int(indices.max()) + 1
        if top > len(self._seen):
            self._seen = np.concatenate([self._seen, np.zeros(top - len(self._seen), dtype=bool)])
        self._seen[indices] = True

    def contains(self, indices: Any) -> np.ndarray:
        """Boolean mask: which of `indices` are committed."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        inside = (indices >= 0) & (indices < len(self._seen))
        mask = np.zeros(len(indices), dtype=bool)
        mask[inside] = self._seen[indices[inside]]
        return mask

    def pending(self, dataset_length: int) -> np.ndarray:
        """Indices in [0, dataset_length) that still need evaluating, ascending."""
        return np.flatnonzero(~self.contains(np.arange(dataset_length, dtype=np.int64)))


def replay_shard(
    shard_dir: Path, records: Sequence[ChunkRecord], on_batch: Callable[[SampleBatch], None], *, size_hint: int = 0
) -> CommittedSamples:
    """Read the committed chunks of one shard in order, verified, hand each to `on_batch`; return what they hold.

    Chunks are replayed as written (duplicate rows included) so that the replayed states equal the states the
    live run had accumulated over the same rows.
    """
    committed = CommittedSamples(size_hint)
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
