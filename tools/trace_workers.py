"""Where a `--workers N` recompute spends its wall time: each task's start and length in its worker, how many
workers are busy in each 1/25 of the run, and the parent's steps (building the suite, the key-range merges).

    .venv/bin/python tools/trace_workers.py --tokens 640000 --workers 16 cider wer
    .venv/bin/python tools/trace_workers.py --tokens 640000 --workers 16 --processes 1 cider   # the plan's own cost

The spill is bench_compute's caption spill (a prefix of --tokens tokens). Each metric is run twice untimed (the
workers import its library and read the spill), then once traced. Busy workers per slice show idle cores and when
(the start, the switch between chunks, the step between CIDEr's passes, the last tasks); compare with
tools/bench_scaling.py, which times the same runs. Per kind of task (a sweep and the passes it runs, or a metric's
own jobs such as the key-range merges): tasks, wall and CPU seconds in the workers (`time.process_time`).

`--processes 1` runs the task plan of --workers workers (the same tasks and merges) on one worker process: on an
idle machine, its CPU seconds against `--workers 1` are the plan's own cost; against --workers processes, the rest is
the machine's (shared caches, memory bandwidth, clocks under load).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pool_tasks import Timing, timed_call  # noqa: E402
from bench_compute import CLASS_WORDS, PrefixSpills, caption_tokenizer, metric_specs  # noqa: E402

from spilleval.metrics import compute_from_spill, run_partitions, runner  # noqa: E402
from spilleval.metrics.pool import local_executor, process_pool, shutdown, usable_cores  # noqa: E402

SLICES = 25
PARENT_STEPS: list[tuple[str, float, float]] = []  # (step, start, seconds), in the parent


class TracingExecutor:
    """Submits each task wrapped in `timed_call` to `inner` and keeps the timings."""

    def __init__(self, inner: Executor) -> None:
        self.inner, self.log = inner, []

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        out: Future = Future()

        def done(future: Future) -> None:
            try:
                result, timing = future.result()
            except BaseException as error:  # noqa: BLE001 - handed to the caller's future
                out.set_exception(error)
                return
            self.log.append(timing)
            out.set_result(result)

        self.inner.submit(timed_call, fn, *args).add_done_callback(done)
        return out


def trace_parent_step(owner: Any, name: str) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            PARENT_STEPS.append((name, start, time.time() - start))

    setattr(owner, name, wrapper)


def busy_per_slice(log: list[Timing], start: float, wall: float) -> list[float]:
    edges = [start + wall * i / SLICES for i in range(SLICES + 1)]
    return [sum(max(0.0, min(b, t.start + t.seconds) - max(a, t.start)) for t in log) / (b - a)
            for a, b in zip(edges, edges[1:])]


def trace(pool: Executor, spill: Path, spec: dict[str, Any], workers: int) -> None:
    for _ in range(2):
        compute_from_spill(spill, [spec], executor=pool, workers=workers)
    tracing = TracingExecutor(pool)
    PARENT_STEPS.clear()
    start = time.time()
    compute_from_spill(spill, [spec], executor=tracing, workers=workers)
    wall = time.time() - start
    log = sorted(tracing.log, key=lambda timing: timing.start)
    busy = sum(t.seconds for t in log)
    print(f"wall {wall:.3f} s, {len(log)} tasks, {busy:.3f} s of task time (= {busy / wall:.1f} workers busy)")
    print(f"first task starts at +{log[0].start - start:.3f} s, the last ends at "
          f"+{max(t.start + t.seconds for t in log) - start:.3f} s")
    for name, at, seconds in PARENT_STEPS:
        print(f"  parent: {name} at +{at - start:.3f} s for {seconds:.3f} s")
    print(f"workers busy in each 1/{SLICES} of the run:",
          " ".join(f"{v:.0f}" for v in busy_per_slice(log, start, wall)))
    kinds: dict[str, list[Timing]] = {}
    for timing in log:
        kinds.setdefault(timing.kind, []).append(timing)
    for name, tasks in kinds.items():
        print(f"  {name}: {len(tasks)} tasks, {sum(t.seconds for t in tasks):.3f} s in all (CPU "
              f"{sum(t.cpu for t in tasks):.3f} s, of it system {sum(t.system for t in tasks):.3f} s; "
              f"{sum(t.minor_faults for t in tasks):,} minor page faults), "
              f"longest {max(t.seconds for t in tasks):.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+")
    parser.add_argument("--tokens", type=int, default=640_000, help="size of the caption spill's prefix")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="the task plan's workers")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: --workers)")
    args = parser.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for owner, name in ((runner, "suite_for_spill"), (run_partitions, "merge_in_ranges"),
                        (run_partitions, "summarize_in_ranges")):
        trace_parent_step(owner, name)
    tokenizer = caption_tokenizer()
    specs = metric_specs(tokenizer.convert_tokens_to_ids(list(CLASS_WORDS)))
    with tempfile.TemporaryDirectory(prefix="trace-workers-") as root:
        spills = PrefixSpills(Path(root), args.tokens, tokenizer, specs)
        spill = spills.get(args.tokens)
        processes = args.processes or args.workers
        pool = process_pool(1) if processes == 1 < args.workers else local_executor(processes)
        try:
            for name in args.metrics:
                print(f"== {name}: {spill.tokens:,} tokens, {spill.samples:,} samples, the plan of {args.workers} "
                      f"workers on {processes} process(es)")
                trace(pool, spill.path, specs[name], args.workers)
        finally:
            shutdown(pool)
            spills.close()


if __name__ == "__main__":
    main()
