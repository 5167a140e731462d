"""Recompute in worker processes (`spilleval.metrics.parallel`) and on a local Dask cluster: every built-in metric
gives the same bits as one in-process worker, on a spill of several chunks cut into tasks inside chunks, with
samples repeated across chunks (dropped as `SpillReader` drops them)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import SPILLEVAL_SCRIPT, registered_plugin
from metric_data import batches_of, tokenizer
from test_metrics_corpus import CORPUS_SPECS, seeded_corpus
from typer.testing import CliRunner

from spilleval import Evaluator
from spilleval.cli import app
from spilleval.metrics import build_metric, compute_from_spill
from spilleval.metrics import ngram_table, parallel, run_partitions
from spilleval.metrics.mapmerge import MapMergeMetric
from spilleval.spill import Manifest, SpillReader, SpillWriter, chunk
from spilleval.spill.manifest import library_versions

REFS = {"references_column": "references"}
LABELS = {"labels": ["red", "green", "blue"], "target_column": "colour"}
EVERY_METRIC = [
    "token_accuracy", "sequence_exact_match", "text_match", "nll", "loss", "wer", "cer", "mer", "wil", "wip",
    {"name": "bits_per_byte", "params": {"references_column": "transcript"}}, "mc_accuracy",
    *({"name": name, "params": REFS} for name in ("ter", "bleu", "chrf", "rouge", "squad")),
    *({"name": name, "params": LABELS} for name in ("accuracy", "precision", "recall", "f1")),
    *CORPUS_SPECS,
]


@pytest.fixture(scope="module")
def spill(tmp_path_factory):
    """60 samples in chunks of 9 rows; samples 3..7 written a second time in the last chunk (a padded rank)."""
    return write_corpus_spill(tmp_path_factory.mktemp("parallel") / "spill")


@pytest.fixture(scope="module")
def spill_of_small_record_batches(tmp_path_factory):
    """The same, its chunks cut into record batches of 4 rows: tasks of 2 rows start and end inside them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunk, "RECORD_BATCH_ROWS", 4)
        return write_corpus_spill(tmp_path_factory.mktemp("parallel") / "spill")


def write_corpus_spill(directory):
    samples = seeded_corpus(60, seed=3)
    order = [*range(60), *range(3, 8)]
    tok = tokenizer()
    manifest = Manifest(task="causal_lm", vocab_size=len(tok), id_dtype="uint16", metrics=[build_metric(m).spec() for m in EVERY_METRIC],
                        has_logprob=True, dataset_length=60, versions=library_versions(),
                        columns=sorted(samples[0].columns), arrays={"class_scores": {"shape": [3], "dtype": "float32"}})
    with SpillWriter(directory, manifest, tokenizer=tok, chunk_rows=9) as writer:
        for batch in batches_of(samples, 4, order):
            writer.write(batch)
    return directory


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


@pytest.mark.parametrize("in_ranges", [False, True])
def test_workers_give_the_bits_of_one_worker(spill, monkeypatch, in_ranges):
    """`in_ranges`: the corpus metrics' runs are merged in the workers, one key range each (`run_partitions.py`),
    and the parent merges the runs it has listed every 3 tasks (on this small spill they are otherwise merged in
    one range, as in the default)."""
    monkeypatch.setattr(parallel, "MIN_TASK_ROWS", 2)  # tasks of a few rows: chunks are cut between workers
    monkeypatch.setattr(MapMergeMetric, "task_rows", 2)  # corpus sweeps too (a batch at least, by default)
    ranges: list[int] = []
    if in_ranges:
        monkeypatch.setattr(run_partitions, "MIN_RANGE_ROWS", 1)
        monkeypatch.setattr(ngram_table, "MAX_LISTED_RUNS", 3)
        for name in ("merge_in_ranges", "summarize_in_ranges"):  # (tables looked up; tables summarized)
            real = getattr(run_partitions, name)
            monkeypatch.setattr(run_partitions, name,
                                lambda *a, real=real, name=name: ranges.append((name, len(out := real(*a)))) or out)
    one = compute_from_spill(spill, workers=1)
    assert len(one) > 40 and one["cider"] > 0
    for workers in (2, 3):
        assert same(compute_from_spill(spill, workers=workers), one), workers
    assert not in_ranges or {name: n for name, n in sorted(ranges, key=lambda r: r[1])} == {
        "merge_in_ranges": 3, "summarize_in_ranges": 3}
    planner = parallel.TaskPlanner(SpillReader(spill), 3)
    tasks = list(planner.tasks())
    assert len(tasks) > len(planner.reader.chunks)  # chunks were cut
    assert any(t.keep is not None for t in tasks)  # and the repeated samples left out


