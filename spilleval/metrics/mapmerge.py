"""Corpus metrics as map/merge passes, so their passes over a spill run in many processes with exact results.

A pass maps every batch of the spill to a partial result (in any process: `map` sees one batch and what the
parent sent for the pass, `context`) and merges the partials in the parent, in the spill's order (`merge`). A metric
whose second pass needs what the first one learned about the whole corpus (CIDEr's document frequencies) has two
passes: `context(1)` hands the first pass's result to the second pass's maps. Partials are exact (integer counts,
exact float sums, rows for an on-disk table), so the result does not depend on how the spill was cut into batches
or spread over processes. `spilleval.metrics.parallel` runs the passes; `compute(reader)` runs them in-process.
"""

from __future__ import annotations

import tempfile
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..batch import SampleBatch
from .base import CorpusMetric
from .ondisk import SCRATCH_PREFIX, ScratchStore, _writable_or_none

if TYPE_CHECKING:
    from ..spill import SpillReader


class MapMergeMetric(CorpusMetric):
    """A corpus metric made of `passes` map/merge passes over the spill (see the module docstring).

    Lifecycle, in the parent: `start(near)`, then for each pass `context(k)` / `merge(k, partial)` in spill order,
    then `finish()`, and `close()` in any case. `map(k, batch, context)` runs wherever the batch is read."""

    passes: ClassVar[int] = 1
    _store: ScratchStore | None = None

    def start(self, near: Path) -> None:
        """Set up the parent's state; `near` is where scratch files may go (the spill directory)."""

    def context(self, pass_index: int) -> Any:
        """What pass `pass_index`'s maps need from the parent (picklable)."""
        return None

    @abstractmethod
    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> Any:
        """This batch's partial result (picklable, small as the batch)."""

    @abstractmethod
    def merge(self, pass_index: int, partial: Any) -> None:
        """Add one partial, in spill order."""

    @abstractmethod
    def finish(self) -> dict[str, float]: ...

    def scratch(self, near: Path) -> ScratchStore:
        """An on-disk scratch store (`ondisk.py`) for the parent's merged state, closed by `close`."""
        self._store = ScratchStore(near)
        return self._store

    def close(self) -> None:
        """Release scratch files (after `finish`, or on an error)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def compute(self, reader: "SpillReader") -> dict[str, float]:
        from .parallel import compute_corpus_metrics

        return compute_corpus_metrics(reader, [self])


def scratch_dir(near: Path) -> tempfile.TemporaryDirectory:
    """A private temporary directory next to the spill (or in TMPDIR when the spill is read-only)."""
    return tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=_writable_or_none(near))
