"""Integrity checks, partial spills, resume, the writer lock, and clear errors on bad input.

Crashes of a real process are in test_faults_kill.py, a full or read-only disk in test_faults_disk.py, reading
untrusted spills (pickle, remote code, path traversal) in test_reliability_safety.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import _crash_worker as workload
import numpy as np
import pytest
import torch

from spilleval import Evaluator
from spilleval.cli import main
from spilleval.decode import TokenizerMismatchError
from spilleval.evaluator import EmptyEvaluationError
from spilleval.metrics import compute_from_spill
from spilleval.metrics.runner import MetricConfigError
from spilleval.reduce import NonFiniteLogitsError, reduce_logits
from spilleval.spill import (
    Manifest,
    MissingChunkError,
    SpillExistsError,
    SpillFormatError,
    SpillLockedError,
    SpillReader,
    SpillWriter,
)
from spilleval.spill.chunk import ChunkChecksumError, ChunkTruncatedError
from spilleval.spill.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_DONE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    ChunkRecordError,
    SchemaVersionError,
)

METRICS = workload.METRICS  # token_accuracy, sequence_exact_match, nll, text_match, answer_macro_f1
N = 48


# ----------------------------------------------------------------------------------------------- helpers
def evaluate(spill: Path, indices: np.ndarray, *, resume: bool = False, batch_size: int = 6, chunk_rows: int = 4,
             finalize: bool = True, **kwargs: Any) -> Any:
    """Run the deterministic workload of `_crash_worker` over `indices`; finalize, or abort like a crash would."""
    evaluator = Evaluator(spill, kwargs.pop("metrics", METRICS), tokenizer=workload.TOKENIZER,
                          dataset_length=kwargs.pop("dataset_length", N), chunk_rows=chunk_rows, resume=resume,
                          **kwargs)
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        logits, labels, columns, arrays = workload.batch(rows)
        evaluator.update(logits, labels, sample_index=rows, columns=columns, arrays=arrays)
    if finalize:
        return evaluator.finalize()
    evaluator.abort()
    return evaluator


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    spill = tmp_path_factory.mktemp("uninterrupted") / "spill"
    return spill, evaluate(spill, np.arange(N))


@pytest.fixture
def spill(tmp_path, uninterrupted) -> Path:
    """A fresh copy of the complete spill (3+ chunks), free to corrupt."""
    target = tmp_path / "spill"
    shutil.copytree(uninterrupted[0], target)
    return target


def cli(monkeypatch, capsys, *args: Any) -> tuple[int, str, str]:
    """Run the real console entry point `spilleval.cli.main`: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["spilleval", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def chunk(spill: Path, seq: int) -> Path:
    return spill / SHARDS_DIR / "rank-00000" / f"chunk-{seq:06d}"


def read_everything(spill: Path) -> None:
    reader = SpillReader(spill)
    for _ in reader.iter_chunks():
        pass


# ----------------------------------------------------------------------------------------------- integrity
def test_truncated_chunk_is_named(spill):
    tokens = chunk(spill, 1) / "tokens.arrow"
    tokens.write_bytes(tokens.read_bytes()[:-7])
    with pytest.raises(ChunkTruncatedError, match=r"chunk-000001.*tokens\.arrow has \d+ bytes, expected \d+"):
        read_everything(spill)


def test_flipped_byte_is_named(spill):
    tokens = chunk(spill, 2) / "tokens.arrow"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x01
    tokens.write_bytes(bytes(data))
    with pytest.raises(ChunkChecksumError, match=r"chunk-000002.*tokens\.arrow fails its CRC-32 check"):
        read_everything(spill)


def test_flipped_byte_in_a_zarr_array_is_named(spill):
    record = json.loads((chunk(spill, 0) / "chunk.json").read_text())
    name = next(n for n in record["files"] if n.startswith("arrays.zarr/score/c"))
    path = chunk(spill, 0) / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ChunkChecksumError, match=f"chunk-000000.*{name} fails its CRC-32"):
        read_everything(spill)


def test_gap_in_the_chunk_sequence_is_named(spill):
    shutil.rmtree(chunk(spill, 1))
    with pytest.raises(MissingChunkError, match=r"chunk-000001 is missing \(found chunk-000002 after it\)"):
        SpillReader(spill)


