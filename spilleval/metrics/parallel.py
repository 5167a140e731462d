"""Recompute metrics over a spill in many processes, exactly: map row ranges of chunks to workers, merge in order.

The parent cuts the spill into tasks (a row range of one chunk, with the rows that repeat an earlier sample
dropped, as `SpillReader.iter_chunks` drops them) and runs them as sweeps: the first sweep updates the streaming
metrics and runs the first pass of every map/merge corpus metric (`mapmerge.py`); later sweeps run later passes
(CIDEr's scores need the document frequencies of the whole corpus, which the first sweep made). A worker opens its
own `SpillReader`, reads the record batches that hold a task's rows (keeping its last chunk open, the parent having
checked the chunk's CRC-32: memory is a few record batches per worker), decodes once per batch, and returns the
streaming metrics' states and each corpus metric's partial for its rows. The parent merges them in task order.
States are integer counts and exact float sums, so the results are the same bits whatever the number of workers or
the task boundaries. A corpus metric that only implements `compute(reader)`
(a user's own) runs in the parent after the sweeps.

Executors (`pool.py`): in-process (one worker), a local process pool (`concurrent.futures`, forkserver), or
anything with `submit(fn, *args) -> future` such as a Dask `Client` (`spilleval.metrics.cluster`). At most `2 x
workers` tasks are unfinished and `4 x workers` held (finished ones wait to be merged in order), so the parent holds
a bounded number of partials.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import signal
import threading
from collections import deque
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from ..batch import SampleBatch
from ..decode import decode_batch
from ..progress import sample_bar
from ..sampleset import SampleSet
from .base import CorpusMetric, Metric, State
from .mapmerge import MapMergeMetric
from .pool import InlineExecutor
from .registry import import_modules, registering_modules

if TYPE_CHECKING:
    from ..intervals.tally import ReplicatePass
    from ..spill import SpillReader
    from .runner import MetricSuite

TASKS_PER_WORKER = 4  # a task takes 1/(this x workers) of the rows still to plan (guided sizes, `TaskPlanner`)
MIN_TASK_ROWS = 64  # a task costs a pickled round trip: a few hundred microseconds
TAIL_TASKS_PER_WORKER = 8  # a corpus sweep's smallest tasks: 1/(this x workers) of the spill, or a batch if less
RUNNING_PER_WORKER = 2  # tasks submitted and not finished, per worker: each worker has its next task queued
HELD_PER_WORKER = 4  # tasks held by the parent, finished or not, per worker: the bound on the partials it holds
UNREAD_STATUS = 255  # what multiprocessing gives as a forkserver child's exit code when its status was not read


class WorkerLostError(RuntimeError):
    """A worker process of the recompute died without returning its task (the kernel's out-of-memory killer, most
    often); `spilleval compute` prints it as one line with the fix."""


# ----------------------------------------------------------------------------------------------- what travels
@dataclass(frozen=True)
class Task:
    """Rows [start, stop) of chunk `chunk` (an index into `SpillReader.chunks`); `keep`: the rows of that range
    to use when some repeat an earlier sample (positions in the chunk), None for all."""

    chunk: int
    start: int
    stop: int
    keep: np.ndarray | None = None


@dataclass(frozen=True)
class Sweep:
    """What every task of one sweep does; picklable, sent with each task."""

    spill_dir: str
    allow_partial: bool
    spill_state: str  # `spill_state(reader)`: what a worker's cached reader, suite and chunk must have been made from
    specs: tuple[dict[str, Any], ...]  # every metric of the suite, rebuilt in the worker
    modules: tuple[str, ...]  # modules that register them (custom metrics), imported first in the worker
    streaming: bool  # update the streaming metrics (the first sweep)
    passes: tuple[tuple[int, int, Any], ...]  # (metric position in specs, pass index, context)
    batch_size: int
    reads: dict[str, Any] = field(default_factory=dict)
    local_suite: Any = None  # in-process only: copies of the parent's metric objects, used instead of the specs
    local_reader: Any = None  # in-process only: the parent's reader (its tokenizer is loaded already)
    replicates: Any = None  # a ReplicateRequest (`intervals.tally`): the streaming metrics' replicates too


@dataclass
class TaskResult:
    """What a task sends back: the streaming metrics' states, each corpus metric's partials for its rows, and the
    replicates' partial when the sweep asked for them."""

    states: list[State]
    partials: list[Any]
    replicates: Any = None


