"""Every corpus metric runs in bounded memory: peak RSS of a subprocess computing them over a spill 4x larger
(and many chunks larger than its chunk size) grows by far less than holding the extra samples would take.

The data is heavy per sample on purpose, so that keeping any per-sample structure would show: 3 references of
8 words (CIDEr's cooked n-gram dicts, ~150 MB for the 15,000 extra samples), 12 random words per prediction
(distinct-n's n-gram sets ~26 MB, open-set answers all different), 32 class scores (AUROC / AP / ECE, ~15 MB as
Python floats), per-token log-probs (loss percentiles). The bound, 6 MB, is 400 bytes per extra sample.

Bounded buffers fill up as the data grows, and a comparison of two sizes would count them as growth: SQLite's page
cache, CIDEr's n-gram run buffer, its merge fan-in and merge round are capped in the probe (1 MiB, 2^15 rows, 4 runs,
256 KiB: the 5,000-sample answers table, 0.5 MB, did not fill a 1 MiB round, the 20,000-sample one did), and the
smaller spill has 5,000 samples because below that the allocators' pools (pyarrow's mimalloc, glibc's arenas) are
still filling: from 1,000 to 5,000 samples the peak rose 2-7 MB run to run, from 5,000 to 20,000 by -2 to +4 MB.

With worker processes (`--workers 2`), each worker's peak is measured the same way (its /proc high-water mark
reset before each compute): a worker maps tasks, writes their runs, merges key ranges of every task's runs and
looks document frequencies up, so its memory must not grow with the spill either. The workers get the same caps,
and a key-range merge's round (8 MiB, `run_partitions.RANGE_ROUND_BYTES`) is capped at 1 MiB for the same reason.
A worker's bound is 8 MB: its peak moved by 4.9-6.2 MB over three runs (the levels of memory that Arrow's and
glibc's allocators keep, after a sweep, merges and lookups), far from the 45 MB that a merge of every task's run
at once grew by before it read them without mapping them (`run_file.RowReader`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SMALL, LARGE = 5_000, 20_000
CHUNK_ROWS = 250
PRED_WORDS, REF_WORDS = 12, 8
CLASSES = 32
METRIC_BATCH = 256
GROWTH_LIMIT_MB = 6.0
WORKER_GROWTH_LIMIT_MB = 8.0  # measured 4.9-6.2 MB (3 runs); a key-range merge that kept every run's pages: 45 MB

CORPUS_SPECS = [
    {"name": "cider", "params": {"references_column": "references", "batch_size": METRIC_BATCH}},
    {"name": "auroc", "params": {"target_column": "target", "batch_size": METRIC_BATCH}},
    {"name": "average_precision", "params": {"target_column": "target", "batch_size": METRIC_BATCH}},
    {"name": "ece", "params": {"target_column": "target", "batch_size": METRIC_BATCH}},
    {"name": "loss_percentiles", "params": {"batch_size": METRIC_BATCH}},
    {"name": "distinct_n", "params": {"batch_size": METRIC_BATCH}},
    {"name": "answer_macro_f1", "params": {"batch_size": METRIC_BATCH}},
]


def write_heavy_spill(path: Path, n: int, tokenizer, seed: int) -> None:
    """Generate and spill n samples batch by batch (the probe itself never holds the corpus)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_manifest

    from spilleval.batch import SampleBatch
    from spilleval.spill import SpillWriter

    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    words = np.array(tokenizer.convert_ids_to_tokens(list(range(5, vocab))))
    manifest = make_manifest(vocab, has_logprob=True, dataset_length=n)
    with SpillWriter(path, manifest, tokenizer=tokenizer, chunk_rows=CHUNK_ROWS) as writer:
        for start in range(0, n, 250):
            size = min(250, n - start)
            ids = rng.integers(5, vocab, size=(size, PRED_WORDS))
            labels = np.where(rng.random(ids.shape) < 0.3, ids, rng.integers(5, vocab, size=ids.shape))
            refs = [[" ".join(rng.choice(words, REF_WORDS)) for _ in range(3)] for _ in range(size)]
            logits = rng.standard_normal((size, CLASSES))
            probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
            writer.write(SampleBatch.from_rows(
                range(start, start + size), ids.tolist(), labels.tolist(), vocab_size=vocab,
                logprobs=(-rng.exponential(2.0, size=ids.shape)).tolist(),
                columns={"references": refs, "target": rng.integers(0, CLASSES, size).tolist()},
                arrays={"class_scores": probs},
            ))


