"""Merge many sorted runs in the worker processes, one key range each, instead of in the parent.

With 16 workers, the parent that merged every task's run alone was the bound: 1.8 s of its CPU time for CIDEr on
a 200k-token spill (reading small runs back, sorting, writing, merging, removing files), while the workers' share
of the same run took about 0.15 s each. Here the parent only lists the runs. To merge them it cuts the key space
into as many ranges as there are workers, at keys sampled from the runs (so the ranges hold similar numbers of
rows whatever the keys: hashes spread evenly, the `prefix_keys` of answers do not), and each worker merges the
stretch of every run that falls in its range (`merge_slices`). The result is one run per range: the ranges are
disjoint and in key order, so a key is in one run only (`NgramCounts` looks it up there alone) and reading the
runs one after the other reads the table in key order.

A range's job merges the stretches of all the runs at once, in one streaming merge (`ngram_table.merged_rounds`) of
rounds of RANGE_ROUND_BYTES, reading each run's blocks with `pread` (`run_file.RowReader`), so the job's memory is a
round (at least MIN_MERGE_BLOCK rows of each run), whatever its range's rows. It used to adopt them into a writer,
which read the small stretches into its buffer, sorted and wrote them as runs, then merged those: every row
was sorted and written twice. Measured on 2 cores, 2.56M tokens, the 16 ranges one after the other, alternating with
the old code: CIDEr's 16.8M rows 3.35-3.75 s instead of 5.76-6.12 s, distinct_n's 2.7M 0.57-0.66 s instead of
0.97-1.14 s, answer_macro_f1's 0.23-0.24 s instead of 0.38-0.43 s. A round costs Python calls per stretch, which the
100-odd stretches of a range share: rounds of 1 MiB (the parent's merges) took distinct_n 1.35x the time of 8 MiB. A
table read once at the end (`summarize_in_ranges`) is not written at all: each job hands its range's counts to the
metric's summary as the rounds come.

Cut points are hash values: every row of a hash is in one range, so keys whose hashes collide (or answers that
share their first 8 bytes) meet in one merge, and the counts are the sums over every run, as a single merge gives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .ngram_table import RunPart, RunPool, merged_rounds, new_run_path, summarize_rounds, write_merged

SAMPLES_PER_RANGE = 64  # keys sampled from the runs per range to cut: ranges within a few percent of even...
MIN_RUN_SAMPLES = 4  # ... and from each run at least this many per range (`cut_points`)
_GOLDEN = (5**0.5 - 1) / 2  # run i's samples are shifted by i x this, modulo one stretch: shifts spread evenly
MIN_RANGE_ROWS = 1 << 15  # rows per range, at least: a task per range costs a round trip and a few files
RANGE_ROUND_BYTES = 8 << 20  # input rows a key-range merge takes in each round from all its stretches (see above):
# a worker's peak is about 26 MB higher than with 1 MiB rounds (the round, its sort and its output), whatever the spill


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
    rows: the weighted quantiles of keys sampled from the middles of equal stretches of each run, in proportion
    to its rows and at least a few per range from every run, each sample weighing the rows of its stretch.

    The runs of a table's tasks hold keys of the same distribution, so samples taken at the same places in every
    run fall at the same quantiles: each run's are shifted by its own fraction of a stretch. Taken from a run's
    first key to its last, few samples per run made ranges whose rows differed by a factor of 2 or more (80 runs,
    2 ranges: a cut above 99% of the keys; 16 ranges of 116 runs: 0.0 to 1.5 times the mean); at the middles of
    the stretches, within 12% (a cut at the 9/16 quantile where the 8 samples of each run were at odd 16ths)."""
    total = sum(len(h) for h in hashes)
    if ranges <= 1 or not total:
        return np.zeros(0, dtype=np.uint64)
    samples, weights = [], []
    for index, run_hashes in enumerate(hashes):
        rows = len(run_hashes)
        wanted = min(rows, max(-(-SAMPLES_PER_RANGE * ranges * rows // total), MIN_RUN_SAMPLES * ranges))
        if wanted:
            phase = (index * _GOLDEN) % 1.0  # each run sampled at other quantiles than the others
            samples.append(np.array(run_hashes[((np.arange(wanted) + phase) * rows / wanted).astype(np.int64)]))
            weights.append(np.full(wanted, rows / wanted))
    keys, weight = np.concatenate(samples), np.concatenate(weights)
    order = np.argsort(keys, kind="stable")
    keys, below = keys[order], np.cumsum(weight[order])
    cuts = keys[np.minimum(np.searchsorted(below, np.arange(1, ranges) * total / ranges), len(keys) - 1)]
    return np.unique(cuts[cuts > keys[0]])  # a cut at the smallest key would leave its range empty


def merge_slices(directory: str, stretches: Sequence[tuple[str, int, int]]) -> str:
    """In a worker: the stretches (path, start, stop) of sorted runs merged into one new run in `directory`, its
    path returned. The stretches' runs are left in place (other ranges read them too)."""
    path = new_run_path(Path(directory))
    write_merged(path, _parts(stretches), RANGE_ROUND_BYTES, release=True)
    return os.fspath(path)


def summarize_slices(stretches: Sequence[tuple[str, int, int]], summary: Callable[[Iterator[np.ndarray]], Any],
                     ) -> Any:
    """In a worker: `summary` of the counts of the stretches (path, start, stop) of sorted runs, merged."""
    return summarize_rounds(merged_rounds(_parts(stretches), RANGE_ROUND_BYTES, release=True), summary)


def _parts(stretches: Sequence[tuple[str, int, int]]) -> list[RunPart]:
    return [RunPart(Path(path), start, stop, owned=False) for path, start, stop in stretches]
