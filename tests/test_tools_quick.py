"""The benchmark scripts still run: their --quick modes, as a user would start them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_bench_compute_quick(tmp_path):
    done = subprocess.run([sys.executable, "tools/bench_compute.py", "--quick", "--tmp", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in ("numpy over the ids in memory", "spill, zstd (default)", "spill, uncompressed",
                     "every column decoded", "Entropy floor", "zstd level 1"):
        assert expected in done.stdout, expected
    assert not list(tmp_path.iterdir())  # the spills it wrote are gone


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    done = subprocess.run([sys.executable, "tools/bench_memory.py", "--quick", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "memory_cpu.json").read_text())
    rows = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["mode"] for r in rows} == {"bare", "trainer", "trainer_preprocess", "trainer_batch_metrics", "spilling"}
    assert len({r["token_accuracy"] for r in rows if r["samples"] == 24}) == 1  # every mode evaluates the same
    assert (tmp_path / "memory_cpu.png").stat().st_size > 10_000
    assert "SpillingTrainer (token_accuracy + answer_macro_f1)" in (tmp_path / "memory_cpu.md").read_text()


@pytest.mark.slow
def test_bench_gpu_quick_runs_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "tools/bench_gpu.py", "--quick", "--out", str(tmp_path),
                           "--modes", "bare_fwd_loss", "trainer_preprocess", "spilling"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert all(r["status"] == "ok" for r in results.values())
    losses = {round(r["eval_loss"], 4) for r in results.values()}
    assert len(losses) == 1, losses  # the fused chunked loss equals the model's own
    assert "time ≤ 1.03 × bare forward + loss" in (tmp_path / "gpu.md").read_text()