def test_fewer_chunks_than_the_shard_promises_is_named(spill):
    promised = json.loads((spill / SHARDS_DIR / "rank-00000" / SHARD_DONE).read_text())["chunks"]
    shutil.rmtree(chunk(spill, promised - 1))
    with pytest.raises(MissingChunkError, match=f"{promised} chunks were committed, {promised - 1} are on disk"):
        SpillReader(spill)


def test_manifest_from_a_newer_schema_is_refused(spill):
    manifest = json.loads((spill / MANIFEST_NAME).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (spill / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match=f"schema {SCHEMA_VERSION + 1}, newer .* Upgrade spilleval"):
        SpillReader(spill)


@pytest.mark.parametrize("damage", ["not json", "fields"])
def test_corrupt_chunk_record_is_named(spill, damage):
    record_path = chunk(spill, 1) / "chunk.json"
    if damage == "not json":
        record_path.write_text(record_path.read_text()[:-10])
    else:
        record = json.loads(record_path.read_text())
        record["seq"] = "../../elsewhere"
        record_path.write_text(json.dumps(record))
    with pytest.raises(ChunkRecordError, match="chunk-000001/chunk.json"):
        SpillReader(spill)


def test_each_corruption_has_its_own_error_and_message(tmp_path, uninterrupted, monkeypatch, capsys):
    """Through the real CLI: exit code 2, one line naming the problem; every kind distinct."""
    def damaged(kind: str) -> Path:
        target = tmp_path / kind
        shutil.copytree(uninterrupted[0], target)
        c = chunk(target, 1)
        if kind == "truncated":
            (c / "tokens.arrow").write_bytes((c / "tokens.arrow").read_bytes()[:-1])
        elif kind == "flipped":
            data = bytearray((c / "tokens.arrow").read_bytes())
            data[-20] ^= 0xFF
            (c / "tokens.arrow").write_bytes(bytes(data))
        elif kind == "missing":
            shutil.rmtree(c)
        elif kind == "schema":
            manifest = json.loads((target / MANIFEST_NAME).read_text())
            (target / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 5}))
        elif kind == "record":
            (c / "chunk.json").write_text("{")
        return target

    messages = {}
    for kind in ("truncated", "flipped", "missing", "schema", "record"):
        code, out, err = cli(monkeypatch, capsys, "compute", damaged(kind), "--json")
        assert code == 2 and out == "", (kind, out)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        messages[kind] = err
    assert "expected" in messages["truncated"] and "CRC-32" in messages["flipped"]
    assert "chunk-000001 is missing" in messages["missing"] and "newer" in messages["schema"]
    assert "not valid JSON" in messages["record"]
    for kind in ("truncated", "flipped", "record"):
        assert "chunk-000001" in messages[kind]
    assert len(set(messages.values())) == 5


# ----------------------------------------------------------------------------------------------- partial spills
@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> Path:
    """A run that stopped after the first 30 of 48 samples (the writer was aborted, nothing marked complete)."""
    spill = tmp_path_factory.mktemp("partial") / "spill"
    evaluate(spill, np.arange(30), finalize=False)
    return spill


