"""Durability with the default settings: commits by time, the writer lock held to the end, file permissions that
follow the umask, and per-sample arrays described in the manifest (so `export` and readers see them).

Real writer threads, real files, real flock locks; the kill -9 test of the time bound is in test_faults_kill.py.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_manifest, random_batch
from spilleval import Evaluator, SpillReader
from spilleval.metrics import CorpusMetric
from spilleval.report import export_spill
from spilleval.spill import SpillWriter
from spilleval.spill.manifest import MANIFEST_NAME, RESULTS_NAME, SHARDS_DIR, load_manifest
from spilleval.spill.writer import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_COMMIT_INTERVAL_S,
    SpillLockedError,
    raise_if_locked,
)

VOCAB = 61
CLASSES = 3


def chunks_on_disk(spill: Path) -> list[Path]:
    return sorted((spill / SHARDS_DIR / "rank-00000").glob("chunk-*"))


def wait_for(condition, timeout: float = 10.0) -> float:
    """Seconds until `condition()` held (polling); fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.01)
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------- commit by time
def test_defaults_commit_within_a_minute_whatever_the_chunk_size():
    assert DEFAULT_COMMIT_INTERVAL_S == 60.0 and DEFAULT_CHUNK_BYTES == 64 * 2**20
    evaluator = Evaluator.__init__.__kwdefaults__
    assert evaluator["commit_interval_s"] == DEFAULT_COMMIT_INTERVAL_S
    assert evaluator["chunk_bytes"] == DEFAULT_CHUNK_BYTES and evaluator["chunk_rows"] is None


def test_writer_commits_on_time_with_no_new_batch(tmp_path):
    """Default chunk size, a short interval: each batch is committed once it is due, while the writer waits for
    the next batch that does not come (the thread waits on its queue with the deadline)."""
    rng = np.random.default_rng(0)
    spill = tmp_path / "spill"
    interval = 0.3
    writer = SpillWriter(spill, make_manifest(), commit_interval_s=interval)
    try:
        handed = time.monotonic()
        writer.write(random_batch(rng, 5))
        waited = wait_for(lambda: len(chunks_on_disk(spill)) == 1)
        assert time.monotonic() - handed >= interval  # committed by time: not before it was due
        assert waited < interval + 5.0
        writer.write(random_batch(rng, 4, start_index=5))
        writer.write(random_batch(rng, 3, start_index=9))
        wait_for(lambda: len(SpillReader(spill, allow_partial=True)) == 12)  # readable while the run goes on
        assert len(chunks_on_disk(spill)) >= 2
    finally:
        writer.close()
    reader = SpillReader(spill)
    assert reader.is_complete and len(reader) == 12
    assert [r.rows for r in reader.chunks] == [12]  # the small chunks were merged when the shard closed


def test_without_time_limit_a_small_eval_commits_nothing_before_the_end(tmp_path):
    """What the time limit fixes: with commit by size only, the default 64 MiB chunk is never filled."""
    rng = np.random.default_rng(1)
    spill = tmp_path / "spill"
    with SpillWriter(spill, make_manifest(), commit_interval_s=None) as writer:
        writer.write(random_batch(rng, 8))
        time.sleep(0.3)
        assert chunks_on_disk(spill) == []
    assert len(chunks_on_disk(spill)) == 1


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), float("inf")])
def test_commit_interval_must_be_positive(tmp_path, interval):
    with pytest.raises(ValueError, match="commit_interval_s must be a positive number"):
        SpillWriter(tmp_path / "spill", make_manifest(), commit_interval_s=interval)
    with pytest.raises(ValueError, match="commit_interval_s must be a positive number"):
        Evaluator(tmp_path / "spill", commit_interval_s=interval)  # before any forward pass
    assert not (tmp_path / "spill").exists()


def test_spilling_trainer_passes_chunk_and_commit_options(tokenizer, tmp_path):
    from transformers import TrainingArguments

    from spilleval.testing import encode_qa, pad_batch, qa_examples, tiny_llama
    from spilleval.trainer import SpillingTrainer

    data = [encode_qa(ex, tokenizer) for ex in qa_examples(10, seed=9)]
    model = tiny_llama(len(tokenizer), seed=5).eval()

    def trainer(name: str, **options: Any) -> SpillingTrainer:
        args = TrainingArguments(str(tmp_path / name), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="no", logging_strategy="no")
        return SpillingTrainer(model=model, args=args, eval_dataset=data, data_collator=pad_batch,
                               processing_class=tokenizer, **options)

    cut = trainer("cut", chunk_rows=3, commit_interval_s=30.0)
    cut.evaluate()
    assert [r.rows for r in SpillReader(cut.last_spill_dir).chunks] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="commit_interval_s must be a positive number"):
        trainer("bad", commit_interval_s=-1.0).evaluate()


# ------------------------------------------------------------------------------------------- the lock
class LockProbe(CorpusMetric):
    """A corpus metric that, while finalize runs it, records whether a second writer could enter."""

    name = "lock_probe"

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def compute(self, reader: SpillReader) -> dict[str, float]:
        try:
            raise_if_locked(reader.path)
            self.seen["raise_if_locked"] = "free"
        except SpillLockedError as e:
            self.seen["raise_if_locked"] = str(e)
        try:
            Evaluator(reader.path, ["token_accuracy"], resume=True)
            self.seen["second_writer"] = "entered"
        except SpillLockedError as e:
            self.seen["second_writer"] = str(e)
        self.seen["results_written"] = (reader.path / RESULTS_NAME).exists()
        return {"lock_probe": 1.0}