# ----------------------------------------------------------------------------------------------- the worker side
_WORKER: dict[str, Any] = {}  # per process: readers and suites by sweep, the last chunk read


def run_task(sweep: Sweep, task: Task) -> TaskResult:
    """Streaming states and corpus partials of one task's rows (in a worker, or in-process)."""
    from .runner import check_batch_inputs

    reader = _reader(sweep)
    suite = _suite(sweep, reader)
    suite.reset()
    tally = sweep.replicates.tally(suite) if sweep.streaming and sweep.replicates is not None else None
    partials: list[list[Any]] = [[] for _ in sweep.passes]
    metrics = [suite.metrics[position] for position, _, _ in sweep.passes]
    checked = False
    for batch in _task_batches(reader, sweep, task):
        if not checked and sweep.streaming:  # corpus metrics name what they miss themselves
            check_batch_inputs(suite.streaming, batch)
            checked = True
        if tally is not None:
            tally.update(batch)
        elif sweep.streaming:
            suite.update_streaming(batch)
        for i, (metric, (_, pass_index, context)) in enumerate(zip(metrics, sweep.passes)):
            partials[i].append(metric.map(pass_index, batch, context))
    reduced = [metric.reduce_task(pass_index, task_partials, context)
               for metric, (_, pass_index, context), task_partials in zip(metrics, sweep.passes, partials)]
    replicates = tally.partial() if tally is not None else None  # first: it completes the metrics' states
    give_back_arrow_memory()
    return TaskResult(suite.states() if sweep.streaming else [], reduced, replicates)


def give_back_arrow_memory() -> None:
    """Return to the OS the pages Arrow's memory pool (mimalloc, jemalloc) keeps from buffers freed since the last
    call. Kept, they pile up from task to task: over the 80 tasks of CIDEr's second pass on 20,000 samples the
    RSS crept up by 14 MB while Arrow's allocated bytes and glibc's heap stayed flat, so a process's footprint
    grew with the number of tasks. Given back after each task (about 0.3 ms), it is one task's."""
    pa.default_memory_pool().release_unused()


def _reader(sweep: Sweep) -> "SpillReader":
    from ..spill import SpillReader

    if sweep.local_reader is not None:
        return sweep.local_reader
    key = ("reader", sweep.spill_dir, sweep.spill_state, sweep.allow_partial)
    if key not in _WORKER:
        _WORKER[key] = SpillReader(sweep.spill_dir, allow_partial=sweep.allow_partial)
    return _WORKER[key]


def _suite(sweep: Sweep, reader: "SpillReader") -> "MetricSuite":
    from .runner import MetricSuite

    if sweep.local_suite is not None:
        return sweep.local_suite
    key = ("suite", sweep.spill_dir, sweep.spill_state, repr(sweep.specs))
    if key not in _WORKER:
        import_modules(sweep.modules)
        suite = MetricSuite(list(sweep.specs))
        threadpool_limits(1)  # and those the metrics' libraries loaded since
        # checked against the vocabulary here (the parent does not load it); light: no torch import in a worker
        suite.tokenizer = reader.require_tokenizer(light=True) if suite.needs_text else None
        _WORKER[key] = suite
    return _WORKER[key]


def _task_batches(reader: "SpillReader", sweep: Sweep, task: Task) -> Iterator[SampleBatch]:
    """The task's rows in batches of `sweep.batch_size`, decoded when a metric of the sweep reads text. A worker
    keeps its last chunk open and checked (`ChunkRows`) and converts one batch of rows at a time, reading and decoding
    only the record batches that hold them: a batch aligned with them is their buffers, with no copy of the chunk."""
    from ..spill.chunk import ChunkRows

    record = reader.chunks[task.chunk]
    key = ("chunk", sweep.spill_dir, sweep.spill_state, task.chunk, repr(sorted(sweep.reads.items())))
    cached = _WORKER.get("chunk")
    if cached is None or cached[0] != key:
        if cached is not None:  # drop the last chunk before reading the next: one chunk per worker
            _WORKER.pop("chunk")[1].close()
        # tokens.arrow's CRC-32 was checked in the parent by `TaskPlanner.tasks`, which reads each chunk's sample
        # indices before handing out its rows
        chunk = ChunkRows(reader.chunk_path(record), record, verify=reader.verify, tokens_verified=True,
                          **sweep.reads)
        _WORKER["chunk"] = cached = (key, chunk)
    suite = _suite(sweep, reader)
    decode = any(m.needs_text for m in suite.metrics)
    for start in range(task.start, task.stop, sweep.batch_size):
        stop = min(start + sweep.batch_size, task.stop)
        batch = cached[1].rows(start, stop).to_batch()
        if task.keep is not None:
            kept = task.keep[(task.keep >= start) & (task.keep < stop)]
            if not len(kept):
                continue
            batch = batch.take(kept - start)
        yield decode_batch(batch, suite.tokenizer) if decode else batch


