"""Recompute throughput of the text metrics and CIDEr with 1, 2, 4, 8, 16 worker processes, and CIDEr before/after.

    .venv/bin/python tools/bench_scaling.py                  # each metric ~8 s on 1 worker, workers up to the cores
    .venv/bin/python tools/bench_scaling.py --seconds 1 --workers 1 2 --cider-tokens 20000   # a quick look
    .venv/bin/python tools/bench_scaling.py --intervals 1000   # also `spilleval compute`'s default, with intervals

The spills are bench_compute's caption spill (`CaptionData`: a real word-level tokenizer saved in the spill, 5-30
word answers, 1-5 references per sample in a "references" column), one prefix of it per metric: its rate on a
--probe-tokens prefix (one process) sets the prefix that takes about --seconds with one worker (prefixes are probe
x 2^k tokens, at most --max-tokens), so a fast metric is not timed on a spill that leaves its workers idle and a
slow one does not take minutes. For each worker count, one process pool
(`spilleval.metrics.pool.local_executor`) is started (its start, until every worker has loaded the tokenizer,
is "pool start"), then each metric is timed alone, `compute_from_spill(dir, [spec], executor=pool)`, best of
--repeats: the first repeat also pays each worker's first use of the metric (importing its reference library:
rouge-score's nltk takes about 2 s), reported as "first run". Every metric's result must be the same bits for every
worker count. Speed-up = time with 1 worker / time with N; efficiency = speed-up / N.

One core per worker: pool workers decode without the Rust tokenizer's threads (`pool.one_thread_per_worker`),
and so does the 1-worker baseline here (TOKENIZERS_PARALLELISM=false, set at start), else the baseline would run
`decode_batch` on every core and the ratios would not measure workers. --tokenizer-threads leaves the in-process
run its threads (what `--workers 1` does for a user).

CIDEr before/after (--cider-tokens, 0 to skip; needs pycocoevalcap): the implementation before issue 16 (two
passes with pycocoevalcap's `CiderScorer` per batch and the document frequencies in SQLite, kept below as the
baseline) against `compute_from_spill(dir, ["cider"], workers=1)`, on the same spill in the same run; the two
results must agree to 1e-12 relative.

The machine's own ceiling (--ceiling-seconds, 0 to skip): N independent processes each run the same loop (no
spill, no pool traffic); N x time alone / time of N together is the speed-up any N workers doing that kind of work
can reach on this machine (a virtual machine's 16 "cores" under load do not give 16 x one core). Two loops:
sacrebleu chrF on fixed strings (Python, cache-resident: the text metrics' kind), and sorting 32 MB of hashes
(memory-bound: the corpus metrics' n-gram runs).

The metric's own ceiling (--workload-ceiling): in the pool of the largest worker count, after its timed runs, each
of its N workers computes the metric alone, `compute_from_spill(spill, [spec], workers=1)`, all at once (warmed up
by the timed runs' tasks): N copies of the one-worker computation, with no task traffic between them. Its efficiency
(time of one worker alone / time of the N copies together) is what the machine gives that workload at N processes;
the N-worker run's efficiency against it is what the parallel recompute itself loses.

Every timed run starts with every `functools.lru_cache` emptied, in this process and in each worker
(`clear_caches`): sacrebleu's tokenizers (13a for BLEU, TER's) keep the last 65,536 strings, so a repeat on the same
spill found its strings tokenized where they fitted, in each of 16 workers' shares of the spill but not in one
worker's whole spill, and BLEU's speed-up over one worker came out 1.8x at 2 workers on 2 cores.

Writes a JSON file and a plot (speed-up vs workers per metric, with the linear, 0.8 x linear and ceiling lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402
from _pool_tasks import clear_caches, one_worker_compute  # noqa: E402
from bench_compute import CLASS_WORDS, PrefixSpills, caption_tokenizer, metric_specs  # noqa: E402

from spilleval.intervals import compute_with_intervals  # noqa: E402
from spilleval.metrics import compute_from_spill  # noqa: E402
from spilleval.metrics.inputs import references_of  # noqa: E402
from spilleval.metrics.ondisk import ScratchStore  # noqa: E402
from spilleval.metrics.pool import local_executor, shutdown, usable_cores  # noqa: E402
from spilleval.metrics.sums import ExactSum  # noqa: E402
from spilleval.spill import SpillReader  # noqa: E402

TEXT_METRICS = ["text_match", "bleu", "chrf", "ter", "rouge", "squad", "wer", "cer", "answer_macro_f1", "distinct_n",
                "cider"]


def clear_caches_everywhere(pool: Any, workers: int, manager: Any) -> None:
    clear_caches()
    if workers > 1:
        barrier = manager.Barrier(workers)
        for future in [pool.submit(clear_caches, barrier) for _ in range(workers)]:
            future.result()


def time_metrics(spill_of: dict[str, Path], specs: dict[str, dict[str, Any]], workers: int, repeats: int,
                 warm_up_spill: Path, resamples: int = 0, alone_s: dict[str, float] | None = None,
                 ) -> dict[str, Any]:
    import multiprocessing

    warm_up = {"name": "text_match", "params": {}}
    start = time.perf_counter()
    pool = local_executor(workers)
    manager = multiprocessing.get_context("forkserver").Manager() if workers > 1 else None  # workers' barriers
    try:
        compute_from_spill(warm_up_spill, [warm_up], executor=pool, workers=workers)  # loads the tokenizer
        out: dict[str, Any] = {"pool_start_s": time.perf_counter() - start, "metrics": {}}
        for name in specs:
            times, cpu, result = [], [], None
            for _ in range(repeats):
                clear_caches_everywhere(pool, workers, manager)
                before, t = psutil.cpu_times(), time.perf_counter()
                result = compute_from_spill(spill_of[name], [specs[name]], executor=pool, workers=workers)
                times.append(time.perf_counter() - t)
                cpu.append(cores_used(before, psutil.cpu_times(), times[-1]))
            best = times.index(min(times))
            out["metrics"][name] = {"seconds": times[best], "first_run_s": times[0], "result": result, **cpu[best]}
            print(f"  workers {workers:2d}  {name:16s} {times[best]:8.2f} s  (first run {times[0]:.2f} s; "
                  f"{cpu[best]['busy_cores']:.1f} cores busy, {cpu[best]['steal_cores']:.2f} stolen)", flush=True)
            if resamples:
                out["metrics"][name]["intervals"] = time_intervals(
                    spill_of[name], specs[name], pool, workers, repeats, resamples,
                    clear=lambda: clear_caches_everywhere(pool, workers, manager))
            if alone_s is not None:
                clear_caches_everywhere(pool, workers, manager)
                out["metrics"][name]["workload_ceiling"] = workload_ceiling(pool, workers, spill_of[name],
                                                                            specs[name], alone_s[name])
        return out
    finally:
        shutdown(pool)
        if manager is not None:
            manager.shutdown()


def workload_ceiling(pool: Any, workers: int, spill: Path, spec: dict[str, Any], alone_s: float) -> dict[str, Any]:
    """Each of the pool's `workers` processes computes the metric alone, all at once: efficiency = `alone_s` (one
    worker, nothing else running) / the time until the last copy is done. The workers have run the metric's tasks
    already (its library imported, the tokenizer's pieces learnt, shared by every reader of the same bytes)."""
    start = time.perf_counter()
    futures = [pool.submit(one_worker_compute, spill, spec) for _ in range(workers)]
    each = [future.result() for future in futures]
    together = time.perf_counter() - start
    print(f"  workload ceiling {spec['name']:16s} {workers} copies at once {together:.2f} s (each {min(each):.2f}-"
          f"{max(each):.2f} s), alone {alone_s:.2f} s: efficiency {alone_s / together:.2f}", flush=True)
    return {"together_s": together, "each_s": each, "efficiency": alone_s / together}


def time_intervals(spill: Path, spec: dict[str, Any], pool: Any, workers: int, repeats: int,
                   resamples: int, clear: Any = lambda: None) -> dict[str, Any]:
    """`spilleval compute`'s default: the metric and its bootstrap intervals (`resamples` replicates), one sweep
    on the same pool; best of `repeats`."""
    times, result = [], None
    for _ in range(repeats):
        clear()
        t = time.perf_counter()
        result, report = compute_with_intervals(SpillReader(spill), [spec], resamples=resamples, executor=pool,
                                                workers=workers)
        times.append(time.perf_counter() - t)
    print(f"  workers {workers:2d}  {spec['name']:16s} {min(times):8.2f} s with {resamples:,} bootstrap replicates",
          flush=True)
    return {"seconds": min(times), "result": result, "intervals": report.to_json()}


def cores_used(before: Any, after: Any, wall: float) -> dict[str, float]:
    """Cores the whole machine kept busy during a timed run (CPU seconds of every process / wall seconds), and the
    cores the hypervisor took from this virtual machine (steal, where the kernel reports it). Speed-up = busy cores
    at N / busy cores at 1 x (CPU seconds at 1 / CPU seconds at N): idle workers show in the first factor, work that
    grows with N (per-task costs, slower cores under load) in the second."""
    busy = sum(getattr(after, f) - getattr(before, f) for f in ("user", "nice", "system", "irq", "softirq")
               if hasattr(after, f))
    steal = after.steal - before.steal if hasattr(after, "steal") else 0.0
    return {"busy_cores": busy / wall, "steal_cores": steal / wall, "cpu_s": busy}


def chrf_of_fixed_strings(rounds: int) -> float:
    """Seconds of `rounds` x sacrebleu's sentence chrF over 200 fixed caption pairs: Python string and dict work
    like the text metrics', with no spill, no decoding and no pool traffic."""
    import random

    import sacrebleu

    rng = random.Random(0)
    words = list(CLASS_WORDS) + [f"word{i}" for i in range(200)]
    pairs = [(" ".join(rng.choices(words, k=12)), " ".join(rng.choices(words, k=12))) for _ in range(200)]
    start = time.perf_counter()
    for _ in range(rounds):
        for hyp, ref in pairs:
            sacrebleu.sentence_chrf(hyp, [ref])
    return time.perf_counter() - start


def sort_of_hashes(rounds: int) -> float:
    """Seconds of `rounds` x sorting 4M random 64-bit hashes (32 MB, beyond a core's caches) and counting the
    distinct ones: the memory-bound work of the corpus metrics' n-gram runs, with no spill and no pool traffic."""
    import numpy as np

    hashes = np.random.default_rng(0).integers(0, 2**62, size=4_000_000, dtype=np.int64)
    start = time.perf_counter()
    for _ in range(rounds):
        order = np.argsort(hashes, kind="stable")
        np.unique(hashes[order])
    return time.perf_counter() - start


CEILING_LOOPS = {"ceiling": chrf_of_fixed_strings, "ceiling_memory": sort_of_hashes}
CEILING_NAMES = {"ceiling": "chrF loop (Python)", "ceiling_memory": "sort of 32 MB of hashes (memory)"}


def machine_ceiling(counts: list[int], seconds: float, loop: Any = chrf_of_fixed_strings) -> dict[str, float]:
    """Seconds for N independent processes to each run the same loop (about `seconds` alone), per N: what the
    machine itself gives N busy processes (shared caches, memory bandwidth, clock under load), the ceiling of any
    N-worker speed-up on it. Efficiency = time alone / time of N together. Two loops: Python string and dict work
    (the text metrics'), and sorting arrays larger than a core's caches (the corpus metrics' runs)."""
    import multiprocessing

    rounds = max(1, round(seconds / max(loop(1), 1e-6)))
    out = {}
    context = multiprocessing.get_context("forkserver")
    for workers in counts:
        with context.Pool(workers) as pool:
            pool.map(loop, [1] * workers)  # imports, warm caches
            start = time.perf_counter()
            pool.map(loop, [rounds] * workers, chunksize=1)
            out[str(workers)] = time.perf_counter() - start
        print(f"  machine ceiling ({loop.__name__}), {workers:2d} processes: {out[str(workers)]:.2f} s", flush=True)
    return out


def spill_per_metric(spills: PrefixSpills, specs: dict[str, dict[str, Any]], probe: int, seconds: float,
                     max_tokens: int) -> dict[str, Any]:
    """The prefix each metric is timed on: about `seconds` of one worker. The probe prefix's rate gives a first
    size; while a timed run there takes under half of `seconds`, the prefix doubles (the probe's fixed costs made a
    fast metric's rate look 5x lower than on millions of tokens, and its spill too short to scale)."""
    probe_spill = spills.get(probe)
    sizes = {}
    for name, spec in specs.items():
        compute_from_spill(probe_spill.path, [spec], workers=1)  # imports, caches
        rate = probe_spill.tokens / one_worker_seconds(probe_spill.path, spec)
        tokens = probe
        while tokens * 2 <= max_tokens and tokens / rate < seconds / 1.5:
            tokens *= 2
        while tokens * 2 <= max_tokens and one_worker_seconds(spills.get(tokens).path, spec) < seconds / 2:
            tokens *= 2
        sizes[name] = spills.get(tokens)
        print(f"  {name:16s} {rate:12,.0f} tokens/s on the probe -> timed on {sizes[name].tokens:,} tokens "
              f"({sizes[name].samples:,} samples)", flush=True)
    return sizes


def one_worker_seconds(spill: Path, spec: dict[str, Any]) -> float:
    """`one_worker_compute` with this process's caches emptied first."""
    clear_caches()
    return one_worker_compute(spill, spec)


def cider_before(spill: Path, spec: dict[str, Any]) -> float:
    """CIDEr as spilleval computed it before issue 16 (commit c125feb's caption.py): pycocoevalcap's CiderScorer per
    batch, document frequencies in SQLite."""
    from pycocoevalcap.cider import cider_scorer

    class CorpusSizedList(list):
        def __init__(self, corpus_size: int) -> None:
            super().__init__()
            self.corpus_size = corpus_size

        def __len__(self) -> int:
            return self.corpus_size

    reader = SpillReader(spill)
    column, n = spec["params"]["references_column"], spec["params"]["n"]

    def captions():
        for batch in reader.iter_batches(spec["params"]["batch_size"], decode=True, with_arrays=False):
            refs = references_of(batch, column, "cider")
            yield [p.lower() for p in batch.pred_text], [[r.lower() for r in rs] for rs in refs]

    with ScratchStore(reader.path) as store:
        document_frequency = store.counter("document_frequency")
        images = 0
        for _, refs in captions():
            in_documents: Counter[str] = Counter()
            for sample_refs in refs:
                in_documents.update({" ".join(g) for ref in cider_scorer.cook_refs(sample_refs, n) for g in ref})
            document_frequency.add(in_documents.items())
            images += len(refs)
        total = ExactSum()
        for hyps, refs in captions():
            scorer = cider_scorer.CiderScorer(n=n, sigma=spec["params"]["sigma"])
            scorer.crefs = CorpusSizedList(images)
            for hyp, sample_refs in zip(hyps, refs):
                scorer += (hyp, sample_refs)
            needed = {g for test in scorer.ctest for g in test} | {g for c in scorer.crefs for r in c for g in r}
            ngram_of = {" ".join(g): g for g in needed}
            counts = document_frequency.get(ngram_of)
            scorer.document_frequency = defaultdict(float, {ngram_of[k]: float(c[0]) for k, c in counts.items()})
            total.add(scorer.compute_cider())
    return total.value / images


def cider_before_after(spills: PrefixSpills, tokens: int, spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    spill = spills.get(tokens)
    SpillReader(spill.path).tokenizer  # noqa: B018 - loaded once, outside both timings
    before_s, after_s, before, after = float("inf"), float("inf"), None, None
    for _ in range(repeats):  # interleaved, so both see the same machine load
        t = time.perf_counter()
        before = cider_before(spill.path, spec)
        before_s = min(before_s, time.perf_counter() - t)
        t = time.perf_counter()
        after = compute_from_spill(spill.path, [spec], workers=1)["cider"]
        after_s = min(after_s, time.perf_counter() - t)
    assert abs(after - before) <= 1e-12 * abs(before), (before, after)
    return {"tokens": spill.tokens, "samples": spill.samples, "before_s": before_s, "after_s": after_s,
            "before": before, "after": after, "speedup": before_s / after_s}


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(int(w) for w in out["runs"])
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.tab20.colors  # more metrics than the default cycle's 10 colours
    for i, name in enumerate(out["metrics"]):
        base = out["runs"][str(counts[0])]["metrics"][name]["seconds"]
        ax.plot(counts, [base / out["runs"][str(w)]["metrics"][name]["seconds"] for w in counts], marker="o",
                label=name, color=colors[i % len(colors)])
        ceiling = out["runs"][str(counts[-1])]["metrics"][name].get("workload_ceiling")
        if ceiling:  # the metric's own ceiling: as many copies of its one-worker run at once
            ax.plot([counts[-1]], [counts[-1] * ceiling["efficiency"]], marker="x", markersize=9,
                    color=colors[i % len(colors)])
    ax.plot(counts, counts, "k--", label="linear")
    ax.plot(counts, [0.8 * w for w in counts], "k:", label="0.8 x linear")
    for kind, style in (("ceiling", "r-."), ("ceiling_memory", "m-.")):
        if out.get(kind):
            alone = out[kind][str(counts[0])]
            ax.plot(counts, [w * alone / out[kind][str(w)] for w in counts], style,
                    label=f"machine ceiling: {CEILING_NAMES[kind]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(counts, [str(w) for w in counts])
    ax.set_xlabel("worker processes")
    ax.set_ylabel("speed-up over 1 worker (x: N copies of the 1-worker run at once)")
    ax.set_title(f"spilleval compute --workers N, caption spills of ~{out['seconds']:g} s on 1 worker\n"
                 f"{out['machine']['cpu']}",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(out: dict[str, Any]) -> str:
    counts = sorted(int(w) for w in out["runs"])
    text = scaling_table(out, counts) if counts else ""
    if out.get("cider"):
        c = out["cider"]
        text += (f"\n\nCIDEr on {c['samples']:,} samples, one process: before {c['before_s']:.2f} s, after "
                 f"{c['after_s']:.2f} s: **{c['speedup']:.1f}x**; results {c['before']!r} / {c['after']!r}")
    return text


def scaling_table(out: dict[str, Any], counts: list[int]) -> str:
    rows = []
    for name in out["metrics"]:
        base = out["runs"][str(counts[0])]["metrics"][name]["seconds"]
        samples = out["spills"][name]["samples"]
        cells = [f"{samples:,}", f"{base:.2f} s ({samples / base:,.0f}/s)"]
        for w in counts[1:]:
            s = out["runs"][str(w)]["metrics"][name]["seconds"]
            cells.append(f"{base / s:.2f} ({base / s / w:.2f})")
        runs = [out["runs"][str(w)]["metrics"][name] for w in counts]
        first = max(run["first_run_s"] - run["seconds"] for run in runs)
        rows.append([name, *cells, f"{first:.1f}", cpu_cell(runs[0], runs[-1])])
    for kind, name in CEILING_NAMES.items():
        if out.get(kind):
            alone = out[kind][str(counts[0])]
            rows.append([f"machine ceiling: {name} in N independent processes", "", f"{alone:.2f} s",
                         *[f"{w * alone / out[kind][str(w)]:.2f} ({alone / out[kind][str(w)]:.2f})"
                           for w in counts[1:]], "", ""])
    rows.append(["pool start (s)", "", *[f"{out['runs'][str(w)]['pool_start_s']:.1f}" for w in counts], "", ""])
    for name in out["metrics"]:
        runs = [out["runs"][str(w)]["metrics"][name].get("intervals") for w in counts]
        if runs[0] is not None:
            base = runs[0]["seconds"]
            rows.append([f"{name} with intervals ({out['resamples']:,} replicates)", "", f"{base:.2f} s",
                         *[f"{base / r['seconds']:.2f} ({base / r['seconds'] / w:.2f})"
                           for w, r in zip(counts[1:], runs[1:])], "", ""])
    header = ["metric", "samples", "1 worker", *[f"{w} workers: speed-up (efficiency)" for w in counts[1:]],
              "first-run extra, max (s)", f"at {counts[-1]} workers: cores busy, CPU s / 1 worker's, cores stolen"]
    return markdown_table(header, rows) + workload_table(out, counts)


def workload_table(out: dict[str, Any], counts: list[int]) -> str:
    """Per metric, the efficiency of the most workers against that of as many copies of the one-worker run."""
    most = str(counts[-1])
    rows = []
    for name in out["metrics"]:
        run = out["runs"][most]["metrics"][name]
        if "workload_ceiling" in run:
            efficiency = out["runs"][str(counts[0])]["metrics"][name]["seconds"] / run["seconds"] / counts[-1]
            ceiling = run["workload_ceiling"]["efficiency"]
            rows.append([name, f"{efficiency:.2f}", f"{ceiling:.2f}", f"{efficiency / ceiling:.2f}"])
    if not rows:
        return ""
    header = ["metric", f"{most} workers: efficiency", f"{most} copies of the 1-worker run: efficiency (ceiling)",
              "efficiency / ceiling"]
    return "\n\n" + markdown_table(header, rows)


def cpu_cell(alone: dict[str, Any], most: dict[str, Any]) -> str:
    """Busy cores, CPU time relative to one worker's, and stolen cores, of the run with the most workers."""
    if "busy_cores" not in most:
        return ""
    return f"{most['busy_cores']:.1f}, {most['cpu_s'] / max(alone['cpu_s'], 1e-9):.2f}x, {most['steal_cores']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="target time of each metric on 1 worker")
    parser.add_argument("--probe-tokens", type=int, default=20_000, help="prefix that measures each metric's rate")
    parser.add_argument("--max-tokens", type=int, default=10_240_000,
                        help="largest prefix a metric is timed on (4M left answer_macro_f1, text_match and distinct_n "
                             "under 1.5 s on one Xeon core: runs too short to scale)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--metrics", nargs="*", default=TEXT_METRICS)
    parser.add_argument("--repeats", type=int, default=2, help="best of; the first also pays first use")
    parser.add_argument("--cider-tokens", type=int, default=100_000, help="spill for CIDEr before/after (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("bench-scaling"))
    parser.add_argument("--ceiling-seconds", type=float, default=3.0,
                        help="the machine-ceiling loop's length alone (0: skip)")
    parser.add_argument("--intervals", type=int, default=0, metavar="N",
                        help="also time each metric with N bootstrap replicates, `spilleval compute`'s default "
                             "(compute_with_intervals; 0: skip)")
    parser.add_argument("--workload-ceiling", action="store_true",
                        help="also run each metric's one-worker computation in as many copies as the most workers")
    parser.add_argument("--tokenizer-threads", action="store_true",
                        help="the in-process run (1 worker, the probe, CIDEr before/after) decodes on every core")
    args = parser.parse_args()
    if not args.tokenizer_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    cores = usable_cores()
    counts = sorted({w for w in args.workers if w <= cores} | {1})
    tokenizer = caption_tokenizer()
    all_specs = metric_specs(tokenizer.convert_tokens_to_ids(list(CLASS_WORDS)))
    specs = {name: all_specs[name] for name in args.metrics}
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    spills = PrefixSpills(root, max(args.max_tokens, args.cider_tokens), tokenizer, all_specs)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        out: dict[str, Any] = {"machine": machine_info(), "usable_cores": cores, "seconds": args.seconds,
                               "repeats": args.repeats, "metrics": list(specs), "runs": {},
                               "tokenizer_threads_in_process": args.tokenizer_threads, "resamples": args.intervals}
        if args.cider_tokens:
            out["cider"] = cider_before_after(spills, args.cider_tokens, all_specs["cider"], args.repeats)
            print(f"cider before/after: {out['cider']}", flush=True)
        if not specs:
            print(report(out) if out.get("cider") else "no metrics to time")
            return
        for kind, loop in CEILING_LOOPS.items():
            out[kind] = machine_ceiling(counts, args.ceiling_seconds, loop) if args.ceiling_seconds else {}
        spill_of = spill_per_metric(spills, specs, args.probe_tokens, args.seconds, args.max_tokens)
        out["spills"] = {name: {"tokens": s.tokens, "samples": s.samples} for name, s in spill_of.items()}
        paths = {name: s.path for name, s in spill_of.items()}
        for w in counts:
            alone = {name: out["runs"]["1"]["metrics"][name]["seconds"] for name in specs} \
                if args.workload_ceiling and w == counts[-1] > 1 else None
            out["runs"][str(w)] = time_metrics(paths, specs, w, args.repeats, spills.get(args.probe_tokens).path,
                                               args.intervals, alone)
            (args.out / "scaling.json").write_text(json.dumps(out, indent=1))  # kept if a later count is cut off
        for name in specs:  # the same bits for every worker count
            results = {json.dumps(out["runs"][str(w)]["metrics"][name]["result"]) for w in counts}
            assert len(results) == 1, (name, results)
            with_intervals = {json.dumps({k: v for k, v in (out["runs"][str(w)]["metrics"][name].get("intervals")
                                                           or {}).items() if k != "seconds"}) for w in counts}
            assert len(with_intervals) == 1, (name, with_intervals)
        (args.out / "scaling.json").write_text(json.dumps(out, indent=1))
        plot(out, args.out / "scaling.png")
        print(report(out))
    finally:
        spills.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