def test_inspect_reports_committed_and_missing(partial, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "inspect", partial, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["complete"] is False
    assert (info["samples_committed"], info["samples_expected"], info["missing"]) == (30, N, N - 30)
    assert info["missing_ranges"] == [[30, N]]
    code, out, _ = cli(monkeypatch, capsys, "inspect", partial)
    assert code == 0 and "PARTIAL" in out and f"30 of {N}" in out and f"30-{N - 1}" in out


def test_compute_refuses_a_partial_spill_and_names_the_flag(partial, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "compute", partial)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "partial spill" in err and "--allow-partial" in err


def test_compute_allow_partial_computes_on_what_is_there_and_says_so(partial, tmp_path, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "compute", partial, "--allow-partial", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["partial"] is True and f"30 of {N} samples" in payload["note"]
    # the same 30 samples, evaluated as a complete set of 30
    assert payload["metrics"] == evaluate(tmp_path / "first-30", np.arange(30), dataset_length=30)
    code, out, _ = cli(monkeypatch, capsys, "compute", partial, "--allow-partial")
    assert code == 0 and f"PARTIAL: computed on 30 of {N} samples" in out


# ----------------------------------------------------------------------------------------------- resume
def test_resume_skips_committed_samples_and_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    spill = tmp_path / "spill"
    order = np.random.default_rng(3).permutation(N)
    evaluate(spill, order[:29], finalize=False, batch_size=5)
    stale = spill / SHARDS_DIR / "rank-00000" / ".tmp-chunk-000099"  # a chunk a crash left half-written
    stale.mkdir()
    (stale / "tokens.arrow").write_bytes(b"half")

    evaluator = Evaluator(spill, METRICS, tokenizer=workload.TOKENIZER, dataset_length=N, chunk_rows=4, resume=True)
    assert not stale.exists()
    assert evaluator.num_committed == 29
    np.testing.assert_array_equal(evaluator.pending_indices(), np.sort(order[29:]))
    np.testing.assert_array_equal(evaluator.committed(order[27:31]), [True, True, False, False])
    np.testing.assert_array_equal(evaluator.committed(torch.as_tensor(order[:3])), [True] * 3)
    # the same loop again, batched differently: committed rows are dropped, mixed batches split
    for start in range(0, N, 7):
        rows = order[start : start + 7]
        logits, labels, columns, arrays = workload.batch(rows)
        reduced = evaluator.update(logits, labels, sample_index=rows, columns=columns, arrays=arrays)
        assert (reduced is None) == bool(evaluator.committed(rows).all())
    assert evaluator.finalize() == uninterrupted[1]
    reader = SpillReader(spill)
    assert reader.num_rows == N and len(reader) == N  # no sample spilled twice


def test_loss_sum_after_resume_equals_the_uninterrupted_one(tmp_path):
    def loss(spill: Path, cut: int | None) -> float:
        if cut is not None:
            evaluate(spill, np.arange(cut), finalize=False, metrics=["nll"])
        evaluator = Evaluator(spill, ["nll"], dataset_length=N, chunk_rows=4, resume=cut is not None)
        for start in range(0, N, 10):  # the straddling batch keeps only its pending rows' loss
            rows = np.arange(start, min(start + 10, N))
            logits, labels, _, _ = workload.batch(rows)
            evaluator.update(logits, labels, sample_index=rows)
        evaluator.finalize()
        return evaluator.loss_sum

    assert loss(tmp_path / "resumed", 23) == pytest.approx(loss(tmp_path / "whole", None), rel=1e-12)


def test_resume_through_add_and_add_reduced(tmp_path, uninterrupted):
    """Batches reduced elsewhere (generation, the trainer's loss call) are de-duplicated the same way."""
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(20), finalize=False)
    evaluator = Evaluator(spill, METRICS, tokenizer=workload.TOKENIZER, dataset_length=N, chunk_rows=4, resume=True)
    for start in range(0, N, 8):
        rows = np.arange(start, min(start + 8, N))
        logits, labels, columns, arrays = workload.batch(rows)
        reduced = reduce_logits(logits, labels, sample_index=rows, keep_logprob=True)
        if start // 8 % 2:
            evaluator.add_reduced(reduced, columns=columns, arrays=arrays)
        else:
            host = reduced.to_host()
            host.columns, host.arrays = columns, arrays
            evaluator.add(host, vocab_size=workload.VOCAB)
    assert evaluator.finalize() == uninterrupted[1]


def test_resume_of_a_finished_spill_recomputes_the_same_results(tmp_path, uninterrupted):
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(N))
    assert evaluate(spill, np.arange(N), resume=True) == uninterrupted[1]


def test_resume_into_an_empty_directory_is_a_fresh_run(tmp_path, uninterrupted):
    assert evaluate(tmp_path / "new", np.arange(N), resume=True) == uninterrupted[1]


def test_without_resume_an_existing_spill_is_never_overwritten(partial):
    with pytest.raises(SpillExistsError, match="resume=True"):
        Evaluator(partial, METRICS, tokenizer=workload.TOKENIZER, dataset_length=N)


@pytest.mark.parametrize("change", [{"dataset_length": N + 1}, {"keep_logprob": False, "metrics": ["token_accuracy"]}])
def test_resume_refuses_a_different_evaluation(tmp_path, change):
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(10), finalize=False)
    kwargs = {"metrics": METRICS, "tokenizer": workload.TOKENIZER, "dataset_length": N, **change}
    with pytest.raises(SpillExistsError, match="cannot resume: the spill on disk has"):
        Evaluator(spill, kwargs.pop("metrics"), resume=True, **kwargs)


def test_resume_refuses_a_model_with_another_vocabulary(tmp_path):
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(10), finalize=False, metrics=["token_accuracy"])
    evaluator = Evaluator(spill, ["token_accuracy"], dataset_length=N, resume=True)
    with pytest.raises(ValueError, match=f"vocabulary of {workload.VOCAB + 3} but the spill was started with"):
        evaluator.update(torch.zeros(2, 4, workload.VOCAB + 3), torch.ones(2, 4, dtype=torch.long),
                         sample_index=[40, 41])


