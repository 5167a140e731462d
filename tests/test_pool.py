"""The recompute's worker processes (`spilleval.metrics.pool`): one thread each, the forkserver's preload, the
parent's copy of spilleval, no process for a pool that runs nothing, and no import of the parent's main script."""

from __future__ import annotations

import importlib.util
import multiprocessing
import shutil
import subprocess
import sys
import textwrap

import pytest
from _imports_probe import imported
from test_parallel import write_corpus_spill

from spilleval.metrics import pool as pool_module


@pytest.fixture(scope="module")
def spill(tmp_path_factory):
    return write_corpus_spill(tmp_path_factory.mktemp("pool") / "spill")


def _threads_setting() -> tuple[str | None, str | None, int, list[int]]:
    import os

    import pyarrow as pa
    from threadpoolctl import threadpool_info

    blas = [pool["num_threads"] for pool in threadpool_info() if "numpy" in pool["filepath"]]
    return os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAYON_NUM_THREADS"), pa.cpu_count(), blas


def test_pool_workers_run_one_thread_each():
    """A worker process decoding with the Rust tokenizer's own threads, or multiplying the bootstrap replicates'
    weights with numpy's BLAS on a thread per core, times a worker per core, oversubscribes the machine: pool
    workers turn those threads off (the in-process worker keeps them)."""
    pool = pool_module.local_executor(2)
    try:
        tokenizers, rayon, arrow, blas = pool.submit(_threads_setting).result()
        assert (tokenizers, rayon, arrow) == ("false", "1", 1)
        assert blas == [1]  # numpy's OpenBLAS
    finally:
        pool_module.shutdown(pool)


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver here")
def test_pool_workers_start_with_what_every_task_imports():
    """Each worker's first task imported the spill reader, the tokenizers library and (through pyarrow's
    `to_numpy`) pandas on its own, 0.4 s of CPU a worker: the forkserver imports them once, before forking."""
    pool = pool_module.local_executor(2)
    try:
        wanted = tuple(name for name in pool_module.WORKER_PRELOAD if importlib.util.find_spec(name) is not None)
        assert pool.submit(imported, wanted).result() == list(wanted)
    finally:
        pool_module.shutdown(pool)