def test_tasks_inside_record_batches_give_the_bits_of_one_worker(spill, spill_of_small_record_batches, monkeypatch):
    """Workers decode only the record batches of their tasks' rows (`ChunkRows`): tasks of 2 rows start and end
    inside record batches of 4, and every metric gives the bits of one worker on the spill of one-batch chunks."""
    monkeypatch.setattr(parallel, "MIN_TASK_ROWS", 2)
    monkeypatch.setattr(MapMergeMetric, "task_rows", 2)
    one = compute_from_spill(spill, workers=1)
    assert same(compute_from_spill(spill_of_small_record_batches, workers=1), one)
    assert same(compute_from_spill(spill_of_small_record_batches, workers=3), one)


def test_corpus_sweeps_take_a_batch_per_task_where_the_spill_has_rows_for_it(spill, monkeypatch):
    """A task of a corpus sweep holds one of its metrics' batches at least (its runs, lookups and merges cost per
    task), unless the spill is too small for 8 such tasks per worker: the last tasks stay short."""
    assert parallel.min_task_rows([build_metric("cider"), build_metric("distinct_n")]) == 4096
    assert parallel.min_task_rows([build_metric("text_match")]) == 0
    monkeypatch.setattr(parallel, "MIN_TASK_ROWS", 1)
    planner = parallel.TaskPlanner(SpillReader(spill), 2)
    chunk_rows = [r.rows for r in planner.reader.chunks]
    tasks = list(planner.tasks(min_rows=4))
    assert len(tasks) > len(chunk_rows)  # chunks of 9 rows were cut...
    assert all(t.stop - t.start >= 4 for t in tasks if t.stop < chunk_rows[t.chunk])  # ... into tasks of 4 at least
    capped = list(planner.tasks(min_rows=10_000))  # more rows than the spill: 1/(8 x workers) of it at least
    floor = sum(chunk_rows) // (parallel.TAIL_TASKS_PER_WORKER * 2)
    assert all(t.stop - t.start >= floor for t in capped if t.stop < chunk_rows[t.chunk])
    assert len(capped) > len(chunk_rows)  # short tasks at the end, chunks cut for them


def test_cli_workers_and_a_local_dask_cluster_give_the_same_numbers(spill):
    pytest.importorskip("distributed")
    runner = CliRunner()
    outputs = [runner.invoke(app, ["compute", str(spill), "--json", *args]) for args in
               (["--workers", "1"], ["--workers", "2"], ["--dask", "local", "--workers", "2"])]
    for out in outputs:
        assert out.exit_code == 0, out.output
    metrics = [json.loads(out.output)["metrics"] for out in outputs]
    assert metrics[0] == metrics[1] == metrics[2]


def test_evaluator_finalize_runs_its_corpus_passes_in_workers(tmp_path):
    samples = seeded_corpus(30, seed=5)
    evaluator = Evaluator(tmp_path / "run", metrics=["token_accuracy", *CORPUS_SPECS], tokenizer=tokenizer(),
                          keep_logprob=True, chunk_rows=7, dataset_length=len(samples), corpus_workers=2)
    for batch in batches_of(samples, 4):
        evaluator.add(batch, vocab_size=len(tokenizer()))
    assert same(evaluator.finalize(), compute_from_spill(tmp_path / "run", workers=1))


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_task_leaves_no_scratch_files(spill, monkeypatch, workers):
    """Tasks write runs into the metrics' scratch directories; when one task fails, the others in flight finish
    before the directories are removed, and nothing is left in the spill directory."""
    before = sorted(p.name for p in spill.iterdir())
    specs = ["distinct_n", {"name": "cider", "params": REFS}, "answer_macro_f1"]
    monkeypatch.setattr(parallel, "MIN_TASK_ROWS", 2)
    real = parallel._task_batches
    calls = []

    def failing(reader, sweep, task):
        calls.append(task)
        if len(calls) == 4:
            raise RuntimeError("task failed")
        return real(reader, sweep, task)

    if workers == 1:
        monkeypatch.setattr(parallel, "_task_batches", failing)
        with pytest.raises(RuntimeError, match="task failed"):
            compute_from_spill(spill, specs, workers=1)
    else:  # the parent fails while the workers still run (and write) later tasks
        monkeypatch.setattr(parallel, "_ordered", _failing_after(parallel._ordered, 3))
        with pytest.raises(RuntimeError, match="task failed"):
            compute_from_spill(spill, specs, workers=workers)
    assert sorted(p.name for p in spill.iterdir()) == before


def _failing_after(ordered, count):
    """`_ordered` whose results fail after `count` of them, with the later tasks still in flight."""
    def wrapped(*args, **kwargs):
        results = ordered(*args, **kwargs)
        try:
            for _ in range(count):
                yield next(results)
            raise RuntimeError("task failed")
        finally:
            results.close()
    return wrapped


