"""The recompute's worker processes: how they start, and the in-process executor of one worker.

A pool's workers come from a forkserver that has imported what every task needs (`WORKER_PRELOAD`), run one
thread each (`one_thread_per_worker`), check that they run the parent's copy of spilleval, and do not import the
parent's main module (`without_main`) unless a metric registered there is needed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from multiprocessing import spawn
from typing import Any, Iterator

import pyarrow as pa
from threadpoolctl import threadpool_limits

from .registry import registered_in_main


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class InlineExecutor(Executor):
    """Runs each task when it is submitted, in this process: one worker, no pickling."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - re-raised by result(), as a pool would
            future.set_exception(error)
        return future


# What every worker imports, imported once by the forkserver that forks them (a missing one is skipped): each
# worker's first task otherwise imported them itself, 0.4 s of CPU per worker (16 workers on 2 cores: 3.6 s before
# the first results). pandas is never used, but pyarrow's `to_numpy` imports it when it is installed.
WORKER_PRELOAD = ("spilleval.metrics.parallel", "spilleval.metrics.builtin", "spilleval.spill",
                  "spilleval.spill.light_tokenizer", "tokenizers", "pandas")


def local_executor(workers: int) -> Executor:
    """`workers` processes (`process_pool`), or in-process for one."""
    return InlineExecutor() if workers <= 1 else process_pool(workers)


def process_pool(workers: int) -> WorkerPool:
    """`workers` processes, forked by a forkserver where there is one: workers start from a clean parent."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(list(WORKER_PRELOAD))
    return WorkerPool(max_workers=workers, mp_context=context, initializer=one_thread_per_worker,
                      initargs=(package_directory(),))


class WorkerPool(ProcessPoolExecutor):
    """A process pool whose workers start at its first task (a command that computes nothing, `spilleval diff` of
    two results files, starts no process), from a forkserver started off the working directory, and without the
    parent's main module (`without_main`). Workers start in `submit` (Python 3.9+ starts them as tasks come); whether
    they import the main module is decided at the first task, so every worker of the pool starts alike."""

    _started = False
    _needs_main = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        if not self._started:
            if self._mp_context.get_start_method() == "forkserver":
                start_forkserver_off_the_working_directory()
            self._needs_main = registered_in_main()
            self._started = True
        with without_main(unless=self._needs_main):
            return super().submit(fn, *args, **kwargs)


_SPAWNING = threading.local()  # `skip_main`: this thread is starting a pool's workers, which skip the main module
_STDLIB_PREPARATION_DATA = spawn.get_preparation_data


@contextlib.contextmanager
def without_main(*, unless: bool = False) -> Iterator[None]:
    """Processes that this thread starts meanwhile do not import the parent's main module, unless `unless`.

    multiprocessing's forkserver and spawn children run the parent's main script (as `__mp_main__`) before their
    first task, so that functions and classes defined there can be unpickled. The tasks name none: they are
    spilleval's functions, and metrics are rebuilt by name from modules the workers import. Run from a training
    script, each worker imported torch, transformers and the user's model code (2 s of CPU and a few hundred MB
    each), and from a script without an `if __name__ == "__main__":` guard, each worker ran the whole script
    again: the training too, until multiprocessing refused to start a process from it. A metric registered in the
    main module (`unless`) needs it: its class is found there. Filters what `multiprocessing.spawn` sends a child
    (`get_preparation_data`: the main module's name or path), for this thread only."""
    _install_preparation_filter()
    before = getattr(_SPAWNING, "skip_main", False)
    _SPAWNING.skip_main = not unless
    try:
        yield
    finally:
        _SPAWNING.skip_main = before


def _install_preparation_filter() -> None:
    if spawn.get_preparation_data is not _preparation_data:
        spawn.get_preparation_data = _preparation_data


def _preparation_data(name: str) -> dict[str, Any]:
    data = _STDLIB_PREPARATION_DATA(name)
    if getattr(_SPAWNING, "skip_main", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


def start_forkserver_off_the_working_directory() -> None:
    """Start the forkserver, if it is not running, with PYTHONSAFEPATH=1. It runs `python -c`, which puts the
    working directory first on its path, and CPython imports the preload there, not on this process's path: run
    from a directory holding another copy of spilleval (a checkout), the workers ran that copy's code under this
    one's parent (seen: a benchmark of an older tree got the newer tree's workers). Python 3.10 ignores the
    variable; the workers' check (`one_thread_per_worker`) then names the problem."""
    from multiprocessing import forkserver

    before = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = before


def package_directory() -> str:
    """Where this process imported spilleval from."""
    import spilleval

    return os.path.dirname(os.path.abspath(spilleval.__file__))


def one_thread_per_worker(parent_package: str | None = None) -> None:
    """A pool worker runs on one core: the Rust tokenizer's `decode_batch` (rayon), Arrow's thread pool and numpy's
    BLAS would each start a thread per core in every worker, 16 x 16 threads on 16 cores, contending instead of
    scaling (the bootstrap replicates' matrix products through OpenBLAS made chrF's 16 workers do 3.7x the CPU work
    of 16 single-threaded ones). One worker in-process keeps their threads. `parent_package`: the parent's
    spilleval directory, which must be the worker's (else its numbers would be another version's)."""
    if parent_package is not None and package_directory() != parent_package:
        raise RuntimeError(f"this worker process imported spilleval from {package_directory()}, its parent from "
                           f"{parent_package}: two copies of the library would compute one result. Run from a "
                           "directory that holds no other copy of spilleval (Python before 3.11 puts the working "
                           "directory first on a worker's path)")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizers library at each call
    os.environ["RAYON_NUM_THREADS"] = "1"
    pa.set_cpu_count(1)
    threadpool_limits(1)  # the BLAS and OpenMP pools loaded so far (numpy's, by the forkserver's preload)


@contextlib.contextmanager
def worker_pool(workers: int | None, executor: Executor | None = None) -> Iterator[tuple[Executor, int]]:
    """(executor, workers): `executor` as given (a Dask client...), or a local pool of `workers` processes (None:
    every usable core) that is shut down on leaving."""
    if executor is not None:
        yield executor, workers or 1
        return
    pool, count = default_executor(workers)
    try:
        yield pool, count
    finally:
        shutdown(pool)


def default_executor(workers: int | None) -> tuple[Executor, int]:
    """(executor, workers) for `workers` local processes (None: every usable core)."""
    count = usable_cores() if workers is None else workers
    if count < 1:
        raise ValueError(f"workers must be at least 1, got {count}")
    return local_executor(count), count


def shutdown(executor: Executor) -> None:
    if not isinstance(executor, InlineExecutor):
        executor.shutdown(wait=True, cancel_futures=True)

