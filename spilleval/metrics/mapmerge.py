"""Corpus metrics as map/merge passes, so their passes over a spill run in many processes with exact results.

A pass maps every batch of the spill to a partial result (in any process: `map` sees one batch and what the
parent sent for the pass, `context`) and merges the partials in the parent, in the spill's order (`merge`). A metric
whose second pass needs what the first one learned about the whole corpus (CIDEr's document frequencies) has two
passes: `context(1)` hands the first pass's result to the second pass's maps. Partials are exact (integer counts,
exact float sums, rows for an on-disk table), so the result does not depend on how the spill was cut into batches
or spread over processes. `spilleval.metrics.parallel` runs the passes; `compute(reader)` runs them in-process.

A task (a contiguous row range, `parallel.Task`) maps its batches one by one, then hands their partials to
`reduce_task`, in the same process, and what that returns travels to the parent. By default the partials travel as
they are; a metric whose partials are rows of an on-disk table (distinct n-grams, document frequencies, answers)
writes the task's rows there as sorted runs (`ngram_table.write_runs`, one run per task rather than per batch) in a
scratch directory the parent made (`scratch_directory`, its path sent in `context`), and returns only the runs'
paths and a few scalars: the parent merges runs, never rows, so its share of a task does not grow with the task.
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
    from .ngram_table import RunPool


class MapMergeMetric(CorpusMetric):
    """A corpus metric made of `passes` map/merge passes over the spill (see the module docstring).

    Lifecycle, in the parent: `start(near)`, then for each pass `context(k)` / `merge(k, partial)` in spill order,
    then `finish()`, and `close()` in any case. `map(k, batch, context)` runs wherever the batch is read. `pool`
    (set before `start`) runs the metric's own tasks on the same workers, e.g. merges of on-disk runs."""

    passes: ClassVar[int] = 1
    pool: "RunPool | None" = None

    @property
    def task_rows(self) -> int:
        """Rows a task of this metric's sweeps should hold at least (`parallel.TaskPlanner`): one of its batches.
        A task costs more than its batches: its runs are written, then opened by every key-range merge, and
        CIDEr's lookups of small batches' sparser keys cost more per key. On 2.56M tokens, 16 workers' tasks of
        64 rows at least did 1.6x (cider) and 2.6x (distinct_n) one worker's CPU time, tasks of a batch 1.2x
        and 1.5x (their plan run in one process)."""
        return int(getattr(self, "batch_size", 1024))

    _store: ScratchStore | None = None
    _directory: tempfile.TemporaryDirectory | None = None

    def start(self, near: Path) -> None:
        """Set up the parent's state; `near` is where scratch files may go (the spill directory)."""

    def context(self, pass_index: int) -> Any:
        """What pass `pass_index`'s maps need from the parent (picklable)."""
        return None

    @abstractmethod
    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> Any:
        """This batch's partial result (picklable, small as the batch)."""

    def reduce_task(self, pass_index: int, partials: list[Any], context: Any) -> list[Any]:
        """The partials of one task's batches, in order, made into what travels to the parent (in the process
        that mapped them): the partials `merge` receives. By default, the batches' partials as they are."""
        return partials

    @abstractmethod
    def merge(self, pass_index: int, partial: Any) -> None:
        """Add one partial (as `reduce_task` returned it), in spill order."""

    @abstractmethod
    def finish(self) -> dict[str, float]: ...

    def scratch(self, near: Path) -> ScratchStore:
        """An on-disk scratch store (`ondisk.py`) for the parent's merged state, closed by `close`."""
        self._store = ScratchStore(near)
        return self._store

    def scratch_directory(self, near: Path) -> Path:
        """A private directory next to the spill (`scratch_dir`) for files that workers write and the parent
        reads, removed with everything in it by `close`."""
        self._directory = scratch_dir(near)
        return Path(self._directory.name)

    def close(self) -> None:
        """Release scratch files (after `finish`, or on an error)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def compute(self, reader: "SpillReader") -> dict[str, float]:
        from .parallel import compute_corpus_metrics

        return compute_corpus_metrics(reader, [self])


def scratch_dir(near: Path) -> tempfile.TemporaryDirectory:
    """A private temporary directory next to the spill (or in TMPDIR when the spill is read-only)."""
    return tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=_writable_or_none(near))
