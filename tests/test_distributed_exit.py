"""A distributed evaluation at the very end of a script exits with code 0, every time (torchrun, 2 gloo ranks).

It used not to in about one run in three (one in ten with `SpillingTrainer`): a gloo worker thread of the
coordinator's group released its last collective's tensors after the collective had returned, which needs the GIL;
when the interpreter was already finalizing, CPython ended the thread with `pthread_exit`, whose unwinding through
a `noexcept` destructor called `std::terminate` (exit code -6, the results already written). See
`spilleval.distributed`: the group is now destroyed, its threads joined, at the end of `finalize()`.
A race, so the launch is repeated; the script is the smallest that exercises the path (~4 s a launch on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spilleval.spill.manifest import RESULTS_NAME

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_exit_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCHES = 30
LAUNCH_TIMEOUT_S = 120


def test_evaluation_at_the_end_of_a_torchrun_script_exits_cleanly_every_time(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = []
    for launch in range(LAUNCHES):
        spill = tmp_path / f"spill-{launch}"
        done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(spill)],
                              env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        if done.returncode != 0:
            failures.append(f"launch {launch}: exit code {done.returncode}\n{done.stderr[-2000:]}")
        else:
            assert "token_accuracy" in json.loads((spill / RESULTS_NAME).read_text())["metrics"]
    assert not failures, f"{len(failures)} of {LAUNCHES} launches failed:\n" + "\n".join(failures[:3])
