"""Before and after: `spilleval compute` of some metrics on one spill under two git revisions, alternating.

    .venv/bin/python tools/bench_revisions.py e8a1d2e HEAD --metrics cider distinct_n --workers 1 2
    .venv/bin/python tools/bench_revisions.py HEAD~1 HEAD --tokens 2560000 --rounds 3

Each revision is checked out into a temporary `git worktree` and run from there (`python -m spilleval.cli compute
SPILL -m METRIC --workers N --bootstrap 0 --json -q`, a fresh process each time, the revision's package first on
the path; the rest of the environment is this one). The spill is bench_compute's caption spill of --tokens tokens
(`PrefixSpills`: a real word-level tokenizer, 1-5 references per sample), written once by this tree. The runs
alternate between the revisions, round after round, so that the machine's drift falls on both; the table shows
each revision's best wall time and new / old. Every pair of results must be equal (the script checks): a change
of speed, not of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402
from bench_compute import CLASS_WORDS, PrefixSpills, caption_tokenizer, metric_specs  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent


def checkout(revision: str, into: Path) -> Path:
    """A detached worktree of `revision` at `into` (removed by `remove_checkout`)."""
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "-q", str(into), revision], check=True)
    return into


def remove_checkout(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(path)], check=False)


def timed_compute(tree: Path, spill: Path, metric: str, workers: int) -> tuple[float, dict]:
    """(wall seconds, results) of one `spilleval compute` process running the package of `tree`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "spilleval.cli", "compute", str(spill), "-m", metric, "--workers", str(workers),
               "--bootstrap", "0", "--json", "-q"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree, check=True)
    return time.perf_counter() - start, json.loads(done.stdout)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the baseline revision")
    parser.add_argument("new", help="the revision measured against it")
    parser.add_argument("--metrics", nargs="+", default=["cider", "distinct_n", "answer_macro_f1"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--tokens", type=int, default=10_240_000, help="supervised tokens in the caption spill")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each revision, alternating")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = caption_tokenizer()
    specs = metric_specs(tokenizer.convert_tokens_to_ids(list(CLASS_WORDS)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spill = PrefixSpills(root / "spills", args.tokens, tokenizer, specs).get(args.tokens)
        trees = {name: checkout(revision, root / name) for name, revision in (("old", args.old), ("new", args.new))}
        try:
            raw: dict = {"machine": machine_info(), "old": args.old, "new": args.new, "tokens": args.tokens,
                         "samples": spill.samples, "runs": []}
            rows = []
            for metric in args.metrics:
                for workers in args.workers:
                    times: dict[str, list[float]] = {"old": [], "new": []}
                    results = {}
                    for _ in range(args.rounds):
                        for name, tree in trees.items():
                            seconds, results[name] = timed_compute(tree, spill.path, metric, workers)
                            times[name].append(seconds)
                    if results["old"] != results["new"]:
                        raise SystemExit(f"{metric}, {workers} workers: the revisions disagree: {results}")
                    old, new = min(times["old"]), min(times["new"])
                    raw["runs"].append({"metric": metric, "workers": workers, **times})
                    rows.append([metric, str(workers), f"{old:.2f} s", f"{new:.2f} s", f"{new / old:.2f}x"])
                    print(f"  {metric} {workers} workers: old {times['old']}, new {times['new']}", flush=True)
        finally:
            for tree in trees.values():
                remove_checkout(tree)
    print(f"{spill.samples:,} samples, {args.tokens:,} tokens; old {args.old}, new {args.new}; "
          f"machine: {json.dumps(raw['machine'])}")
    print(markdown_table(["metric", "workers", "old (best)", "new (best)", "new / old"], rows))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