def peak_rss_mb_during(fn) -> float:
    """Peak RSS (MB) while fn runs: the kernel's high-water mark, reset first."""
    from spilleval.testing import peak_rss, reset_peak_rss

    reset_peak_rss()
    fn()
    return peak_rss() / 1024 / 1024


def cap_bounded_buffers() -> None:
    """The caps of the module docstring, in this process."""
    from spilleval.metrics import ngram_table, ondisk, run_partitions

    ondisk.DEFAULT_CACHE_MIB = 1
    ngram_table.BUFFER_ROWS, ngram_table.MAX_RUNS, ngram_table.MERGE_ROUND_BYTES = 1 << 15, 4, 1 << 18
    run_partitions.RANGE_ROUND_BYTES = 1 << 20


def capped_worker() -> None:
    """A pool worker's initializer: the recompute's own (one thread, the parent's package), then the caps."""
    from spilleval.metrics import pool

    pool.one_thread_per_worker(pool.package_directory())
    cap_bounded_buffers()


def spills(workdir: str) -> dict[int, Path]:
    from spilleval.testing import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=8000)
    paths = {n: Path(workdir) / f"spill-{n}" for n in (SMALL, LARGE)}
    for n, path in paths.items():
        write_heavy_spill(path, n, tokenizer, seed=n)
    return paths


def probe(workdir: str) -> dict[str, float]:
    from spilleval.metrics import compute_from_spill

    cap_bounded_buffers()
    paths = spills(workdir)
    compute_from_spill(paths[SMALL], CORPUS_SPECS)  # warm-up: imports, caches, allocator arenas
    out = {}
    for n, path in paths.items():
        results: dict[str, float] = {}
        out[f"peak_mb_{n}"] = peak_rss_mb_during(lambda: results.update(compute_from_spill(path, CORPUS_SPECS)))
        out[f"metrics_{n}"] = len(results)
    return out


def probe_workers(workdir: str, workers: int = 2) -> dict[str, float]:
    """The largest worker's peak RSS (MB) for each spill, the pool's processes kept from one compute to the next."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from spilleval.metrics import compute_from_spill
    from spilleval.testing import peak_rss, reset_peak_rss

    cap_bounded_buffers()
    paths = spills(workdir)
    context = multiprocessing.get_context("spawn")
    out = {}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=capped_worker) as pool:
        compute_from_spill(paths[SMALL], CORPUS_SPECS, executor=pool, workers=workers)  # warm-up
        assert len(pool._processes) == workers
        for n, path in paths.items():
            for pid in pool._processes:
                reset_peak_rss(pid)
            results = compute_from_spill(path, CORPUS_SPECS, executor=pool, workers=workers)
            out[f"peak_mb_{n}"] = max(peak_rss(pid) for pid in pool._processes) / 1024 / 1024
            out[f"metrics_{n}"] = len(results)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
@pytest.mark.parametrize("workers", [1, 2])
def test_corpus_metrics_peak_rss_flat_in_spill_size(tmp_path, workers):
    """workers 1: the process that computes; 2: the largest of the pool's worker processes."""
    command = [sys.executable, __file__, str(tmp_path), *(["--workers"] if workers > 1 else [])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = measured[f"peak_mb_{LARGE}"] - measured[f"peak_mb_{SMALL}"]
    print(f"peak RSS {SMALL} samples: {measured[f'peak_mb_{SMALL}']:.1f} MB, {LARGE} samples: "
          f"{measured[f'peak_mb_{LARGE}']:.1f} MB, growth {growth:.1f} MB")
    assert measured[f"metrics_{LARGE}"] >= len(CORPUS_SPECS)
    assert growth < (GROWTH_LIMIT_MB if workers == 1 else WORKER_GROWTH_LIMIT_MB), measured


if __name__ == "__main__":
    print(json.dumps(probe_workers(sys.argv[1]) if "--workers" in sys.argv else probe(sys.argv[1])))
