"""What confidence intervals cost: `spilleval compute --bootstrap 1000` against `--bootstrap 0` on one spill.

    .venv/bin/python tools/bench_intervals.py               # 20,000 caption samples (~ a few minutes on 2 cores)
    .venv/bin/python tools/bench_intervals.py --samples 2000  # quick
    .venv/bin/python tools/bench_intervals.py --scores      # auroc, average_precision, ece over class scores

The spill is bench_compute's caption spill (`CaptionData`: 5-30 word tokens a sample, a real word-level tokenizer,
1-5 references a sample, label log-probs), cut at --samples samples. Each row runs the `spilleval compute` command
in a fresh process on the same metrics (`--workers N`, default: the command's own, every usable core), best of
--repeats wall time, and reads that process's peak RSS (`getrusage`) and its pool workers' largest RSS (sampled
every 20 ms with psutil over the process's descendants, the forkserver's children included; printed by the one-shot
process as it ends): the baseline is the same command with
`--bootstrap 0` measured in the same run, so the table reads as ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402
from bench_compute import CaptionData, caption_tokenizer, metric_specs  # noqa: E402

from spilleval.spill import Manifest, SpillWriter  # noqa: E402
from spilleval.spill.manifest import library_versions  # noqa: E402

METRICS = ["token_accuracy", "sequence_exact_match", "nll", "loss", "bleu", "chrf", "squad"]
SCORE_METRICS = ["auroc", "average_precision", "ece"]  # --scores: three classes, right about 60% of the time
TOKENS_PER_SAMPLE = 17.5  # CaptionData's mean sample length


def write_caption_spill(path: Path, samples: int, scores: bool = False) -> int:
    """The caption spill cut at `samples`; with `scores`, each sample also has three class scores and a target
    class (a "target" column) for the score metrics."""
    tokenizer = caption_tokenizer()
    specs = metric_specs([0, 1, 2, 3])
    data = CaptionData(int(samples * TOKENS_PER_SAMPLE * 1.2), tokenizer)
    metrics = ([{"name": name, "params": {"target_column": "target"}} for name in SCORE_METRICS] if scores
               else [specs[m] for m in METRICS])
    manifest = Manifest(task="causal_lm", vocab_size=len(tokenizer), id_dtype="uint16", metrics=metrics,
                        has_logprob=True, columns=["target"] if scores else ["references"],
                        versions=library_versions())
    rng = np.random.default_rng(0)
    written = 0
    with SpillWriter(path, manifest, tokenizer=tokenizer) as writer:
        for batch in data.batches():
            batch = batch.slice(0, min(len(batch), samples - written))
            batch.columns = {"references": batch.columns["references"]}
            batch.arrays = {}
            if scores:
                target = rng.integers(0, 3, size=len(batch))
                probs = rng.dirichlet(np.ones(3), size=len(batch))
                probs[np.arange(len(batch)), target] += 0.6
                batch.columns = {"target": target.tolist()}
                batch.arrays = {"class_scores": (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)}
            writer.write(batch)
            written += len(batch)
            if written >= samples:
                break
    return written


# run first in the one-shot process: a daemon thread keeping the largest RSS (bytes) of any descendant process
WORKER_RSS_PROBE = """
import threading, time, psutil
WORKER_PEAK = [0]
def _watch_workers():
    me = psutil.Process()
    while True:
        for child in me.children(recursive=True):
            try:
                WORKER_PEAK[0] = max(WORKER_PEAK[0], child.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.02)
threading.Thread(target=_watch_workers, daemon=True).start()
"""


def run_compute(spill: Path, bootstrap: int, workers: int | None) -> tuple[float, float, float, dict]:
    """(seconds, peak RSS MiB of the process, largest peak RSS MiB of its workers, JSON payload) of one
    `spilleval compute` process."""
    code = WORKER_RSS_PROBE + (
        "import resource, sys; from spilleval.cli import main; sys.argv = sys.argv[1:]\n"
        "try:\n    main()\nfinally:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, WORKER_PEAK[0] // 1024, file=sys.stderr)")
    command = ["spilleval", "compute", str(spill), "--json", "-q", "--bootstrap", str(bootstrap)]
    command += ["--workers", str(workers)] if workers is not None else []
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    own_kib, workers_kib = map(int, done.stderr.strip().splitlines()[-1].split())
    return seconds, own_kib / 1024, workers_kib / 1024, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the raw results here.")
    parser.add_argument("--workers", type=int, help="`compute --workers N` (default: the command's own)")
    parser.add_argument("--scores", action="store_true", help=f"The metrics {', '.join(SCORE_METRICS)} "
                        "(their own bootstraps: sorted scans, per-bin sums) instead of the text metrics.")
    args = parser.parse_args()
    metrics = SCORE_METRICS if args.scores else METRICS
    with tempfile.TemporaryDirectory() as tmp:
        spill = Path(tmp) / "caption"
        samples = write_caption_spill(spill, args.samples, scores=args.scores)
        rows, raw = [], {"machine": machine_info(), "samples": samples, "metrics": metrics, "workers": args.workers,
                         "runs": {}}
        for bootstrap in (0, 1000):
            runs = [run_compute(spill, bootstrap, args.workers) for _ in range(args.repeats)]
            raw["runs"][bootstrap] = {"seconds": min(r[0] for r in runs), "peak_rss_mib": max(r[1] for r in runs),
                                      "worker_peak_rss_mib": max(r[2] for r in runs),
                                      "intervals": runs[0][3].get("intervals", {})}
        base = raw["runs"][0]
        for bootstrap, run in raw["runs"].items():
            rows.append([f"--bootstrap {bootstrap}", f"{run['seconds']:.1f} s", f"{run['seconds'] / base['seconds']:.2f}x",
                         f"{run['peak_rss_mib']:.0f} MiB", f"{run['peak_rss_mib'] / base['peak_rss_mib']:.2f}x",
                         f"{run['worker_peak_rss_mib']:.0f} MiB"])
    print(f"{samples:,} samples; metrics: {', '.join(metrics)}; workers: {args.workers or 'the default'}; "
          f"machine: {json.dumps(raw['machine'])}")
    print(markdown_table(["command", "wall", "vs --bootstrap 0", "peak RSS", "vs --bootstrap 0",
                          "largest worker's peak RSS"], rows))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
