"""Memory of reading crafted spills (issue 13): each attack, each command, in a process of its own.

A small real spill (24 samples, a tokenizer, a zarr array per chunk) is written, then crafted as an attacker
would, with consistent records and checksums: a tokens.arrow whose zstd frames expand to 1 GB (2.5·10^8 ids a
column, 31 KB on disk), a zarr.json declaring 10^9 rows, manifests claiming 3·10^9 and 3·10^10 samples. Each
command runs as `python -m spilleval.cli` under RLIMIT_AS (--limit-gb, default 12) and the table gives its exit
code, peak RSS (os.wait4) and wall time. With --baseline PATH (a source tree of another spilleval, e.g.
`git archive main | tar -x -C PATH`), the same attacks run on it too, the spills written as its schema 1 (no seal).

    .venv/bin/python tools/bench_hostile.py --baseline /tmp/spilleval-main   # a few minutes: the baseline is slow
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402

from spilleval import Evaluator  # noqa: E402
from spilleval.batch import SampleBatch  # noqa: E402
from spilleval.spill.chunk import batch_to_table  # noqa: E402
from spilleval.spill.integrity import INTEGRITY_NAME, seal  # noqa: E402
from spilleval.testing import build_tokenizer  # noqa: E402

BOMB_IDS = 250_000_000


def build(path: Path) -> None:
    """24 samples in 5 chunks, with log-probs, a string column and a zarr array, as an evaluation writes them."""
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    evaluator = Evaluator(path, ["token_accuracy", "nll", "text_match"], tokenizer=tokenizer, dataset_length=24,
                          chunk_rows=5, keep_logprob=True)
    for start in range(0, 24, 6):
        lengths = rng.integers(1, 9, size=6)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = rng.integers(5, len(tokenizer), size=offsets[-1]).astype(np.uint16)
        batch = SampleBatch(np.arange(start, start + 6), offsets, ids, ids.copy(),
                            label_logprob=-rng.random(offsets[-1]).astype(np.float32),
                            columns={"ref": [f"ref {i}" for i in range(start, start + 6)]},
                            arrays={"score": rng.random((6, 3)).astype(np.float32)})
        evaluator.add(batch, vocab_size=len(tokenizer))
    evaluator.finalize()


def chunk(spill: Path, seq: int) -> Path:
    return spill / "shards" / "rank-00000" / f"chunk-{seq:06d}"


def recrc(chunk_dir: Path) -> None:
    record = json.loads((chunk_dir / "chunk.json").read_text())
    for name in record["files"]:
        data = (chunk_dir / name).read_bytes()
        record["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (chunk_dir / "chunk.json").write_text(json.dumps(record))


def fix_shard_record(spill: Path) -> None:
    shard = spill / "shards" / "rank-00000"
    records = [json.loads(p.read_text()) for p in sorted(shard.glob("chunk-*/chunk.json"))]
    done = {"rank": 0, "chunks": len(records), "rows": sum(r["rows"] for r in records),
            "tokens": sum(r["tokens"] for r in records)}
    (shard / "shard.json").write_text(json.dumps(done))


def bomb(spill: Path) -> None:
    zeros = np.zeros(BOMB_IDS, dtype=np.uint16)  # calloc'd: compressing it costs no memory
    table = batch_to_table(SampleBatch(np.array([0]), np.array([0, BOMB_IDS]), zeros, zeros))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    target = chunk(spill, 0)
    shutil.rmtree(target / "arrays.zarr")
    (target / "tokens.arrow").write_bytes(data)
    record = json.loads((target / "chunk.json").read_text())
    record["files"] = {"tokens.arrow": {"bytes": len(data), "crc32": zlib.crc32(data)}}
    record.update(rows=1, tokens=BOMB_IDS, min_index=0, max_index=0)
    (target / "chunk.json").write_text(json.dumps(record))
    fix_shard_record(spill)


def zarr_rows(spill: Path) -> None:
    path = chunk(spill, 1) / "arrays.zarr" / "score" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["shape"] = [10**9, 3]
    path.write_text(json.dumps(meta))
    recrc(chunk(spill, 1))


def dataset_length(value: int):
    def craft(spill: Path) -> None:
        manifest = json.loads((spill / "manifest.json").read_text())
        manifest["dataset_length"] = value
        (spill / "manifest.json").write_text(json.dumps(manifest))
    return craft


ATTACKS = [
    ("tokens.arrow: 31 KB of zstd declaring 2.5e8 ids a column", bomb, [["compute"], ["export", "-o", "{out}"]]),
    ("zarr.json declaring 1e9 rows", zarr_rows, [["show", "--index", "7"]]),
    ("manifest: dataset_length 3e9", dataset_length(3 * 10**9), [["inspect"]]),
    ("manifest: dataset_length 3e10", dataset_length(3 * 10**10), [["inspect"]]),
]


def run(spill: Path, argv: list[str], *, pythonpath: str | None, limit_gb: float, out: Path) -> list:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = [a.replace("{out}", str(out)) for a in argv]
    limit = int(limit_gb * 2**30)
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "spilleval.cli", args[0], str(spill), *args[1:]], env=env,
                               cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode(errors="replace").strip().splitlines()
    last = stderr[-1] if stderr else ""
    outcome = "error line" if last.startswith("error:") else ("traceback: " + last[:70] if "Traceback" in
                                                              "\n".join(stderr) else last[:70])
    return [os.waitstatus_to_exitcode(status), round(usage.ru_maxrss / 2**20, 2), round(time.time() - start, 1),
            outcome]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="source tree of another spilleval to compare with")
    parser.add_argument("--limit-gb", type=float, default=12.0, help="RLIMIT_AS of each command")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spilleval-hostile-"))
    rows = []
    try:
        build(root / "source")
        for name, craft, commands in ATTACKS:
            spill = root / "crafted"
            shutil.rmtree(spill, ignore_errors=True)
            shutil.copytree(root / "source", spill)
            craft(spill)
            versions = [("this tree", None, spill)]
            if args.baseline:
                old = root / "crafted-v1"
                shutil.rmtree(old, ignore_errors=True)
                shutil.copytree(spill, old)
                manifest = json.loads((old / "manifest.json").read_text())
                (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
                (old / INTEGRITY_NAME).unlink(missing_ok=True)
                versions.insert(0, ("baseline", args.baseline, old))
            seal(spill)  # as a crafted spill would carry it
            for argv in commands:
                for label, pythonpath, target in versions:
                    rows.append([name, argv[0], label, *run(target, argv, pythonpath=pythonpath,
                                                           limit_gb=args.limit_gb, out=root / "out.jsonl")])
                    print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(markdown_table(["crafted spill", "command", "spilleval", "exit", "peak RSS GB", "s", "stderr"], rows))
    print(json.dumps(machine_info(), indent=1))


if __name__ == "__main__":
    main()
