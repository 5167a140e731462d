"""Fork server for the hostile-input tests: import spilleval once, then run each `spilleval` command in a fresh
forked process, as its own program, and report how it ended and its peak memory.

Starting a Python that imports the CLI, pyarrow, zarr, transformers and matplotlib costs seconds; forking this
warmed-up process costs milliseconds. Each request runs the real console entry point (`spilleval.cli.main`) in
its own child: the child's stdout and stderr go to files, an exception that escapes `main` is printed with its
traceback exactly as the interpreter would print it (exit code 1), so nothing is hidden and no state is shared
between commands. The child's peak memory comes from `os.wait4` (ru_maxrss, exact); RLIMIT_AS is only a coarse
guard that turns a runaway allocation into a quick failure instead of swapping the machine.

Protocol, one JSON object per line (after {"ready": true, "rss_kb": ...} once warmed up):
    {"argv": [...], "stdout": path, "stderr": path, "timeout_s": float, "address_space_mb": int}
        -> {"exit_code": int | null, "signal": int | null, "timed_out": bool, "maxrss_kb": int, "base_rss_kb": int,
            "seconds": float}
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def warm_up() -> None:
    """Import what the commands import lazily, so that forked children start warm."""
    import matplotlib.pyplot  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch
    import zarr  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import spilleval.cli  # noqa: F401
    import spilleval.errors  # noqa: F401
    import spilleval.metrics.builtin  # noqa: F401
    import spilleval.report.html  # noqa: F401

    torch.set_num_threads(1)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def vm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    return 0


def child(request: dict) -> None:
    """Become the `spilleval` program for one command; never returns."""
    code = 1
    try:
        limit = (vm_kb() // 1024 + request["address_space_mb"]) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdin = open(os.devnull)
        sys.argv = ["spilleval", *request["argv"]]
        from spilleval.cli import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - exactly what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(request: dict) -> dict:
    base = rss_kb()
    sys.stdout.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(request)
    deadline = start + request["timeout_s"]
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline and not timed_out:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.005)
    return {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "maxrss_kb": usage.ru_maxrss,
        "base_rss_kb": base,
        "seconds": time.monotonic() - start,
    }


class CliWorker:
    """The client side, for tests: starts the server, runs `spilleval` commands through it."""

    def __init__(self, scratch: Path, *, timeout_s: float = 60.0, address_space_mb: int = 6144) -> None:
        self.scratch, self.timeout_s, self.address_space_mb = Path(scratch), timeout_s, address_space_mb
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        ready = json.loads(self.process.stdout.readline())
        assert ready["ready"], ready

    def run(self, *argv: Any) -> dict[str, Any]:
        """{"exit_code", "signal", "timed_out", "maxrss_kb", "seconds", "stdout", "stderr", "argv"} of one command."""
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"argv": [str(a) for a in argv], "stdout": str(out), "stderr": str(err),
                   "timeout_s": self.timeout_s, "address_space_mb": self.address_space_mb}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        reply.update(stdout=out.read_text(errors="replace"), stderr=err.read_text(errors="replace"),
                     argv=request["argv"])
        return reply

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def serve() -> None:
    warm_up()
    print(json.dumps({"ready": True, "rss_kb": rss_kb()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