# ----------------------------------------------------------------------------------------------- the parent side

class TaskPool:
    """A metric's own tasks on the sweep's executor (`ngram_table.RunPool`): merges of on-disk runs, one key range
    per worker, between passes (`run_partitions.py`)."""

    def __init__(self, executor: Executor, workers: int) -> None:
        self.executor = executor
        self.workers = workers if not isinstance(executor, InlineExecutor) else 1

    def map(self, fn: Any, jobs: Sequence[tuple]) -> list[Any]:
        """[fn(*job) for job in jobs], run by the workers; on an error, the others are waited for, then it is
        raised (they may be writing into a scratch directory that is about to be removed)."""
        futures = [self.executor.submit(fn, *job) for job in jobs]
        try:
            return [future.result() for future in futures]
        finally:
            _settle(futures)


def compute_in_parallel(reader: "SpillReader", suite: "MetricSuite", *, executor: Executor, workers: int,
                        batch_size: int = 4096, progress: bool = False,
                        replicates: "ReplicatePass | None" = None) -> dict[str, float]:
    """Every metric of `suite` over the spill (streaming and corpus), tasks run by `executor`. `replicates`: the
    first sweep also gathers the streaming metrics' bootstrap replicates into it (`intervals.tally`)."""
    from .runner import merge_results

    suite.reset()
    corpus = [m for m in suite.corpus if isinstance(m, MapMergeMetric)]
    parent_only = [m for m in suite.corpus if not isinstance(m, MapMergeMetric)]
    planner = TaskPlanner(reader, workers)
    local = _local_copy(suite) if isinstance(executor, InlineExecutor) else None
    try:
        for metric in corpus:
            metric.pool = TaskPool(executor, workers)
            metric.start(reader.path)
        rounds = max([m.passes for m in corpus], default=0)
        for sweep_index in range(max(rounds, 1 if suite.streaming else 0)):
            taking_part = [(suite.metrics.index(m), m) for m in corpus if m.passes > sweep_index]
            sweep = _sweep(reader, suite, streaming=sweep_index == 0 and bool(suite.streaming),
                           passes=tuple((pos, sweep_index, m.context(sweep_index)) for pos, m in taking_part),
                           batch_size=batch_size, local_suite=local,
                           replicates=replicates.request if replicates is not None else None)
            names = [m.name for m in suite.streaming] if sweep.streaming else []
            names += [m.name for _, m in taking_part]
            label = ", ".join(names) + (f" (pass {sweep_index + 1})" if sweep_index else "")
            tasks = planner.tasks(min_rows=min_task_rows(m for _, m in taking_part))
            with sample_bar(reader.num_rows, label, enabled=progress) as advance, \
                    contextlib.closing(_ordered(executor, sweep, tasks, workers)) as results:
                for task, result in results:
                    if sweep.streaming:
                        suite.merge(result.states)
                        if result.replicates is not None:
                            replicates.merge(result.replicates)
                    for (_, metric), metric_partials in zip(taking_part, result.partials):
                        for partial in metric_partials:
                            metric.merge(sweep_index, partial)
                    give_back_arrow_memory()  # the merges' buffers (runs merged here), as a worker does its task's
                    advance(task.stop - task.start if task.keep is None else len(task.keep))
        out = suite.compute_streaming()
        return merge_results([out, *(suite.computed(m, m.finish()) for m in corpus),
                              *(suite.computed(m, m.compute(reader)) for m in parent_only)])
    except BrokenProcessPool as e:
        raise _lost_worker(executor, workers) from e
    finally:
        for metric in corpus:
            metric.close()


