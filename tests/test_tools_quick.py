"""The benchmark scripts still run: their --quick modes, as a user would start them."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_bench_compute_quick(tmp_path):
    spills, out = tmp_path / "spills", tmp_path / "compute.json"
    spills.mkdir()
    command = [sys.executable, "tools/bench_compute.py", "--quick", "--tmp", str(spills), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in ("numpy over the ids in memory", "spill, zstd (default)", "spill, uncompressed",
                     "every column decoded", "Entropy floor", "zstd level 1", "Bytes on disk per supervised token"):
        assert expected in done.stdout, expected
    assert not list(spills.iterdir())  # the spills it wrote are gone

    # the per-metric table: one row per built-in metric, every rate a positive finite number
    from spilleval.metrics.registry import available_metrics

    table = per_metric_table(done.stdout)
    assert sorted(table) == sorted(set(available_metrics()) - {"coco_caption"})  # Java jars: its own test
    for name, row in table.items():
        for column in ("supervised tokens/s", "samples/s", "vs token_accuracy"):
            value = float(row[column].replace(",", ""))
            assert math.isfinite(value) and value > 0, (name, column, row[column])
    assert float(table["token_accuracy"]["vs token_accuracy"]) == 1
    per_metric = json.loads(out.read_text())["per_metric"]
    assert per_metric["bytes"]["all"] > 0
    for row in per_metric["rows"]:
        assert row["result"] and all(math.isfinite(v) for v in row["result"].values()), row


def per_metric_table(stdout: str) -> dict[str, dict[str, str]]:
    """The markdown table whose first header is "metric", as {metric: {header: cell}}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric |"))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


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
    report = (tmp_path / "gpu.md").read_text()
    assert "time ≤ 1.03 × bare forward + loss" in report and "reduce_logits, reference path" in report


@pytest.mark.slow
def test_bench_chunks_quick(tmp_path):
    spills, out = tmp_path / "spills", tmp_path / "chunks.json"
    spills.mkdir()
    command = [sys.executable, "tools/bench_chunks.py", "--quick", "--tmp", str(spills), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "After compaction" in done.stdout and not list(spills.iterdir())
    rows = json.loads(out.read_text())["rows"]
    assert [r["chunks"] for r in rows][-1] > 1 and rows[-1]["compacted"]["chunks"] == 1  # small chunks merged
    assert all(math.isfinite(r["rate"]) and r["rate"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_hostile_runs_and_every_crafted_spill_is_refused_in_little_memory():
    done = subprocess.run([sys.executable, "tools/bench_hostile.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "this tree" in line]
    assert len(rows) == 5
    for cells in rows:
        exit_code, peak_gb, outcome = int(cells[3]), float(cells[4]), cells[6].strip()
        assert (exit_code, outcome) in ((2, "error line"), (0, "")) and peak_gb < 1, cells


def test_bench_intervals_quick(tmp_path):
    out = tmp_path / "intervals.json"
    done = subprocess.run([sys.executable, "tools/bench_intervals.py", "--samples", "300", "--repeats", "1",
                           "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert raw["samples"] == 300 and "--bootstrap 1000" in done.stdout
    assert raw["runs"]["1000"]["intervals"]["bleu"]["method"] == "bootstrap"
    assert raw["runs"]["1000"]["intervals"]["sequence_exact_match"]["method"] == "analytic"


@pytest.mark.slow
def test_bench_scaling_quick(tmp_path):
    command = [sys.executable, "tools/bench_scaling.py", "--seconds", "0.1", "--probe-tokens", "2000", "--max-tokens",
               "4000", "--workers", "1", "2", "--metrics", "bleu", "cider", "--cider-tokens", "2000", "--ceiling-seconds",
               "0.2", "--intervals", "20", "--workload-ceiling", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "scaling.json").read_text())
    assert out["runs"]["2"]["metrics"]["bleu"]["intervals"]["intervals"]["bleu"]["method"] == "bootstrap"
    assert "bleu with intervals (20 replicates)" in done.stdout
    assert set(out["runs"]) == {"1", "2"} == set(out["ceiling"]) == set(out["ceiling_memory"])
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert out["cider"]["before"] == pytest.approx(out["cider"]["after"], rel=1e-12)
    assert "2 workers: speed-up" in done.stdout
    assert out["runs"]["2"]["metrics"]["bleu"]["workload_ceiling"]["efficiency"] > 0
    assert "2 copies of the 1-worker run: efficiency (ceiling)" in done.stdout
    assert out["runs"]["2"]["metrics"]["bleu"]["busy_cores"] > 0 and "cores stolen" in done.stdout
    # each metric's prefix is the probe (2,000 tokens) or one doubling (4,000): a prefix ends with the first sample
    # that reaches its size, so it holds up to one answer (at most 30 tokens) more
    assert all(2000 <= spill["tokens"] < 4000 + 30 for spill in out["spills"].values())


@pytest.mark.slow
def test_trace_workers_quick():
    command = [sys.executable, "tools/trace_workers.py", "--tokens", "2000", "--workers", "2", "distinct_n"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "workers busy in each 1/25 of the run" in done.stdout and "run_task" in done.stdout
