"""Host memory of evaluation as the eval set grows: `transformers.Trainer` in its usual set-ups vs `SpillingTrainer`.

Each (mode, eval-set size) runs in a child process of its own; the table gives the child's peak RSS during
`evaluate()`, its growth over the post-setup baseline, growth per sample, wall time and wall time relative to the
bare loop at the same size. A mode stops before a size whose predicted peak (from its measured growth per sample)
would pass --limit-gb, and a child that passes it anyway is killed; the table says which.

    .venv/bin/python tools/bench_memory.py            # the full run: 16 -> 4,096 samples (16,384 for the flat modes), about 50 min on 2 cores
    .venv/bin/python tools/bench_memory.py --quick    # a smoke run in well under 2 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence


from _bench_common import (
    GiB,
    MiB,
    ModelShape,
    PeakRSS,
    StepClock,
    SyntheticLM,
    bare_loop,
    build_llama,
    build_trainer,
    fresh_output_dir,
    machine_info,
    markdown_table,
    run_isolated,
    settled_rss,
)

MODES = {
    "bare": "bare torch.no_grad loop + argmax (floor)",
    "trainer": "Trainer + compute_metrics",
    "trainer_preprocess": "Trainer + preprocess_logits_for_metrics (argmax)",
    "trainer_batch_metrics": "Trainer + batch_eval_metrics",
    "spilling": "SpillingTrainer (token_accuracy + answer_macro_f1)",
}
FULL_SIZES = [16, 32, 64, 128, 256, 1024, 4096]
EXTENDED_SIZES = [16384]  # run further only for the floor and SpillingTrainer, the modes meant to stay flat
EXTENDED_MODES = ("bare", "spilling")
QUICK_SIZES = [8, 24]
SPILL_METRICS = ["token_accuracy", "answer_macro_f1"]
PREDICTION_MARGIN = 1.15


def measure(mode: str, samples: int, shape: dict, batch_size: int, answer_tokens: int) -> dict:
    """One evaluation of `samples` samples in this (child) process; memory and time of the evaluation alone."""
    model_shape = ModelShape(**shape)
    model = build_llama(model_shape)
    dataset = SyntheticLM(samples, model_shape.seq_len, model_shape.vocab, answer_tokens=answer_tokens)
    clock = StepClock(warmup=1, total=math.ceil(samples / batch_size))
    output_dir = fresh_output_dir()
    trainer = None
    if mode != "bare":
        tokenizer = None
        if mode == "spilling":
            from spilleval.testing import build_tokenizer

            tokenizer = build_tokenizer(vocab_size=model_shape.vocab)
        trainer = build_trainer(mode, model, dataset, batch_size=batch_size, output_dir=output_dir, clock=clock,
                                spill_metrics=SPILL_METRICS, tokenizer=tokenizer)
    baseline = settled_rss()
    with PeakRSS() as peak:
        start = time.perf_counter()
        if trainer is None:
            metrics = bare_loop(model, dataset, batch_size=batch_size, clock=clock, with_loss=False)
        else:
            metrics = trainer.evaluate()
        wall = time.perf_counter() - start
    shutil.rmtree(output_dir, ignore_errors=True)
    accuracy = metrics.get("token_accuracy", metrics.get("eval_token_accuracy"))
    return {"mode": mode, "samples": samples, "status": "ok", "baseline_rss": baseline, "peak_rss": peak.peak,
            "growth": peak.peak - baseline, "wall_s": wall, "token_accuracy": accuracy}


def predicted_peak(done: list[dict], samples: int) -> float | None:
    """Peak RSS at `samples`, extrapolated from the mode's last measured sizes (growth per sample)."""
    ok = [r for r in done if r["status"] == "ok"]
    if not ok:
        return None
    last = ok[-1]
    if len(ok) >= 2:
        prev = ok[-2]
        slope = (last["peak_rss"] - prev["peak_rss"]) / (last["samples"] - prev["samples"])
    else:
        slope = last["growth"] / last["samples"]
    return last["peak_rss"] + max(slope, 0.0) * (samples - last["samples"]) * PREDICTION_MARGIN