# ----------------------------------------------------------------------------------------------- the lock
HOLDER = """
import sys
from spilleval.spill import Manifest, SpillWriter
writer = SpillWriter(sys.argv[1], Manifest(task="causal_lm", vocab_size=100, id_dtype="uint16", dataset_length=8))
print("locked", flush=True)
sys.stdin.read()  # hold the shard until the test closes stdin or kills this process
"""


@pytest.mark.slow
def test_a_second_writer_gets_an_error_naming_the_holder(tmp_path):
    spill = tmp_path / "spill"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(spill)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        names_holder = f"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(SpillLockedError, match=names_holder):
            SpillWriter(spill, holder_manifest(), resume=True)
        with pytest.raises(SpillLockedError, match=names_holder):  # not "already exists": it is in use
            Evaluator(spill, ["token_accuracy"], dataset_length=8)
        with pytest.raises(SpillLockedError, match=names_holder):
            Evaluator(spill, ["token_accuracy"], dataset_length=8, resume=True)
        os.kill(holder.pid, signal.SIGKILL)  # the lock dies with its process: no stale lock after a crash
        holder.wait(timeout=30)
        SpillWriter(spill, holder_manifest(), resume=True).close()
        assert SpillReader(spill, allow_partial=True).is_complete
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


def holder_manifest() -> Manifest:
    """The manifest the HOLDER process writes with."""
    return Manifest(task="causal_lm", vocab_size=100, id_dtype="uint16", dataset_length=8)


# ----------------------------------------------------------------------------------------------- bad input
def test_labels_that_do_not_line_up_fail_before_anything_is_lost(tmp_path):
    spill = tmp_path / "spill"
    evaluator = Evaluator(spill, ["token_accuracy"], dataset_length=N, chunk_rows=2)
    logits, labels, _, _ = workload.batch(np.arange(4))
    evaluator.update(logits, labels, sample_index=np.arange(4))
    with pytest.raises(ValueError, match=r"do not line up with logits .* label_fn"):
        evaluator.update(logits[:, :-1], labels, sample_index=np.arange(4, 8))
    evaluator.abort()
    assert len(SpillReader(spill, allow_partial=True)) == 4  # the batch before is committed


def test_empty_eval_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(EmptyEvaluationError, match="empty"):
        Evaluator(tmp_path / "a", ["token_accuracy"], dataset_length=0)
    with pytest.raises(EmptyEvaluationError, match="no sample was evaluated"):
        Evaluator(tmp_path / "b", ["token_accuracy"]).finalize()


def test_a_batch_with_every_label_ignored_is_counted(tmp_path):
    logits = torch.randn(3, 5, workload.VOCAB)
    labels = torch.full((3, 5), -100)
    labels[0, 2:] = torch.tensor([7, 8, 9])
    evaluator = Evaluator(tmp_path / "s", ["token_accuracy", "sequence_exact_match", "text_match"],
                          tokenizer=workload.TOKENIZER)
    evaluator.update(logits[:1], labels[:1], sample_index=[0])
    evaluator.update(logits[1:], labels[1:], sample_index=[1, 2])  # every label -100: not an error
    results = evaluator.finalize()
    reader = SpillReader(tmp_path / "s")
    assert len(reader) == 3 and reader.num_tokens == 3
    assert json.loads((tmp_path / "s" / "results.json").read_text())["provenance"]["dataset"]["samples"] == 3
    batch = next(reader.iter_batches(10))
    assert batch.lengths.tolist() == [3, 0, 0]
    first_right = int((logits[0, 1:4].argmax(-1) == labels[0, 2:]).all())
    assert results["sequence_exact_match"] == (first_right + 2) / 3  # an empty row is right, and counts


