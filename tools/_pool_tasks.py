"""Functions the benchmarks run in the recompute's pool workers. They live here, not in the tools' scripts: pool
workers do not import the parent's main script (`spilleval.metrics.pool.without_main`), so what a worker runs
must be importable by name, and this module imports nothing heavy (the workers of a user's compute import neither
torch nor transformers, and neither should the benchmark's)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from spilleval.metrics import compute_from_spill


def clear_caches(barrier: Any = None) -> None:
    """Empty every `functools.lru_cache` of this process (see tools/bench_scaling.py's docstring); with a barrier,
    wait for the other workers, so that each worker of a pool runs this once."""
    import functools
    import gc
    import warnings

    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        caches = [item for item in gc.get_objects() if isinstance(item, functools._lru_cache_wrapper)]
    for cache in caches:
        cache.cache_clear()
    if barrier is not None:
        barrier.wait(120)


def one_worker_compute(spill: Path, spec: dict[str, Any]) -> float:
    """In a pool worker: seconds of the metric computed alone in this process (`workers=1`)."""
    start = time.perf_counter()
    compute_from_spill(spill, [spec], workers=1)
    return time.perf_counter() - start


class Timing(NamedTuple):
    """One task, as its worker saw it."""

    kind: str  # `task_kind`
    pid: int
    start: float  # time.time()
    seconds: float
    cpu: float  # user + system seconds
    system: float
    minor_faults: int


def timed_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, Timing]:
    """In a worker: fn(*args) and its `Timing`."""
    start, before = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    out = fn(*args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return out, Timing(task_kind(fn, args), os.getpid(), start, time.time() - start, user + system, system,
                       after.ru_minflt - before.ru_minflt)


def task_kind(fn: Callable[..., Any], args: tuple) -> str:
    """`run_task` with the passes its sweep runs ("run_task (pass 2)"), or the function's name."""
    name = getattr(fn, "__name__", "?")
    if name == "run_task" and args[0].passes:
        return f"{name} (pass {'+'.join(str(index + 1) for _, index, _ in args[0].passes)})"
    return name