PROBE = """
from spilleval.metrics import pool as pool_module

if __name__ == "__main__":
    pool = pool_module.local_executor(2)
    try:
        print(pool.submit(pool_module.package_directory).result(), pool_module.package_directory())
    finally:
        pool_module.shutdown(pool)
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods() or sys.version_info < (3, 11),
                    reason="forkserver with PYTHONSAFEPATH (Python 3.11+)")
def test_workers_run_the_parents_spilleval_from_a_directory_holding_another(tmp_path):
    """Run from a directory that holds a copy of spilleval (a checkout of another version), the forkserver's
    preload imported that copy (`python -c` puts the working directory first on its path), and the workers ran its
    code under this one's parent; the pool starts it with PYTHONSAFEPATH now."""
    here = pool_module.package_directory()
    shutil.copytree(here, tmp_path / "elsewhere" / "spilleval", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "probe.py").write_text(PROBE)
    done = subprocess.run([sys.executable, str(tmp_path / "probe.py")], cwd=tmp_path / "elsewhere",
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [here, here]


def test_a_pool_that_runs_nothing_starts_no_process():
    """`spilleval diff` of two results files computes nothing: its pool must not start the forkserver."""
    probe = ("from multiprocessing import forkserver\n"
             "from spilleval.metrics import pool as pool_module\n"
             "pool_module.shutdown(pool_module.local_executor(2))\n"
             "print(forkserver._forkserver._forkserver_pid)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "None"


def test_a_worker_with_another_copy_of_spilleval_refuses_to_start():
    with pytest.raises(RuntimeError, match="imported spilleval from .* its parent from /elsewhere"):
        pool_module.one_thread_per_worker("/elsewhere")


ROWS_SEEN = '''
from spilleval.metrics import StreamingMetric, compute_from_spill, register
from spilleval.metrics.parallel import WorkerLostError


@register("rows_seen")
class RowsSeen(StreamingMetric):
    """Counts rows: a custom metric defined and registered in the script itself."""

    def __init__(self):
        super().__init__()
        self.add_state("rows")

    def update(self, batch):
        self.add("rows", len(batch))

    def compute(self):
        return {"rows_seen": int(self.value("rows"))}

'''


def run_script(path, code: str) -> subprocess.CompletedProcess:
    path.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_workers_do_not_run_a_script_without_a_main_guard(spill, tmp_path):
    """A training script is often a plain script: no `if __name__ == "__main__":`. The pool's workers ran the
    parent's main script before their first task, so each one ran it all again (its training too) until
    multiprocessing refused to start a process from it, and the recompute failed with a lost worker. Now the
    workers do not import it: the script runs once, and so do its imports (torch here: 2 s and a few hundred MB
    per worker)."""
    ran = tmp_path / "ran"
    done = run_script(tmp_path / "train.py", f"""
        import os
        import torch  # what a training script imports first
        from spilleval.metrics import compute_from_spill
        from spilleval.metrics.pool import local_executor, shutdown

        with open({str(ran)!r}, "a") as log:
            log.write(f"{{os.getpid()}}\\n")
        pool = local_executor(2)
        print(compute_from_spill({str(spill)!r}, ["text_match", "distinct_n"], executor=pool, workers=2))
        probe = "sorted(m for m in ('torch', 'transformers') if m in __import__('sys').modules)"
        print("workers hold:", sorted({{str(r) for r in pool.map(eval, [probe] * 8)}}))
        shutdown(pool)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ran.read_text().split()) == 1, "the workers ran the script again"
    assert "exact_match_accuracy" in done.stdout and "workers hold: ['[]']" in done.stdout, done.stdout


def test_a_metric_registered_in_the_main_script_is_found_by_the_workers(spill, tmp_path):
    """A custom metric registered in the user's script is rebuilt by name in each worker: then the workers import
    the main script (as multiprocessing does), and the metric computes the same number as in one process."""
    done = run_script(tmp_path / "custom.py", ROWS_SEEN + textwrap.dedent(f"""
        if __name__ == "__main__":
            print(compute_from_spill({str(spill)!r}, ["rows_seen"], workers=1),
                  compute_from_spill({str(spill)!r}, ["rows_seen"], workers=2))
    """))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "{'rows_seen': 60} {'rows_seen': 60}", done.stdout


def test_only_the_pools_own_thread_skips_the_main_module(monkeypatch, tmp_path):
    """The filter of what a new process is sent applies to the thread that starts a pool's workers, while it does."""
    import threading
    import types
    from multiprocessing import spawn

    script = types.ModuleType("__main__")
    script.__file__, script.__spec__ = str(tmp_path / "train.py"), None  # run as `python train.py`
    monkeypatch.setitem(sys.modules, "__main__", script)
    seen = {}
    with pool_module.without_main():
        other = threading.Thread(target=lambda: seen.update(other=spawn.get_preparation_data("x")))
        other.start()
        other.join()
        seen["here"] = spawn.get_preparation_data("x")
    seen["after"] = spawn.get_preparation_data("x")
    main_keys = {"init_main_from_name", "init_main_from_path"}
    assert not main_keys & set(seen["here"])
    assert main_keys & set(seen["other"]) and main_keys & set(seen["after"])


def test_a_worker_that_fails_as_it_starts_is_not_blamed_on_memory(spill, tmp_path):
    """A script without a main guard that registers a metric: the workers must import it, it runs again in each,
    and multiprocessing refuses to start processes from it (exit code 1). The error said "the usual cause is
    memory"; where the worker's exit code was read, it names the worker's own error and the guard now. (The code
    is not always read: of 30 runs, 27 read "exit code 1", 2 none and 1 only the pool's SIGTERM of the others;
    those keep the memory message, the likelier cause of a lost worker whose status is unknown.)"""
    done = run_script(tmp_path / "unguarded.py", ROWS_SEEN + textwrap.dedent(f"""
        try:
            compute_from_spill({str(spill)!r}, ["rows_seen"], workers=2)
        except WorkerLostError as error:
            print("LOST:", error)
    """))
    lost = [line for line in done.stdout.splitlines() if line.startswith("LOST:")]
    assert len(lost) == 1, done.stdout + done.stderr[-3000:]
    if "exit code 1" in lost[0]:
        assert "__main__" in lost[0] and "memory" not in lost[0], lost[0]


@pytest.mark.parametrize(("codes", "own_error"), [
    ([1], True), ([1, -15], True), ([-9], False), ([-9, -15], False), ([], False), ([255, -15], False),
])
def test_the_lost_worker_message_names_the_cause_its_exit_codes_show(codes, own_error):
    """Exit codes of the pool's processes (negative: killed by that signal): a worker that exited with a code of its
    own failed and printed why; one killed (SIGKILL: the out-of-memory killer), or whose status is unknown, is
    blamed on memory. The pool's SIGTERM of the others and the unread status 255 name nothing."""
    from types import SimpleNamespace

    from spilleval.metrics import parallel

    pool = SimpleNamespace(_processes={pid: SimpleNamespace(exitcode=code) for pid, code in enumerate(codes)})
    message = str(parallel._lost_worker(pool, workers=4))
    assert ("error of its own" in message) == own_error and ("memory" in message) == (not own_error), message
    assert message.endswith("--workers 1 to compute in this process")
