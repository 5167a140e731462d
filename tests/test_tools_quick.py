"""The benchmark scripts still run: their --quick modes, as a user would start them."""

from __future__ import annotations

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
