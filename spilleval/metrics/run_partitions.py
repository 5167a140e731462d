"""Merge many sorted runs in the worker processes, one key range each, instead of in the parent.

With 16 workers, the parent that merged every task's run alone was the bound: 1.8 s of its CPU time for CIDEr on
a 200k-token spill (reading small runs back, sorting, writing, merging, removing files), while the workers' share
of the same run took about 0.15 s each. Here the parent only lists the runs. To merge them it cuts the key space
into as many ranges as there are workers, at keys sampled from the runs (so the ranges hold similar numbers of
rows whatever the keys: hashes spread evenly, the `prefix_keys` of answers do not), and each worker merges the
stretch of every run that falls in its range (`merge_slices`). The result is one run per range: the ranges are
disjoint and in key order, so a key is in one run only (`NgramCounts` looks it up there alone) and reading the
runs one after the other reads the table in key order.

A range's job merges the stretches of all the runs at once, in one streaming merge (`ngram_table.merged_rounds`)
of rounds of RANGE_ROUND_BYTES: the job's memory is a round, whatever the range's rows. It used to adopt them
into a writer, which read the small stretches into its buffer, sorted and wrote them as runs, then merged those:
every row was sorted and written twice. On 2.56M tokens (2 cores, the 16 ranges one after the other) one merge
of 8 MiB rounds took CIDEr's 16.8M rows in 2.2 s instead of 5.0 s, distinct_n's 2.7M in 0.56 s instead of 0.82 s;
rounds of 1 MiB (the size of the parent's merges) took 0.78 s for distinct_n: a round costs Python calls per
stretch, and the 100-odd stretches of a range share it. A table read once at the end (`summarize_in_ranges`)
is not written at all: each job hands its range's counts to the metric's summary as the rounds come.

Cut points are hash values: every row of a hash is in one range, so keys whose hashes collide (or answers that
share their first 8 bytes) meet in one merge, and the counts are the sums over every run, as a single merge gives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .ngram_table import RunPart, RunPool, merged_rounds, new_run_path, summarize_rounds, write_merged

SAMPLES_PER_RANGE = 64  # keys sampled from the runs per range to cut: ranges within a few percent of even
MIN_RANGE_ROWS = 1 << 15  # rows per range, at least: a task per range costs a round trip and a few files
RANGE_ROUND_BYTES = 8 << 20  # input rows a key-range merge takes in each round from all its stretches (see below)


def merge_in_ranges(runs: Sequence[RunPart], directory: Path, pool: RunPool) -> list[RunPart]:
    """The rows of `runs` merged into runs of disjoint key ranges, in key order, written by the pool's workers
    into `directory`; the owned input runs are removed."""
    jobs = [(os.fspath(directory), job) for job in range_jobs(runs, pool.workers)]
    merged = pool.map(merge_slices, jobs) if len(jobs) > 1 else [merge_slices(*job) for job in jobs]
    for part in runs:
        part.discard()
    return [RunPart.whole(Path(path)) for path in merged]


def summarize_in_ranges(runs: Sequence[RunPart], pool: RunPool, summary: Callable[[Iterator[np.ndarray]], Any],
                        ) -> list[Any]:
    """`summary` of the counts of each key range of `runs` merged (`NgramCountWriter.summarize`), in key order,
    computed by the pool's workers as they merge; nothing is written, and the owned input runs are removed."""
    jobs = [(job, summary) for job in range_jobs(runs, pool.workers)]
    results = pool.map(summarize_slices, jobs) if len(jobs) > 1 else [summarize_slices(*job) for job in jobs]
    for part in runs:
        part.discard()
    return results


def range_jobs(runs: Sequence[RunPart], workers: int) -> list[list[tuple[str, int, int]]]:
    """The stretches (path, start, stop) of `runs` in each of up to `workers` key ranges of similar rows, in key
    order (ranges that hold no rows left out)."""
    total = sum(part.rows for part in runs)
    ranges = max(1, min(workers, total // MIN_RANGE_ROWS))
    opened = [part.open() for part in runs]
    cuts = cut_points([run.hashes for run in opened], ranges)
    stretches: list[list[tuple[str, int, int]]] = [[] for _ in range(len(cuts) + 1)]
    for part, run in zip(runs, opened):
        bounds = [0, *np.searchsorted(run.hashes, cuts, side="left").tolist(), len(run)]
        for index, (low, high) in enumerate(zip(bounds, bounds[1:])):
            if high > low:
                stretches[index].append((os.fspath(part.path), part.start + low, part.start + high))
        run.release()
    return [job for job in stretches if job]


def cut_points(hashes: Sequence[np.ndarray], ranges: int) -> np.ndarray:
    """Up to `ranges - 1` increasing hash values that cut the runs' sorted `hashes` into ranges of about equal
    rows: the quantiles of keys sampled evenly from each run, in proportion to its rows."""
    total = sum(len(h) for h in hashes)
    if ranges <= 1 or not total:
        return np.zeros(0, dtype=np.uint64)
    samples = []
    for run_hashes in hashes:
        wanted = -(-SAMPLES_PER_RANGE * ranges * len(run_hashes) // total)  # ceil
        samples.append(np.array(run_hashes[np.linspace(0, len(run_hashes) - 1, num=wanted).astype(np.int64)]))
    keys = np.sort(np.concatenate(samples))
    cuts = keys[(np.arange(1, ranges) * len(keys)) // ranges]
    return np.unique(cuts[cuts > keys[0]])  # a cut at the smallest key would leave its range empty


def merge_slices(directory: str, stretches: Sequence[tuple[str, int, int]]) -> str:
    """In a worker: the stretches (path, start, stop) of sorted runs merged into one new run in `directory`, its
    path returned. The stretches' runs are left in place (other ranges read them too)."""
    path = new_run_path(Path(directory))
    write_merged(path, _parts(stretches), RANGE_ROUND_BYTES)
    return os.fspath(path)


def summarize_slices(stretches: Sequence[tuple[str, int, int]], summary: Callable[[Iterator[np.ndarray]], Any],
                     ) -> Any:
    """In a worker: `summary` of the counts of the stretches (path, start, stop) of sorted runs, merged."""
    return summarize_rounds(merged_rounds(_parts(stretches), RANGE_ROUND_BYTES), summary)


def _parts(stretches: Sequence[tuple[str, int, int]]) -> list[RunPart]:
    return [RunPart(Path(path), start, stop, owned=False) for path, start, stop in stretches]