def _lost_worker(executor: Executor, workers: int) -> WorkerLostError:
    """What to tell when a pool worker died: how (its exit code, where the pool still knows it) and the fix."""
    codes = sorted({p.exitcode for p in (getattr(executor, "_processes", None) or {}).values() if p.exitcode})
    # not the cause: the SIGTERM the pool sends the other workers once one is lost, and 255, a forkserver child's
    # status where the parent could not read it (`popen_forkserver.Popen.poll`; 10 of 150 runs of a SIGKILLed one)
    codes = [code for code in codes if code not in (-signal.SIGTERM, UNREAD_STATUS)] or \
        [code for code in codes if code == -signal.SIGTERM]
    how = ", ".join(_exit_name(code) for code in codes)
    fewer = f"fewer workers (--workers {workers // 2}), or " if workers // 2 > 1 else ""
    cause = _OWN_ERROR if codes and all(code > 0 for code in codes) else _MEMORY
    return WorkerLostError(
        f"a worker process of the recompute stopped before returning its task{f' ({how})' if how else ''}; the "
        f"spill is unchanged. {cause} Run with {fewer}--workers 1 to compute in this process"
    )


_MEMORY = "The usual cause is memory: the kernel's out-of-memory killer ends the largest process."
# a worker that exits with a code of its own was not killed: it failed, and printed why
_OWN_ERROR = ("It exited on an error of its own, printed above by the worker. One that fails as it starts is often a "
              "script without `if __name__ == \"__main__\":` that registers a metric: the workers import that script "
              "to find the metric, and it runs again in each of them.")


def _exit_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def compute_corpus_metrics(reader: "SpillReader", metrics: Sequence[CorpusMetric], *,
                           executor: Executor | None = None, workers: int = 1) -> dict[str, float]:
    """Only corpus metrics (the streaming ones were updated live): `MetricSuite.compute_corpus`."""
    from .runner import MetricSuite

    suite = MetricSuite(list(metrics), tokenizer=reader.tokenizer if any(m.needs_text for m in metrics) else None)
    return compute_in_parallel(reader, suite, executor=executor or InlineExecutor(), workers=workers)


def min_task_rows(metrics: Iterable[Metric]) -> int:
    """Rows a task of a sweep holds at least: the largest `task_rows` of its map/merge metrics (0: none)."""
    return max([m.task_rows for m in metrics if isinstance(m, MapMergeMetric)], default=0)


def _local_copy(suite: "MetricSuite") -> "MetricSuite":
    """The suite's metrics copied before the parent starts them, for in-process tasks (no spec round trip, so a
    metric object that is not registered by name works too)."""
    from .runner import MetricSuite

    return MetricSuite([copy.deepcopy(m) for m in suite.metrics], tokenizer=suite.tokenizer)


def spill_state(reader: "SpillReader") -> str:
    """A digest of the spill's chunk records (names, rows, sample ranges, files' lengths and CRC-32s). A worker keeps
    its reader, suite and last chunk between tasks and between computes; they are reused only for the same state of
    the same spill: compaction gives other rows an old chunk's (rank, seq), a resumed run adds chunks."""
    return hashlib.blake2b(repr(reader.chunks).encode(), digest_size=16).hexdigest()


def _sweep(reader: "SpillReader", suite: "MetricSuite", *, streaming: bool, passes: tuple, batch_size: int,
           local_suite: "MetricSuite | None", replicates: Any) -> Sweep:
    taking_part: list[Metric] = [suite.metrics[pos] for pos, _, _ in passes]
    if streaming:
        taking_part += suite.streaming
    sizes = [getattr(m, "batch_size", batch_size) for m in taking_part]
    return Sweep(
        spill_dir=os.fspath(reader.path), allow_partial=reader.allow_partial, spill_state=spill_state(reader),
        specs=tuple(m.spec() for m in suite.metrics),
        modules=registering_modules(suite.metrics),
        streaming=streaming, passes=passes, batch_size=min([batch_size, *sizes]), local_suite=local_suite,
        local_reader=reader if local_suite is not None else None, replicates=replicates if streaming else None,
        reads={"columns": sorted({c for m in taking_part for c in m.needs_columns}),
               "with_arrays": any(m.needs_arrays for m in taking_part),
               "with_logprob": any(m.needs_logprob for m in taking_part)},
    )