def test_vocab_above_65535_switches_to_uint32(tmp_path):
    vocab = 70_000
    labels = torch.tensor([[-100, 69_999, 65_536, 3]])
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0, 69_999] = logits[0, 1, 65_537] = logits[0, 2, 3] = 1.0
    evaluator = Evaluator(tmp_path / "s", ["token_accuracy"])
    evaluator.update(logits, labels)
    assert evaluator.finalize() == {"token_accuracy": 2 / 3}
    reader = SpillReader(tmp_path / "s")
    assert reader.manifest.id_dtype == "uint32"
    batch = next(reader.iter_batches(10))
    assert batch.label_ids.dtype == np.uint32 and batch.label_ids.tolist() == [69_999, 65_536, 3]
    assert batch.pred_ids.tolist() == [69_999, 65_537, 3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_sample(tmp_path, bad):
    spill = tmp_path / "spill"
    evaluator = Evaluator(spill, ["token_accuracy"], dataset_length=N, chunk_rows=100)
    logits, labels, _, _ = workload.batch(np.arange(4))
    evaluator.update(logits, labels, sample_index=np.arange(4))
    logits, labels, _, _ = workload.batch(np.arange(10, 13))
    logits[1, 3, 5] = bad  # sample 11, a supervised position
    with pytest.raises(NonFiniteLogitsError, match=r"sample\(s\) 11\. Check"):
        evaluator.update(logits, labels, sample_index=np.arange(10, 13))
    evaluator.abort()  # flushes what was buffered: nothing before the bad batch is lost
    assert len(SpillReader(spill, allow_partial=True)) == 4


def test_non_finite_logits_at_ignored_positions_are_fine(tmp_path):
    logits, labels, _, _ = workload.batch(np.arange(3))
    logits[0, 0] = float("nan")  # position 0 predicts labels[1] (a prompt position, -100)
    assert int(labels[0, 1]) == -100
    evaluator = Evaluator(tmp_path / "s", ["token_accuracy"])
    evaluator.update(logits, labels)
    evaluator.finalize()


def test_text_metric_without_a_tokenizer_in_the_spill(tmp_path, monkeypatch, capsys):
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(N), metrics=["token_accuracy"])  # the workload passes a tokenizer: remove it
    shutil.rmtree(spill / TOKENIZER_DIR)
    with pytest.raises(SpillFormatError, match=r"no tokenizer/ directory, but a text metric needs one"):
        compute_from_spill(spill, ["text_match"])
    code, _, err = cli(monkeypatch, capsys, "compute", spill, "--metrics", "text_match")
    assert code == 2 and "save_pretrained" in err and err.count("\n") == 1
    with pytest.raises(MetricConfigError, match="need a tokenizer"):
        Evaluator(tmp_path / "other", ["text_match"])


def test_tokenizer_with_another_vocabulary(tmp_path, monkeypatch, capsys):
    small = workload.VOCAB - 10
    logits, labels = torch.randn(2, 5, small), torch.randint(0, small, (2, 5))
    with pytest.raises(TokenizerMismatchError, match=f"{workload.VOCAB} tokens but the spill's vocabulary has {small}"):
        Evaluator(tmp_path / "live", ["text_match"], tokenizer=workload.TOKENIZER).update(logits, labels)
    assert not (tmp_path / "live" / MANIFEST_NAME).exists()  # refused before anything was written

    spill = tmp_path / "spill"
    evaluator = Evaluator(spill, ["token_accuracy"])
    evaluator.update(logits, labels)
    evaluator.finalize()
    workload.TOKENIZER.save_pretrained(str(spill / TOKENIZER_DIR))  # someone copies in the wrong tokenizer
    for workers in (1, 2):  # checked in the parent, or in the workers that load it (the parent does not)
        with pytest.raises(TokenizerMismatchError, match="is not the tokenizer of this model"):
            compute_from_spill(spill, ["text_match"], workers=workers)
    code, _, err = cli(monkeypatch, capsys, "compute", spill, "--metrics", "text_match")
    assert code == 2 and "is not the tokenizer of this model" in err and err.count("\n") == 1


def test_the_advertised_recovery_from_a_corrupt_chunk_works(tmp_path, uninterrupted):
    """The error says: delete the chunk and the later ones, resume. Doing exactly that gives the exact metrics."""
    spill = tmp_path / "spill"
    evaluate(spill, np.arange(30), finalize=False)
    tokens = chunk(spill, 2) / "tokens.arrow"
    tokens.write_bytes(tokens.read_bytes()[:-3])
    with pytest.raises(ChunkTruncatedError, match="delete this chunk directory and the later ones"):
        evaluate(spill, np.arange(N), resume=True)
    for later in sorted((spill / SHARDS_DIR / "rank-00000").glob("chunk-*"))[2:]:
        shutil.rmtree(later)
    assert evaluate(spill, np.arange(N), resume=True) == uninterrupted[1]
