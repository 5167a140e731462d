"""What confidence intervals cost: `spilleval compute --bootstrap 1000` against `--bootstrap 0` on one spill.

    .venv/bin/python tools/bench_intervals.py               # 20,000 caption samples (~ a few minutes on 2 cores)
    .venv/bin/python tools/bench_intervals.py --samples 2000  # quick

The spill is bench_compute's caption spill (`CaptionData`: 5-30 word tokens a sample, a real word-level tokenizer,
1-5 references a sample, label log-probs), cut at --samples samples. Each row runs the `spilleval compute` command
in a fresh process on the same metrics, best of --repeats wall time, and reads that process's peak RSS
(`resource.getrusage(RUSAGE_CHILDREN)` of a one-shot child): the baseline is the same command with
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402
from bench_compute import CaptionData, caption_tokenizer, metric_specs  # noqa: E402

from spilleval.spill import Manifest, SpillWriter  # noqa: E402
from spilleval.spill.manifest import library_versions  # noqa: E402

METRICS = ["token_accuracy", "sequence_exact_match", "nll", "loss", "bleu", "chrf", "squad"]
TOKENS_PER_SAMPLE = 17.5  # CaptionData's mean sample length


def write_caption_spill(path: Path, samples: int) -> int:
    tokenizer = caption_tokenizer()
    specs = metric_specs([0, 1, 2, 3])
    data = CaptionData(int(samples * TOKENS_PER_SAMPLE * 1.2), tokenizer)
    manifest = Manifest(task="causal_lm", vocab_size=len(tokenizer), id_dtype="uint16",
                        metrics=[specs[m] for m in METRICS], has_logprob=True, columns=["references"],
                        versions=library_versions())
    written = 0
    with SpillWriter(path, manifest, tokenizer=tokenizer) as writer:
        for batch in data.batches():
            batch = batch.slice(0, min(len(batch), samples - written))
            batch.columns = {"references": batch.columns["references"]}
            batch.arrays = {}
            writer.write(batch)
            written += len(batch)
            if written >= samples:
                break
    return written


def run_compute(spill: Path, bootstrap: int) -> tuple[float, float, dict]:
    """(seconds, peak RSS MiB, JSON payload) of one `spilleval compute` process."""
    code = ("import resource, sys; from spilleval.cli import main; sys.argv = sys.argv[1:]\n"
            "try:\n    main()\nfinally:\n"
            "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "spilleval", "compute", str(spill), "--json", "-q",
                           "--bootstrap", str(bootstrap)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return seconds, peak_kib / 1024, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the raw results here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spill = Path(tmp) / "caption"
        samples = write_caption_spill(spill, args.samples)
        rows, raw = [], {"machine": machine_info(), "samples": samples, "metrics": METRICS, "runs": {}}
        for bootstrap in (0, 1000):
            runs = [run_compute(spill, bootstrap) for _ in range(args.repeats)]
            seconds = min(r[0] for r in runs)
            peak = max(r[1] for r in runs)
            raw["runs"][bootstrap] = {"seconds": seconds, "peak_rss_mib": peak,
                                      "intervals": runs[0][2].get("intervals", {})}
        base = raw["runs"][0]
        for bootstrap, run in raw["runs"].items():
            rows.append([f"--bootstrap {bootstrap}", f"{run['seconds']:.1f} s", f"{run['seconds'] / base['seconds']:.2f}x",
                         f"{run['peak_rss_mib']:.0f} MiB", f"{run['peak_rss_mib'] / base['peak_rss_mib']:.2f}x"])
    print(f"{samples:,} samples; metrics: {', '.join(METRICS)}; machine: {json.dumps(raw['machine'])}")
    print(markdown_table(["command", "wall", "vs --bootstrap 0", "peak RSS", "vs --bootstrap 0"], rows))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