def test_the_interval_pass_runs_in_the_workers_with_the_bits_of_one(spill, monkeypatch):
    """`spilleval compute`'s default (bootstrap intervals): the replicates are added up by the same workers' tasks,
    cut inside chunks, and give the same metrics and intervals as one process, and the same metrics as the plain
    recompute; the paired test of two spills too."""
    from spilleval.intervals import compute_with_intervals, confidence_intervals
    from spilleval.intervals.paired import paired_test

    monkeypatch.setattr(parallel, "MIN_TASK_ROWS", 2)
    monkeypatch.setattr(MapMergeMetric, "task_rows", 2)
    reader = SpillReader(spill)
    one_results, one_report = compute_with_intervals(reader, resamples=40, seed=5, workers=1)
    assert same(one_results, compute_from_spill(spill, workers=1))
    assert len(one_report.intervals) > 20 and "bleu" in one_report.intervals and "wer" in one_report.intervals
    for workers in (2, 3):
        results, report = compute_with_intervals(reader, resamples=40, seed=5, workers=workers)
        assert same(results, one_results) and report.to_json() == one_report.to_json(), workers
        assert report.skipped == one_report.skipped
    alone = confidence_intervals(reader, results=one_results, resamples=40, seed=5, workers=3)
    assert alone.to_json() == one_report.to_json()
    paired = [json.dumps({k: r.to_json() for k, r in paired_test(reader, reader, test=test, trials=30, seed=2,
                                                                 workers=w).results.items()})  # NaN == NaN here
              for test in ("bootstrap", "randomization") for w in (1, 2)]
    assert paired[0] == paired[1] and paired[2] == paired[3] and len(json.loads(paired[0])) > 20


DYING_PLUGIN = "spilleval_test_dying_metric"
# how the lost worker stopped, where its status could be read (not always: `parallel.UNREAD_STATUS`): SIGKILL
KILLED = r"stopped before returning its task( \(killed by SIGKILL\))?; the spill is unchanged"
DYING_SOURCE = '''
import multiprocessing, os, signal
from spilleval.metrics import StreamingMetric, register


@register("dies_in_a_worker")
class DiesInAWorker(StreamingMetric):
    """Counts samples in-process; a pool worker that updates it is killed, as the out-of-memory killer would."""

    def __init__(self):
        super().__init__()
        self.add_state("samples")

    def update(self, batch):
        if multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        self.add("samples", len(batch))

    def compute(self):
        return {"dies_in_a_worker": int(self.value("samples"))}
'''


@pytest.fixture
def dying_metric(tmp_path, monkeypatch):
    """`dies_in_a_worker` registered for one test."""
    yield from registered_plugin(monkeypatch, tmp_path, DYING_PLUGIN, DYING_SOURCE)


def test_a_worker_killed_mid_compute_is_one_clear_error(spill, dying_metric):
    """A pool worker killed with SIGKILL (what the out-of-memory killer sends): the recompute raises
    `WorkerLostError`, which names the signal and the fix, leaves the spill as it was, and is one line and exit
    code 2 from `spilleval compute`."""
    before = sorted(p.name for p in spill.iterdir())
    specs = ["dies_in_a_worker", "distinct_n", {"name": "cider", "params": REFS}]
    assert compute_from_spill(spill, specs[:1], workers=1)["dies_in_a_worker"] == 60
    with pytest.raises(parallel.WorkerLostError, match=KILLED + r".*--workers 2\), or --workers 1"):
        compute_from_spill(spill, specs, workers=4)
    assert sorted(p.name for p in spill.iterdir()) == before
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dying_metric), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([str(SPILLEVAL_SCRIPT), "compute", str(spill), "--metrics", "dies_in_a_worker",
                             "--plugin", DYING_PLUGIN, "--workers", "2"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert re.search(KILLED, result.stderr) and "--workers 1" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_killed_worker_is_named_every_time(spill, dying_metric):
    """The pool breaking is process teardown: 30 runs, each must end in `WorkerLostError` (not a hang, not another
    error)."""
    for _ in range(30):
        with pytest.raises(parallel.WorkerLostError, match=KILLED):
            compute_from_spill(spill, ["dies_in_a_worker"], workers=2)


def test_a_slow_task_at_the_head_does_not_idle_the_workers(monkeypatch):
    """Results are merged in task order, but a slow first task does not stop the later ones: they run and wait,
    finished, up to HELD_PER_WORKER x workers tasks held, and no more (the parent's bound on what it holds)."""
    from concurrent.futures import ThreadPoolExecutor

    release, started, lock = threading.Event(), [], threading.Lock()

    def run_task(sweep, task):
        if task.start == 0:
            assert release.wait(30)
        with lock:
            started.append(task.start)
        return task.start

    monkeypatch.setattr(parallel, "run_task", run_task)
    workers = 2
    held = parallel.HELD_PER_WORKER * workers
    tasks = [parallel.Task(0, i, i + 1) for i in range(40)]
    results = []
    with ThreadPoolExecutor(max_workers=parallel.RUNNING_PER_WORKER * workers) as executor:
        consumer = threading.Thread(target=lambda: results.extend(parallel._ordered(executor, None, tasks, workers)))
        consumer.start()
        deadline = time.monotonic() + 10
        while len(started) < held - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert sorted(started) == list(range(1, held))  # more than the running bound, up to the held one
        release.set()
        consumer.join(30)
    assert [start for _, start in results] == list(range(40))
