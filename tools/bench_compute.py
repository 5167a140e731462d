"""Offline recompute: token_accuracy throughput (supervised tokens/s) and bytes on disk per supervised token.

    .venv/bin/python tools/bench_compute.py            # 50M supervised tokens (a few minutes, ~150 MB of disk)
    .venv/bin/python tools/bench_compute.py --quick    # 1M tokens, well under a minute

The spill is written with `SpillWriter` from synthetic data shaped like an LM eval: label ids Zipf-distributed over
a 32,000 vocabulary (ids in frequency order, as BPE merges roughly are, or --permuted), predictions equal to the
label 70% of the time and otherwise another Zipf draw, sample lengths uniform in 20-400. The recompute is
`spilleval.compute_from_spill(dir, ["token_accuracy"])`, the code path of `spilleval compute --metrics
token_accuracy`, timed best of --repeats with the spill in the page cache (warm). Baselines measured in the same run:
numpy over the same ids held in memory (the ceiling) and the same spill written uncompressed. A second spill also
carries what a real evaluation stores next to the ids (label log-probs for `nll`, a question string per sample):
token accuracy reads only the ids from it, the "read everything" row decodes every column, as a reader that ignored
what the metric needs would. The byte experiments compress the same ids with the same codec outside the spill
format, to show what each choice would buy; the entropy line is the information-theoretic floor of this data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402

from spilleval.batch import SampleBatch  # noqa: E402
from spilleval.metrics import MetricSuite, compute_from_spill  # noqa: E402
from spilleval.spill import Manifest, SpillReader, SpillWriter  # noqa: E402
from spilleval.spill.manifest import library_versions  # noqa: E402

VOCAB = 32_000
P_RIGHT = 0.7
BATCH_TOKENS = 2_000_000  # tokens generated (and handed to the writer) at a time


# ----------------------------------------------------------------------------------------------- synthetic data
class ZipfData:
    """Deterministic synthetic batches, made on the fly; keeps only running counts, never the data."""

    def __init__(self, total_tokens: int, *, exponent: float, permuted: bool, extras: bool = False,
                 seed: int = 0) -> None:
        self.total_tokens, self.extras, self.seed = total_tokens, extras, seed
        weights = 1.0 / np.arange(1, VOCAB + 1) ** exponent
        self.probs = weights / weights.sum()
        self.cdf = np.cumsum(self.probs)
        self.rank_to_id = np.random.default_rng(seed + 1).permutation(VOCAB) if permuted else np.arange(VOCAB)
        self.correct = self.tokens = 0

    def batches(self) -> Iterator[SampleBatch]:
        rng = np.random.default_rng(self.seed)
        extras_rng = np.random.default_rng(self.seed + 2)  # the ids are the same with or without extras
        self.correct = self.tokens = next_index = 0
        while self.tokens < self.total_tokens:
            size = min(BATCH_TOKENS, self.total_tokens - self.tokens)
            lengths = rng.integers(20, 401, size=max(1, size // 210))
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            labels = self._zipf_ids(rng, int(offsets[-1]))
            preds = np.where(rng.random(len(labels)) < P_RIGHT, labels, self._zipf_ids(rng, len(labels)))
            self.correct += int(np.count_nonzero(preds == labels))
            self.tokens += len(labels)
            batch = SampleBatch(np.arange(next_index, next_index + len(lengths)), offsets, preds, labels)
            if self.extras:  # what a real evaluation stores too: log-probs (nll) and a dataset column
                batch.label_logprob = np.log1p(-extras_rng.random(len(labels), dtype=np.float32))
                batch.columns["question"] = [f"question {i}: what is shown in picture {i % 977}?"
                                             for i in batch.sample_index]
            yield batch
            next_index += len(lengths)

    def _zipf_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n)), VOCAB - 1)
        return self.rank_to_id[ranks].astype(np.uint16)

    def entropy_bytes_per_token(self) -> float:
        """H(label) + H(pred | label), in bytes: no lossless coding of the two id columns can go below it."""
        h = float(-(self.probs * np.log2(self.probs)).sum())
        p_same = P_RIGHT + (1 - P_RIGHT) * self.probs  # P(pred == label | label)
        h_same = -(p_same * np.log2(p_same) + (1 - p_same) * np.log2(1 - p_same))
        h_wrong = h  # entropy of a wrong prediction given the label: at most that of a Zipf draw
        return (h + float((self.probs * (h_same + (1 - p_same) * h_wrong)).sum())) / 8


# ----------------------------------------------------------------------------------------------- measurements
def write_spill(path: Path, data: ZipfData, *, compression: str | None) -> None:
    """Write `data` with a `SpillWriter` (default chunk size), as an evaluation would."""
    manifest = Manifest(task="causal_lm", vocab_size=VOCAB, id_dtype="uint16", metrics=[{"name": "token_accuracy"}],
                        has_logprob=data.extras, columns=["question"] if data.extras else [],
                        versions=library_versions())
    with SpillWriter(path, manifest, compression=compression) as writer:
        for batch in data.batches():
            writer.write(batch)


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def read_everything(path: Path) -> dict[str, float]:
    """token_accuracy over batches with every column decoded (log-probs, strings): what selection avoids."""
    suite = MetricSuite(["token_accuracy"])
    for batch in SpillReader(path).iter_batches(4096):
        suite.update(batch)
    return suite.compute_streaming()


def compress_experiments(data: ZipfData, levels: tuple[int, ...]) -> list[list[Any]]:
    """Bytes per token of other encodings of the same ids (one zstd frame per column, like an IPC buffer)."""
    batch = SampleBatch.concat(list(data.batches()))
    lab, pred = batch.label_ids, batch.pred_ids

    def size(*columns: np.ndarray, level: int) -> float:
        codec = pa.Codec("zstd", compression_level=level)
        return sum(codec.compress(pa.py_buffer(np.ascontiguousarray(c).tobytes())).size for c in columns) / len(lab)

    low, high = (lambda a: (a & 0xFF).astype(np.uint8)), (lambda a: (a >> 8).astype(np.uint8))
    return [[f"zstd level {level}", size(lab, pred, level=level), size(lab, lab ^ pred, level=level),
             size(low(lab), high(lab), low(pred), high(pred), level=level)] for level in levels]


# ----------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = 1_000_000 if args.quick else args.tokens
    repeats = 2 if args.quick else args.repeats  # the first of two runs warms up (imports, page cache)
    data = lambda extras=False: ZipfData(tokens, exponent=args.zipf, permuted=args.permuted, extras=extras)  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bench-compute-", dir=args.tmp))
    rows: list[dict[str, Any]] = []

    def record(name: str, spill: Path | None, seconds: float, n: int) -> None:
        size = SpillReader(spill).bytes_on_disk / n if spill else None
        rows.append({"path": name, "tokens": n, "rate": n / seconds, "bytes": size})

    try:
        ids = data()
        in_memory = [(b.pred_ids, b.label_ids) for b in ids.batches()]
        seconds, correct = best_of(repeats, lambda: sum(int(np.count_nonzero(p == lab)) for p, lab in in_memory))
        del in_memory
        expected = {"token_accuracy": correct / ids.tokens}
        record("numpy over the ids in memory (ceiling)", None, seconds, ids.tokens)

        for name, extras, compression in (("spill, zstd (default)", False, "zstd"),
                                          ("spill, uncompressed", False, None),
                                          ("spill + log-probs + a text column, zstd", True, "zstd")):
            spill = root / f"spill-{len(rows)}"
            source = data(extras)
            write_spill(spill, source, compression=compression)
            seconds, result = best_of(repeats, lambda: compute_from_spill(spill, ["token_accuracy"]))
            if result != expected or source.tokens != ids.tokens:
                raise SystemExit(f"{name}: recomputed {result} != {expected} computed in memory")
            record(name, spill, seconds, source.tokens)
            if extras:
                seconds, result = best_of(repeats, lambda: read_everything(spill))
                assert result == expected, result
                record("  same spill, every column decoded", spill, seconds, source.tokens)
            shutil.rmtree(spill)

        ceiling = rows[0]["rate"]
        sample = ZipfData(min(tokens, 4_000_000), exponent=args.zipf, permuted=args.permuted)
        experiments = compress_experiments(sample, (1, 3) if args.quick else (1, 3, 9, 19))
        return {"tokens": tokens, "rows": rows, "ceiling": ceiling, "experiments": experiments,
                "entropy": data().entropy_bytes_per_token(), "machine": machine_info(),
                "versions": library_versions(), "command": " ".join(sys.argv)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(out: dict[str, Any]) -> str:
    table = [[r["path"], f"{r['tokens']:,}", r["rate"] / 1e6, r["rate"] / out["ceiling"],
              "-" if r["bytes"] is None else r["bytes"]] for r in out["rows"]]
    lines = [
        markdown_table(["token_accuracy over", "supervised tokens", "M tokens/s", "vs numpy", "bytes / token"],
                       table),
        "",
        f"Entropy floor of the two id columns of this data: {out['entropy']:.3f} bytes/token.",
        "",
        markdown_table(["zstd on the same ids (outside the spill)", "label + pred (as spilled)",
                        "label + (pred XOR label)", "byte planes (lo/hi bytes apart)"], out["experiments"]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M tokens, two repeats: a smoke run")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="supervised tokens in the spill")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the label ids")
    parser.add_argument("--permuted", action="store_true", help="ids not in frequency order (harder to compress)")
    parser.add_argument("--repeats", type=int, default=3, help="timed recomputes; the best is reported")
    parser.add_argument("--tmp", default=None, help="where to write the spills (default: the system temp dir)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    out = run(args)
    print(report(out))
    print()
    print(json.dumps({"command": out["command"], "machine": out["machine"], "versions": out["versions"]}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
