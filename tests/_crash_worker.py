"""Fork server for the kill -9 tests: import spilleval once, then fork one real evaluating process per request.

Starting a Python that imports torch + transformers and loads everything an evaluation touches costs seconds;
forking this warmed-up process costs milliseconds, so each trial is a fresh real process that the test can SIGKILL
at any instant. (zarr re-creates its IO loop after fork; torch runs single-threaded; tokenizers without rayon.)

Protocol, one JSON object per line (after {"ready": true} once warmed up):
    {"cmd": "run", "dir": ..., "resume": bool, "batch_size": int, "chunk_rows": int,
     "skip_committed": bool, "kill_at_batch": int | null, "results": path | null,
     optional: "commit_interval_s": float, "pace_s": float, "handed_log": path}   ->  {"pid": int}
    {"cmd": "wait", "pid": int}        ->  {"exit_code": int | null, "signal": int | null, "cpu_seconds": float}

The workload is deterministic: every sample's logits, labels, column and array are a function of its dataset index
alone, so any run, interrupted or not, batched in any way, writes the same rows for the same sample.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spilleval import Evaluator  # noqa: E402
from spilleval.testing import build_tokenizer  # noqa: E402

NUM_SAMPLES = 120
METRICS = ["token_accuracy", "sequence_exact_match", "nll", "text_match", "answer_macro_f1"]
ORDER = np.random.default_rng(0).permutation(NUM_SAMPLES)  # the loop visits samples in a fixed shuffled order
TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)


def sample(index: int) -> tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """(logits [T, V] float32, labels [T] int64, reference string, score [3] float32) of one dataset index."""
    rng = np.random.default_rng(1000 + index)
    length = int(rng.integers(3, 10))
    labels = rng.integers(5, VOCAB, size=length)
    logits = rng.normal(size=(length, VOCAB)).astype(np.float32)
    right = rng.random(length) < 0.6  # position t predicts labels[t + 1] (causal shift)
    logits[np.flatnonzero(right[1:]), labels[1:][right[1:]]] += 6.0
    labels[: int(rng.integers(1, 3))] = -100  # the prompt
    if index % 17 == 0:
        labels[:] = -100  # nothing supervised: still a sample
    return logits, labels, f"ref-{index}", rng.random(3).astype(np.float32)


def batch(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    parts = [sample(int(i)) for i in indices]
    width = max(len(p[1]) for p in parts)
    logits = np.zeros((len(parts), width, VOCAB), dtype=np.float32)
    labels = np.full((len(parts), width), -100, dtype=np.int64)
    for row, (lg, lab, _, _) in enumerate(parts):
        logits[row, : len(lab)] = lg
        labels[row, : len(lab)] = lab
    columns = {"ref": [p[2] for p in parts]}
    arrays = {"score": np.stack([p[3] for p in parts])}
    return torch.from_numpy(logits), torch.from_numpy(labels), columns, arrays


def evaluate(job: dict) -> None:
    """The evaluation loop a user writes, resumable, optionally SIGKILLing itself before batch `kill_at_batch`.

    `pace_s` stands for the forward pass (a sleep before each batch); with `handed_log`, the number of each batch
    and the time (monotonic) at which `update` returned are appended to that file, a line per batch."""
    options = {"commit_interval_s": job["commit_interval_s"]} if "commit_interval_s" in job else {}
    evaluator = Evaluator(job["dir"], METRICS, tokenizer=TOKENIZER, dataset_length=NUM_SAMPLES,
                          chunk_rows=job["chunk_rows"], resume=job["resume"], **options)
    size = job["batch_size"]
    handed_log = open(job["handed_log"], "a", buffering=1) if job.get("handed_log") else None  # noqa: SIM115
    for number, start in enumerate(range(0, NUM_SAMPLES, size)):
        if number == job.get("kill_at_batch"):
            os.kill(os.getpid(), signal.SIGKILL)
        indices = ORDER[start : start + size]
        if job["skip_committed"] and evaluator.committed(indices).all():
            continue  # what a loop does to save the forward pass; update() would drop the rows anyway
        logits, labels, columns, arrays = batch(indices)
        time.sleep(job.get("pace_s", 0.0))
        evaluator.update(logits, labels, sample_index=indices, columns=columns, arrays=arrays)
        if handed_log is not None:
            handed_log.write(f"{number} {time.monotonic()!r}\n")
    results = evaluator.finalize()
    if job.get("results"):
        with open(job["results"], "w") as f:
            json.dump(results, f)


def child(job: dict) -> None:
    code = 0
    try:
        evaluate(job)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        with open(job["dir"] + ".log", "a") as f:
            f.write(traceback.format_exc())
        code = 1
    os._exit(code)


def warm_up() -> None:
    """Run one small evaluation here, so that every lazy import and one-time set-up happens before forking."""
    scratch = tempfile.mkdtemp(prefix="spilleval-warm-")
    try:
        evaluate({"dir": os.path.join(scratch, "spill"), "resume": False, "batch_size": 64, "chunk_rows": 64,
                  "skip_committed": False})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def serve() -> None:
    torch.set_num_threads(1)  # no intra-op thread pool to inherit across fork
    warm_up()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "run":
            writers = [t.name for t in threading.enumerate() if t.name.startswith("spilleval-writer")]
            if writers:
                reply = {"error": f"writer threads alive ({writers}): forking would not be safe"}
            else:
                pid = os.fork()
                if pid == 0:
                    child(request)
                reply = {"pid": pid}
        else:
            _, status, usage = os.wait4(request["pid"], 0)
            reply = {
                "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