def run_all(modes: list[str], sizes: list[int], shape: ModelShape, *, batch_size: int, answer_tokens: int,
            limit: int, extended: Sequence[int] = (),
            on_row: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """Sizes in the outer loop, modes inside: load on a shared machine drifts over time, not between modes.
    `on_row` sees the results after every row (the full run takes long: what is done is saved as it goes)."""
    results: list[dict] = []
    stopped: set[str] = set()
    for samples in sizes:
        for mode in modes:
            if mode in stopped or (samples in extended and mode not in EXTENDED_MODES):
                continue
            done = [r for r in results if r["mode"] == mode]
            guess = predicted_peak(done, samples)
            if guess is not None and guess > limit:
                row = {"mode": mode, "samples": samples, "predicted_peak": guess,
                       "status": f"not run: predicted peak {guess / GiB:.1f} GB > {limit / GiB:.0f} GB limit"}
            else:
                kwargs = {"mode": mode, "samples": samples, "shape": asdict(shape), "batch_size": batch_size,
                          "answer_tokens": answer_tokens}
                row = {"mode": mode, "samples": samples, **run_isolated(measure, kwargs, start_method="fork",
                                                                        rss_limit=limit)}
            results.append(row)
            if row["status"] != "ok":
                stopped.add(mode)
            print(_progress(row), flush=True)
            _add_ratios(results)
            on_row(results)
    return results


def _progress(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['mode']:>22} {row['samples']:>6}  {row['status']}"
    return (f"{row['mode']:>22} {row['samples']:>6}  peak {row['peak_rss'] / MiB:8.0f} MB  growth "
            f"{row['growth'] / MiB:8.1f} MB  {row['wall_s']:7.1f} s  acc {row['token_accuracy']:.4f}")


def _add_ratios(results: list[dict]) -> None:
    bare = {r["samples"]: r["wall_s"] for r in results if r["mode"] == "bare" and r["status"] == "ok"}
    for r in results:
        if r["status"] == "ok" and r["samples"] in bare:
            r["wall_vs_bare"] = r["wall_s"] / bare[r["samples"]]


# ------------------------------------------------------------------------------------------------ report
def results_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append([
            MODES[r["mode"]], f"{r['samples']:,}",
            f"{r['peak_rss'] / MiB:,.0f}" if ok else None,
            f"{r['growth'] / MiB:,.1f}" if ok else None,
            f"{r['growth'] / r['samples'] / 1024:,.1f}" if ok else None,
            f"{r['wall_s']:.1f}" if ok else None,
            f"{r['wall_vs_bare']:.2f}" if "wall_vs_bare" in r else None,
            f"{r['token_accuracy']:.5f}" if ok and r.get("token_accuracy") is not None else None,
            "ok" if ok else r["status"],
        ])
    headers = ["mode", "samples", "peak RSS (MB)", "growth over baseline (MB)", "growth / sample (KB)",
               "wall (s)", "wall × bare", "token acc.", "status"]
    return markdown_table(headers, rows)


def summary_table(results: list[dict]) -> str:
    """Per mode: peak RSS at its smallest and largest measured sizes, the difference and the slope."""
    rows = []
    for mode, label in MODES.items():
        ok = [r for r in results if r["mode"] == mode and r["status"] == "ok"]
        if not ok:
            continue
        first, last = ok[0], ok[-1]
        delta = last["peak_rss"] - first["peak_rss"]
        span = last["samples"] - first["samples"]
        stopped = next((r["status"] for r in results if r["mode"] == mode and r["status"] != "ok"), "")
        rows.append([label, f"{first['samples']:,} → {last['samples']:,}", f"{first['peak_rss'] / MiB:,.0f}",
                     f"{last['peak_rss'] / MiB:,.0f}", f"{delta / MiB:+,.1f}",
                     f"{delta / span / 1024:,.1f}" if span else None, stopped or "ran every size"])
    headers = ["mode", "samples", "peak RSS first (MB)", "peak RSS last (MB)", "Δ peak (MB)", "Δ / sample (KB)",
               "stopped"]
    return markdown_table(headers, rows)


def plot(results: list[dict], limit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for mode, label in MODES.items():
        ok = [r for r in results if r["mode"] == mode and r["status"] == "ok"]
        if not ok:
            continue
        line, = ax.plot([r["samples"] for r in ok], [r["peak_rss"] / GiB for r in ok], marker="o", ms=4,
                        label=label)
        guess = next((r for r in results if r["mode"] == mode and "predicted_peak" in r), None)
        if guess is not None:
            ax.plot([ok[-1]["samples"], guess["samples"]], [ok[-1]["peak_rss"] / GiB, guess["predicted_peak"] / GiB],
                    ls=":", marker="x", color=line.get_color())
    ax.axhline(limit / GiB, color="grey", ls="--", lw=1)
    ax.text(0.99, limit / GiB, "memory limit (x: predicted, not run)", ha="right", va="bottom", fontsize=8,
            color="grey", transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eval-set size (samples)")
    ax.set_ylabel("peak RSS during evaluate() (GB)")
    ax.set_title("Host memory vs eval-set size (Llama, vocab 32k, CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small sizes, a shorter sequence: a smoke run")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"eval-set sizes (default {FULL_SIZES})")
    parser.add_argument("--extended-sizes", type=int, nargs="*",
                        help=f"larger sizes for {', '.join(EXTENDED_MODES)} only (default {EXTENDED_SIZES})")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="modes to run (default: all available)")
    parser.add_argument("--seq-len", type=int, help="sequence length (default 256; --quick: 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=16, help="supervised positions at the end of a sample")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="host memory a mode may use (default 6)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for memory_cpu.{json,md,png}")
    args = parser.parse_args(argv)

    extended = args.extended_sizes if args.extended_sizes is not None else ([] if args.quick else EXTENDED_SIZES)
    sizes = sorted({*(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)), *extended})
    shape = ModelShape(seq_len=args.seq_len or (64 if args.quick else 256), hidden=32 if args.quick else 64)
    modes = args.modes or [m for m in MODES if m != "spilling" or _spilling_available()]
    if "spilling" not in modes:
        print("note: spilleval.trainer.SpillingTrainer is not available; its mode is skipped", file=sys.stderr)
    _preload(modes)  # children are forked: they start with these imports done
    limit = int(args.limit_gb * GiB)
    info = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(results: list[dict]) -> str:
        report = {"machine": info, "command": command.strip(), "shape": asdict(shape), "batch_size": args.batch_size,
                  "answer_tokens": args.answer_tokens, "limit_bytes": limit, "results": results}
        (args.out / "memory_cpu.json").write_text(json.dumps(report, indent=1))
        tables = results_table(results) + "\n\n" + summary_table(results) + "\n"
        (args.out / "memory_cpu.md").write_text(tables)
        return tables

    results = run_all(modes, sizes, shape, batch_size=args.batch_size, answer_tokens=args.answer_tokens, limit=limit,
                      extended=extended, on_row=save)
    print(save(results))
    plot(results, limit, args.out / "memory_cpu.png")  # at the end: plotting grows this parent, which children share
    failed = [r for r in results if r["status"].startswith("failed")]
    for r in failed:
        print(r.get("traceback", r["status"]), file=sys.stderr)
    return 1 if failed else 0


def _spilling_available() -> bool:
    return importlib.util.find_spec("spilleval.trainer") is not None


def _preload(modes: list[str]) -> None:
    """Imports done before the first child is forked, so every child starts from the same baseline."""
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import spilleval.testing  # noqa: F401

    if "spilling" in modes:
        import spilleval.trainer  # noqa: F401


if __name__ == "__main__":
    sys.exit(main())