def test_the_lock_is_held_until_results_json_is_written(tmp_path):
    probe = LockProbe()
    spill = tmp_path / "spill"
    evaluator = Evaluator(spill, ["token_accuracy", probe])
    evaluator.update(torch.randn(4, 6, VOCAB), torch.randint(0, VOCAB, (4, 6)))
    results = evaluator.finalize()
    assert f"pid {os.getpid()}" in probe.seen["raise_if_locked"]  # held while the corpus metrics run
    assert "being written by another writer" in probe.seen["second_writer"]
    assert probe.seen["results_written"] is False  # ... which is before results.json
    assert json.loads((spill / RESULTS_NAME).read_text())["metrics"] == results
    raise_if_locked(spill)  # released once finalize returned


# ------------------------------------------------------------------------------------------- permissions
@pytest.fixture
def umask(request) -> Iterator[int]:
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def evaluate_with_scores(spill: Path, tokenizer: Any, *, batches: int = 3, resume: bool = False,
                         chunk_rows: int | None = 4) -> tuple[dict[str, float], np.ndarray]:
    """A classification-style evaluation: a `references` column and [B, 3] class scores in zarr."""
    rng = np.random.default_rng(7)
    scores = rng.random((batches * 4, CLASSES)).astype(np.float32)
    evaluator = Evaluator(spill, ["token_accuracy"], tokenizer=tokenizer, dataset_length=batches * 4,
                          chunk_rows=chunk_rows, resume=resume)
    for b in range(batches):
        rows = np.arange(4 * b, 4 * b + 4)
        gen = torch.Generator().manual_seed(b)
        evaluator.update(torch.randn(4, 6, len(tokenizer), generator=gen),
                         torch.randint(5, len(tokenizer), (4, 6), generator=gen), sample_index=rows,
                         columns={"references": [f"ref {i}" for i in rows]}, arrays={"class_scores": scores[rows]})
    return evaluator.finalize(), scores


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=["umask-022", "umask-027"])
def test_every_file_follows_the_umask(umask, tmp_path, tokenizer):
    """manifest.json, results.json, shard.json and exports were 0600 (mkstemp); chunks, tokenizer and the
    lock already followed the umask. Now everything a teammate's job reads does."""
    spill = tmp_path / "spill"
    evaluate_with_scores(spill, tokenizer)
    reader = SpillReader(spill)
    exported = [export_spill(reader, str(tmp_path / f"out.{fmt}"), fmt).path for fmt in ("jsonl", "parquet")]
    files = [p for p in spill.rglob("*") if p.is_file()] + [Path(p) for p in exported]
    directories = [spill, *(p for p in spill.rglob("*") if p.is_dir())]
    names = {p.name for p in files}
    assert {MANIFEST_NAME, RESULTS_NAME, "shard.json", "chunk.json", "tokens.arrow", "tokenizer.json"} <= names
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != (0o644 if p.name == ".lock" else 0o666) & ~umask}
    wrong |= {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in directories
              if stat.S_IMODE(p.stat().st_mode) != 0o777 & ~umask}
    assert not wrong, f"modes that ignore umask {oct(umask)}: {wrong}"


# ------------------------------------------------------------------------------------------- arrays in the manifest
def test_manifest_describes_arrays_and_columns_and_export_keeps_class_scores(tmp_path, tokenizer):
    spill = tmp_path / "spill"
    _, scores = evaluate_with_scores(spill, tokenizer)
    manifest = load_manifest(spill)
    assert manifest.arrays == {"class_scores": {"shape": [CLASSES], "dtype": "float32"}}
    assert manifest.columns == ["references"]
    reader = SpillReader(spill)
    export_spill(reader, str(tmp_path / "out.jsonl"), "jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == len(scores)
    for row in rows:
        assert np.array_equal(np.float32(row["class_scores"]), scores[row["sample_index"]])
        assert row["references"] == f"ref {row['sample_index']}"
    export_spill(reader, str(tmp_path / "out.parquet"), "parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    exported = np.array(table.column("class_scores").to_pylist(), dtype=np.float32)
    assert np.array_equal(exported, scores[table.column("sample_index").to_numpy()])


def test_resume_keeps_the_arrays_of_the_earlier_run(tmp_path, tokenizer):
    """A resumed run that has nothing left to spill still describes what the earlier run's chunks carry."""
    spill = tmp_path / "spill"
    first, _ = evaluate_with_scores(spill, tokenizer)
    (spill / RESULTS_NAME).unlink()
    again, _ = evaluate_with_scores(spill, tokenizer, resume=True)
    assert again == first
    assert load_manifest(spill).arrays == {"class_scores": {"shape": [CLASSES], "dtype": "float32"}}


def test_an_array_that_changes_shape_is_a_clear_error(tmp_path):
    evaluator = Evaluator(tmp_path / "spill", ["token_accuracy"])
    evaluator.update(torch.randn(2, 4, VOCAB), torch.randint(0, VOCAB, (2, 4)), arrays={"scores": np.zeros((2, 3))})
    evaluator.update(torch.randn(2, 4, VOCAB), torch.randint(0, VOCAB, (2, 4)), arrays={"scores": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"'scores' has per-sample shape \[4\].*but \[3\]"):
        evaluator.finalize()