def _ordered(executor: Executor, sweep: Sweep, tasks: Iterable[Task], workers: int
             ) -> Iterator[tuple[Task, TaskResult]]:
    """(task, result of `run_task`) in task order. Up to RUNNING_PER_WORKER x workers tasks are unfinished at a
    time, and up to HELD_PER_WORKER x workers held: tasks that finish while an earlier one still runs wait to be
    merged, and the workers go on with later ones. (With one bound for both, a slow task at the head stopped new
    submissions once the others had finished, and the workers idled: guided task sizes put the largest task at the
    head.) Tasks are planned as they are submitted: the workers start while the parent still reads the later chunks'
    sample indexes. Closed early (an error), it cancels the tasks in flight and waits for those already running:
    they may be writing into the metrics' scratch directories, which must not be removed under them."""
    running_cap, held_cap = RUNNING_PER_WORKER * max(workers, 1), HELD_PER_WORKER * max(workers, 1)
    held: deque[tuple[Task, Future]] = deque()
    planned = iter(tasks)
    more = True
    finished = threading.Event()  # set by each task's future when it is done (a pool's, or a Dask client's)
    try:
        while True:
            finished.clear()  # before the count: a task done after it sets the event again
            unfinished = sum(not future.done() for _, future in held)
            while more and len(held) < held_cap and unfinished < running_cap:
                task = next(planned, None)
                if task is None:
                    more = False
                    break
                future = executor.submit(run_task, sweep, task)
                future.add_done_callback(lambda _: finished.set())
                held.append((task, future))
                unfinished += 1
            if not held:
                return
            task, future = held[0]
            if future.done() or not more or len(held) >= held_cap:
                held.popleft()
                yield task, future.result()
            else:  # room for more once any task finishes
                finished.wait()
    finally:
        _settle(future for _, future in held)


def _settle(futures: Iterable[Future]) -> None:
    """Cancel what has not started and wait for the rest, ignoring their results and errors."""
    futures = list(futures)
    for future in futures:
        future.cancel()
    for future in futures:
        if not future.cancelled():  # waits with `exception()`, not `result()`: raising one error (a broken pool's)
            with contextlib.suppress(Exception):  # per future grew its traceback, to hundreds of lines
                future.exception()


class TaskPlanner:
    """Cuts the spill into tasks: row ranges of chunks, with the rows that repeat an earlier sample left out.

    Guided sizes: a task takes 1/(TASKS_PER_WORKER x workers) of the rows not planned yet, so the sweep starts with
    large tasks (few round trips) and ends with small ones (the workers finish together: the last task a worker
    takes is short). One worker: a task per chunk."""

    def __init__(self, reader: "SpillReader", workers: int) -> None:
        self.reader = reader
        self.workers = workers

    def task_rows(self, remaining: int, min_rows: int = 0) -> int:
        if self.workers <= 1:
            return max(remaining, 1)
        return max(min_rows, MIN_TASK_ROWS, math.ceil(remaining / (self.workers * TASKS_PER_WORKER)))

    def tasks(self, min_rows: int = 0) -> Iterator[Task]:
        """The tasks of one sweep, of `min_rows` rows at least (its corpus metrics' `task_rows`), or fewer where
        the spill has too few rows for TAIL_TASKS_PER_WORKER of them per worker: the last tasks must be short for
        the workers to finish together (16 workers with tasks of 4,096 rows on 146k samples: 36 tasks, and for
        the last quarter of the sweep 3-8 of the 16 workers were busy). Reading each chunk's sample indices checks
        its tokens.arrow (length, CRC-32 unless the reader skips them, headers) before any task of it is handed out:
        the workers do not check the CRC again."""
        from ..spill.chunk import read_sample_index

        seen = SampleSet()
        remaining = sum(record.rows for record in self.reader.chunks)
        min_rows = min(min_rows, remaining // (TAIL_TASKS_PER_WORKER * max(self.workers, 1)))
        for position, record in enumerate(self.reader.chunks):
            index = read_sample_index(self.reader.chunk_path(record), record, verify=self.reader.verify)
            keep = seen.first_occurrences(index)
            kept = None if keep is None else np.flatnonzero(keep)
            start = 0
            while start < record.rows:
                stop = min(start + self.task_rows(remaining, min_rows), record.rows)
                remaining -= stop - start
                rows = None if kept is None else kept[(kept >= start) & (kept < stop)]
                if rows is None or len(rows):
                    yield Task(position, start, stop, rows)
                start = stop
