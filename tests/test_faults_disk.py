"""A full disk and a read-only disk, for real: a small tmpfs mounted for the test (we run as root, as CI does).

Where mounting is not permitted, the same tests inject the OSError at the chunk write call instead, and say so.
The error must be clear (what, why, how to fix), raised at the next update/finalize, must leave every committed
chunk readable, and resume=True must then finish with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

import spilleval.spill.chunk as chunk_module
from spilleval import Evaluator
from spilleval.spill import SpillReader, SpillWriteError

VOCAB = 61
N = 96
BATCH = 12
METRICS = ["token_accuracy", "nll"]


def batches() -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, dict[str, np.ndarray]]]:
    """Deterministic batches; each sample carries a 32 KiB array, so a 2 MiB disk fills after ~60 samples."""
    for start in range(0, N, BATCH):
        gen = torch.Generator().manual_seed(start)
        rows = np.arange(start, start + BATCH)
        labels = torch.randint(0, VOCAB, (BATCH, 8), generator=gen)
        labels[:, :3] = -100
        logits = torch.randn(BATCH, 8, VOCAB, generator=gen)
        embedding = np.random.default_rng(start).random((BATCH, 8192)).astype(np.float32)
        yield rows, logits, labels, {"embedding": embedding}


def run(spill: Path, *, resume: bool = False) -> dict[str, float]:
    evaluator = Evaluator(spill, METRICS, dataset_length=N, chunk_rows=6, compression=None, resume=resume)
    for rows, logits, labels, arrays in batches():
        evaluator.update(logits, labels, sample_index=rows, arrays=arrays)
    return evaluator.finalize()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    spill = tmp_path_factory.mktemp("disk") / "reference"
    return spill, run(spill)


class SmallDisk:
    """A tmpfs of a few MiB at `path`, or (when mounting is not permitted) a plain directory plus a reason."""

    def __init__(self, path: Path, size: str) -> None:
        path.mkdir()
        self.path = path
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.why_not = "" if self.mounted else f"cannot mount a tmpfs ({done.stderr.strip()}): error injected"

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", "2m")
    yield disk
    disk.unmount()


@contextmanager
def failing_writes(code: int, after: int) -> Iterator[None]:
    """Inject OSError(code) at the chunk file write once `after` files were written (no real disk to fill)."""
    real, count = chunk_module._write_file, [0]

    def write_file(path: Path, data: Any) -> dict[str, int]:
        count[0] += 1
        if count[0] > after:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data)

    chunk_module._write_file = write_file
    try:
        yield
    finally:
        chunk_module._write_file = real


def assert_committed_rows_exact(spill: Path, reference: Path) -> int:
    """Every committed row equals the uninterrupted run's row for that sample, bit for bit."""
    want = {}
    for batch in SpillReader(reference).iter_chunks():
        for i, index in enumerate(batch.sample_index):
            want[int(index)] = (batch.row(i)[0].tobytes(), batch.row(i)[1].tobytes(), batch.arrays["embedding"][i].tobytes())
    count = 0
    for batch in SpillReader(spill, allow_partial=True).iter_chunks():
        for i, index in enumerate(batch.sample_index):
            got = (batch.row(i)[0].tobytes(), batch.row(i)[1].tobytes(), batch.arrays["embedding"][i].tobytes())
            assert got == want[int(index)], f"sample {index}"
            count += 1
    return count


def test_full_disk_is_a_clear_error_and_resume_finishes_exactly(small_disk, uninterrupted, tmp_path):
    spill = small_disk.path / "spill"
    with (failing_writes(errno.ENOSPC, after=4) if not small_disk.mounted else _nothing()):
        with pytest.raises(SpillWriteError) as raised:
            run(spill)
    message = str(raised.value)
    assert "the disk is full" in message and "No space left on device" in message, small_disk.why_not
    assert "committed chunk(s)" in message and "intact" in message and "resume=True" in message
    assert not list(spill.glob("shards/rank-00000/.tmp-*")), "the failed chunk's temp directory was left behind"
    committed = assert_committed_rows_exact(spill, uninterrupted[0])
    assert 0 < committed < N

    if small_disk.mounted:
        small_disk.remount("size=64m")  # free space, as the error says, then resume
    assert run(spill, resume=True) == uninterrupted[1]
    assert assert_committed_rows_exact(spill, uninterrupted[0]) == N


