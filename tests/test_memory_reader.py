"""Bounded memory: recomputing metrics from a spill of millions of supervised tokens does not hold it in memory.

The measurements run `compute_from_spill` in a fresh subprocess and read its peak RSS from the kernel's high-water
mark (no sampling can miss a spike). The growth is the peak minus the RSS just before computing. The spills are
written directly with `SpillWriter` (no model), in small chunks so that there are many of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_manifest, write_spill

from spilleval.batch import SampleBatch

MiB = 2**20

CHILD = r"""
import json, sys, time
from spilleval.metrics import compute_from_spill
from spilleval.testing import peak_rss, reset_peak_rss

metric, warm_up, *spills = sys.argv[1:]
compute_from_spill(warm_up, [metric])  # touch every code path once (libraries' pages, tokenizer) before measuring
for spill in spills:
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    result = compute_from_spill(spill, [metric])
    seconds = time.perf_counter() - start
    print(json.dumps({"spill": spill, "growth": peak_rss() - rss_before, "result": result, "seconds": seconds}))
"""


def measure(metric: str, warm_up: Path, *spills: Path) -> dict[str, dict]:
    """Peak RSS growth of `compute_from_spill(spill, [metric])` for each spill, in a fresh subprocess.

    The peak is the kernel's high-water mark (VmHWM, reset before each run), so no spike can be missed.
    (`ru_maxrss` would not do: after fork + exec it starts from the parent's peak.)
    """
    done = subprocess.run([sys.executable, "-c", CHILD, metric, str(warm_up), *map(str, spills)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.strip().splitlines()]
    return {Path(run["spill"]).name: run for run in runs}


def token_batches(total_tokens: int, seed: int, *, batch_tokens: int = 500_000):
    """Realistic rows (20-400 tokens), ids over a 32,000 vocabulary, predictions right ~70% of the time.
    Yields (batch, correct tokens) so the expected accuracy is known without keeping anything."""
    rng = np.random.default_rng(seed)
    next_index, written = 0, 0
    while written < total_tokens:
        lengths = rng.integers(20, 401, size=max(1, batch_tokens // 210))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        labels = rng.integers(0, 32_000, size=int(offsets[-1]), dtype=np.uint16)
        right = rng.random(len(labels)) < 0.7
        preds = np.where(right, labels, rng.integers(0, 32_000, size=len(labels), dtype=np.uint16))
        batch = SampleBatch(np.arange(next_index, next_index + len(lengths)), offsets, preds, labels)
        next_index += len(lengths)
        written += len(labels)
        yield batch, int(np.count_nonzero(preds == labels))


def write_token_spill(path: Path, total_tokens: int, chunk_bytes: int) -> tuple[int, int]:
    correct = tokens = 0

    def batches():
        nonlocal correct, tokens
        for batch, right in token_batches(total_tokens, seed=total_tokens):
            correct, tokens = correct + right, tokens + batch.num_tokens
            yield batch

    write_spill(path, batches(), make_manifest(32_000, metrics=["token_accuracy"]), chunk_bytes=chunk_bytes)
    return correct, tokens


@pytest.mark.slow
def test_token_accuracy_memory_scales_with_chunk_size_not_spill_size(tmp_path):
    plan = {"warm": (20_000, 1 * MiB), "5M": (5_000_000, 1 * MiB), "20M": (20_000_000, 1 * MiB),
            "5M-8x-chunks": (5_000_000, 8 * MiB)}
    expected = {}
    for name, (tokens, chunk) in plan.items():
        correct, total = write_token_spill(tmp_path / name, tokens, chunk)
        expected[name] = ({"token_accuracy": correct / total}, total * 4)  # ids as uint16: what holding all costs
    runs = measure("token_accuracy", *(tmp_path / name for name in plan))
    for name, run in runs.items():
        assert run["result"] == expected[name][0]  # exact, from the spill
    growth = {name: run["growth"] / MiB for name, run in runs.items()}
    print("token_accuracy peak growth MiB", growth)
    small, large, big_chunks = growth["5M"], growth["20M"], growth["5M-8x-chunks"]
    # 4x the spill: the same growth (allocator noise aside), a small fraction of the data's own size
    assert large < small + 4, growth
    assert large < expected["20M"][1] / MiB / 4, growth
    # 8x the chunk size: the growth follows the chunk size
    assert big_chunks > small + 8, growth


def answer_batches(total_tokens: int, seed: int):
    """Answers of 10-40 words: 2,000 distinct answers, each with 3 wrong variants (one word changed) that wrong
    predictions pick from, so the set of distinct answers is the same for a small and a large spill."""
    rng = np.random.default_rng(0)
    answers = [rng.integers(5, 61, size=rng.integers(10, 41)).astype(np.uint16) for _ in range(2000)]
    variants = [[_one_word_changed(a, rng) for _ in range(3)] for a in answers]
    rng = np.random.default_rng(seed)
    next_index, written = 0, 0
    while written < total_tokens:
        picks = rng.integers(0, len(answers), size=10_000)
        wrong = rng.random(len(picks)) < 0.3
        which = rng.integers(0, 3, size=len(picks))
        labels = np.concatenate([answers[i] for i in picks])
        preds = np.concatenate([variants[i][w] if bad else answers[i] for i, w, bad in zip(picks, which, wrong)])
        lengths = np.array([len(answers[i]) for i in picks])
        yield SampleBatch(np.arange(next_index, next_index + len(picks)), np.concatenate([[0], np.cumsum(lengths)]),
                          preds, labels)
        next_index += len(picks)
        written += len(labels)


def _one_word_changed(answer: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = answer.copy()
    out[rng.integers(len(out))] = rng.integers(5, 61)
    return out


class DecodedTextSize:
    """What holding every decoded answer would cost: a Python str (49 bytes + 1 per ASCII char) per pred and label.
    Counted while the batches pass on their way to the writer."""

    def __init__(self, tokenizer) -> None:
        self.word_chars = np.array([len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))])
        self.bytes = 0

    def count(self, batches):
        for batch in batches:
            for ids in (batch.pred_ids, batch.label_ids):
                chars = np.add.reduceat(self.word_chars[ids] + 1, batch.offsets[:-1]) - 1  # words, one space apart
                self.bytes += int((49 + chars).sum())
            yield batch


@pytest.mark.slow
def test_answer_macro_f1_over_5m_tokens_stays_flat(tmp_path, tokenizer):
    """Decoding 5M tokens into 350k answer strings: the peak grows by a bounded amount, the same as for a spill 5x
    smaller, and far less than the decoded text would take."""
    plan = {"warm": 20_000, "1M": 1_000_000, "5M": 5_000_000}
    text_bytes = {}
    for name, tokens in plan.items():
        manifest = make_manifest(len(tokenizer), metrics=["answer_macro_f1"])
        size = DecodedTextSize(tokenizer)
        write_spill(tmp_path / name, size.count(answer_batches(tokens, seed=tokens)), manifest, tokenizer=tokenizer,
                    chunk_bytes=1 * MiB)
        text_bytes[name] = size.bytes
    runs = measure("answer_macro_f1", *(tmp_path / name for name in plan))
    assert all(0 < run["result"]["answer_macro_f1"] < 1 for run in runs.values())
    growth = {name: run["growth"] / MiB for name, run in runs.items()}
    print("answer_macro_f1 peak growth MiB", growth, "decoded text MiB", text_bytes["5M"] / MiB)
    assert growth["5M"] < growth["1M"] + 8, growth
    assert growth["5M"] < text_bytes["5M"] / MiB / 4, (growth, text_bytes["5M"] / MiB)
