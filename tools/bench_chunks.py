"""What small chunks cost a recompute: the same spill cut into chunks of 16.8M down to 12.8k supervised tokens.

    .venv/bin/python tools/bench_chunks.py            # 10M supervised tokens, best of 3 (a few minutes on 2 cores)
    .venv/bin/python tools/bench_chunks.py --quick    # 1M tokens

Why: the spill writer commits by time as well as by size (`commit_interval_s`, default 60 s), so a slow evaluation
writes chunks that hold one interval of work instead of `chunk_bytes` (64 MiB, about 16.8M supervised tokens of
uint16 ids). One minute of a 7B model at batch 8 x 2,048 (about 0.6 s per batch, every position supervised) is
about 1.6M supervised tokens; with short answers (16 supervised tokens per sample) it is about 12.8k. This script
writes the same synthetic LM-eval data as `bench_compute.py` (`ZipfData`: Zipf ids over 32,000, sample lengths
20-400) with `chunk_bytes` chosen for each target, then times, page cache warm, best of --repeats:

  - `compute_from_spill(dir, ["token_accuracy"])` (the `spilleval compute` path; the result is checked against
    the accuracy counted while generating),
  - opening the spill (`SpillReader(dir)`: every chunk.json is read and checked),
  - `reader.completeness()` (`spilleval inspect`: every chunk's sample_index column, CRC-checked).

The per-chunk cost is the slope between two chunk sizes: (time_small - time_big) / (chunks_small - chunks_big).
Then the same spill is compacted as `SpillWriter.close()` compacts a shard whose chunks are small for the default
`chunk_bytes` (`spilleval.spill.compact`: runs of chunks under 4 MiB on disk merged into chunks of up to 64 MiB), and
the three timings are repeated; the compaction itself is timed too (page cache warm, fsync included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402
from bench_compute import VOCAB, ZipfData, best_of  # noqa: E402

from spilleval.metrics import compute_from_spill  # noqa: E402
from spilleval.spill import Manifest, SpillReader, SpillWriter  # noqa: E402
from spilleval.spill.compact import compact_shard  # noqa: E402
from spilleval.spill.integrity import seal  # noqa: E402
from spilleval.spill.manifest import SHARD_DONE, SHARDS_DIR, library_versions, write_json_atomic  # noqa: E402
from spilleval.spill.reader import scan_shard  # noqa: E402
from spilleval.spill.writer import DEFAULT_CHUNK_BYTES  # noqa: E402

BYTES_PER_TOKEN_IN_MEMORY = 4  # uint16 prediction + uint16 label, as the writer counts a buffered batch
TARGETS = {  # supervised tokens per chunk -> what writes chunks of that size
    16_777_216: "64 MiB, the default chunk_bytes (a fast evaluation fills it before the interval)",
    1_600_000: "one minute of a 7B model, 8 x 2,048 tokens per batch, every position supervised",
    128_000: "one minute of 16 supervised tokens per sample at 10 batches/s",
    12_800: "one minute of a 7B model, 16 supervised tokens per sample (short answers)",
}


def write(path: Path, data: ZipfData, chunk_tokens: int) -> float:
    manifest = Manifest(task="causal_lm", vocab_size=VOCAB, id_dtype="uint16", metrics=[{"name": "token_accuracy"}],
                        versions=library_versions())
    start = time.perf_counter()
    with SpillWriter(path, manifest, chunk_bytes=chunk_tokens * BYTES_PER_TOKEN_IN_MEMORY,
                     commit_interval_s=None) as writer:
        for batch in data.batches():
            writer.write(batch)
    return time.perf_counter() - start


def timings(spill: Path, expected: dict[str, float], tokens: int, repeats: int) -> dict[str, Any]:
    compute_s, result = best_of(repeats, lambda: compute_from_spill(spill, ["token_accuracy"]))
    if result != expected:
        raise SystemExit(f"{spill.name}: recomputed {result} != {expected}")
    open_s, reader = best_of(repeats, lambda: SpillReader(spill))
    completeness_s, _ = best_of(repeats, lambda: SpillReader(spill).completeness())
    return {"chunks": len(reader.chunks), "bytes_per_token": reader.bytes_on_disk / tokens, "compute_s": compute_s,
            "rate": tokens / compute_s, "open_s": open_s, "completeness_s": completeness_s}


def compact(spill: Path) -> float:
    """Compact the closed shard as `SpillWriter.close()` would with the default chunk_bytes (it runs before
    shard.json is written and the spill sealed, so that record is set aside, then rewritten with the new count and
    the spill sealed again)."""
    shard = spill / SHARDS_DIR / "rank-00000"
    (shard / SHARD_DONE).unlink()
    start = time.perf_counter()
    records = compact_shard(shard, scan_shard(shard), chunk_bytes=DEFAULT_CHUNK_BYTES, chunk_rows=None,
                            compression="zstd")
    seconds = time.perf_counter() - start
    write_json_atomic(shard / SHARD_DONE, {"rank": 0, "chunks": len(records), "rows": sum(r.rows for r in records),
                                           "tokens": sum(r.tokens for r in records)})
    seal(spill)
    return seconds


def measure(root: Path, tokens: int, chunk_tokens: int, repeats: int) -> dict[str, Any]:
    data = ZipfData(tokens, exponent=1.0, permuted=False)
    spill = root / f"chunks-{chunk_tokens}"
    write_s = write(spill, data, chunk_tokens)
    expected = {"token_accuracy": data.correct / data.tokens}
    row = {"chunk_tokens": chunk_tokens, "tokens": data.tokens, "write_s": write_s,
           **timings(spill, expected, data.tokens, repeats)}
    row["compact_s"] = compact(spill)
    row["compacted"] = timings(spill, expected, data.tokens, repeats)
    shutil.rmtree(spill)
    return row


def report(out: dict[str, Any]) -> str:
    base = out["rows"][0]
    table = [[f"{r['chunk_tokens']:,}", TARGETS.get(r["chunk_tokens"], ""), f"{r['chunks']:,}",
              r["bytes_per_token"], r["compute_s"], r["rate"] / 1e6, r["rate"] / base["rate"],
              r["open_s"] * 1e3, r["completeness_s"] * 1e3,
              _per_chunk_ms(r, base)] for r in out["rows"]]
    headers = ["supervised tokens / chunk", "what writes it", "chunks", "bytes / token", "compute s", "M tokens/s",
               "vs default", "open ms", "completeness ms", "compute ms per extra chunk"]
    compacted = [[f"{r['chunk_tokens']:,}", f"{r['chunks']:,} -> {r['compacted']['chunks']:,}", r["compact_s"],
                  r["compacted"]["compute_s"], r["compacted"]["rate"] / 1e6, r["compacted"]["rate"] / base["rate"],
                  r["compacted"]["open_s"] * 1e3, r["compacted"]["completeness_s"] * 1e3] for r in out["rows"]]
    compacted_headers = ["written with tokens / chunk", "chunks", "compaction s", "compute s", "M tokens/s",
                         "vs default", "open ms", "completeness ms"]
    return "\n".join([markdown_table(headers, table), "", "After compaction (as `close()` does it):", "",
                      markdown_table(compacted_headers, compacted)])


def _per_chunk_ms(row: dict[str, Any], base: dict[str, Any]) -> str:
    extra = row["chunks"] - base["chunks"]
    return "-" if extra <= 0 else f"{(row['compute_s'] - base['compute_s']) / extra * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M tokens, two repeats")
    parser.add_argument("--tokens", type=int, default=10_000_000, help="supervised tokens in each spill")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="where to write the spills (default: the system temp dir)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    tokens, repeats = (1_000_000, 2) if args.quick else (args.tokens, args.repeats)
    root = Path(tempfile.mkdtemp(prefix="bench-chunks-", dir=args.tmp))
    try:
        rows = [measure(root, tokens, chunk_tokens, repeats) for chunk_tokens in TARGETS]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"tokens": tokens, "rows": rows, "machine": machine_info(), "versions": library_versions(),
           "command": " ".join(sys.argv)}
    print(report(out))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