def test_shard_turning_read_only_mid_run(small_disk, uninterrupted):
    """A read-only bind mount over the shard directory (the writer's open lock file keeps the tmpfs itself busy)."""
    if small_disk.mounted:
        small_disk.remount("size=64m")
    spill = small_disk.path / "spill"
    shard = spill / "shards" / "rank-00000"
    evaluator = Evaluator(spill, METRICS, dataset_length=N, chunk_rows=6, compression=None)
    stream = batches()
    for _ in range(3):
        rows, logits, labels, arrays = next(stream)
        evaluator.update(logits, labels, sample_index=rows, arrays=arrays)
    wait_for(lambda: len(list(shard.glob("chunk-*"))) == 3 * BATCH // 6)  # the writer thread committed them
    read_only = small_disk.mounted and read_only_bind(shard)
    try:
        with (failing_writes(errno.EROFS, after=0) if not read_only else _nothing()):
            with pytest.raises(SpillWriteError, match=r"could not write chunk-\d+: the directory is not writable"):
                for rows, logits, labels, arrays in stream:
                    evaluator.update(logits, labels, sample_index=rows, arrays=arrays)
                evaluator.finalize()
    finally:
        if read_only:
            subprocess.run(["umount", "-l", str(shard)], check=True)
    assert assert_committed_rows_exact(spill, uninterrupted[0]) > 0
    assert run(spill, resume=True) == uninterrupted[1]


def wait_for(condition: Any, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def read_only_bind(path: Path) -> bool:
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        return False
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
    return True


def test_unwritable_spill_dir_fails_before_any_work(tmp_path):
    """Root ignores file modes, so as root the directory sits on a read-only mount."""
    parent = tmp_path / "ro"
    disk = None
    if os.geteuid() == 0:
        disk = SmallDisk(parent, "1m")
        if not disk.mounted:
            pytest.skip(disk.why_not.replace("error injected", "and root ignores file modes"))
        disk.remount("ro")
    else:
        parent.mkdir()
        parent.chmod(0o555)
    try:
        evaluator = Evaluator(parent / "spill", METRICS, dataset_length=N)
        rows, logits, labels, arrays = next(batches())
        with pytest.raises(SpillWriteError, match="cannot create the spill directory .* not writable"):
            evaluator.update(logits, labels, sample_index=rows, arrays=arrays)
    finally:
        if disk is not None:
            disk.unmount()
        else:
            parent.chmod(0o755)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def test_disk_full_while_recording_completion(tmp_path, uninterrupted, monkeypatch):
    """Every chunk is committed but shard.json cannot be written (injected: filling a disk at exactly that moment
    is not reproducible): a clear error, a readable partial spill, and resume only marks it complete."""
    import spilleval.spill.writer as writer_module

    def no_space(path: Path, data: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    spill = tmp_path / "spill"
    monkeypatch.setattr(writer_module, "write_json_atomic", no_space)
    with pytest.raises(SpillWriteError, match="the disk is full .* re-run with resume=True"):
        run(spill)
    monkeypatch.undo()
    assert assert_committed_rows_exact(spill, uninterrupted[0]) == N
    assert not SpillReader(spill, allow_partial=True).is_complete
    assert run(spill, resume=True) == uninterrupted[1]


def test_full_disk_while_saving_the_tokenizer_leaves_nothing_behind(tmp_path, tokenizer):
    """A disk that fills while the spill starts: at the tokenizer_config.json (Python's write), at tokenizer.json
    (the tokenizers library, whose Rust writer raises a bare `Exception`), or at the manifest after it. Each is a
    SpillWriteError naming the full disk; nothing of the spill is left, so the same run succeeds once there is room
    (it used to leave `.tmp-tokenizer` and the shard, and the next run said "already holds a spill")."""
    causes = []
    for size in ("4k", "8k", "12k"):  # tmpfs counts whole pages: the lock takes one, each tokenizer file one more
        disk = SmallDisk(tmp_path / f"disk-{size}", size)
        if not disk.mounted:
            pytest.skip(disk.why_not.replace("error injected", "a real full disk needs a tmpfs (root)"))
        try:
            spill = disk.path / "spill"
            evaluator = Evaluator(spill, METRICS, tokenizer=tokenizer, dataset_length=N)
            rows, logits, labels, arrays = next(batches())
            with pytest.raises(SpillWriteError, match="the disk is full") as failure:
                evaluator.update(logits, labels, sample_index=rows)
            causes.append(failure.value.__cause__)
            assert list(disk.path.iterdir()) == [], f"{size}: left {list(disk.path.rglob('*'))}"
            disk.remount("size=64m")  # free space, as the error says: the same run now works, no resume needed
            evaluator = Evaluator(spill, METRICS, tokenizer=tokenizer, dataset_length=BATCH)
            evaluator.update(logits, labels, sample_index=rows - rows[0])
            assert evaluator.finalize()["token_accuracy"] >= 0
            assert SpillReader(spill).tokenizer is not None
        finally:
            disk.unmount()
    tokenizers_errors = [c for c in causes if not isinstance(c, OSError)]
    assert tokenizers_errors and "No space left on device" in str(tokenizers_errors[0]), causes
