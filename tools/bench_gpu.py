"""Evaluation speed and memory on one GPU: bare loops, `transformers.Trainer` set-ups and `SpillingTrainer`.

A config-built Llama of about 1B parameters in bf16 (hidden 2048, 16 layers, vocab 32,000, random init) evaluates
random sequences of 2,048 tokens, 8 per batch, every position supervised. Each mode runs in a fresh process and
reports its steady-state time per batch (warm-up batches excluded; mean between two synchronizations, and the median
of per-batch CUDA-event intervals), its peak GPU memory above the weights (`torch.cuda.max_memory_allocated` minus
the weights), GPU memory growth per batch, host peak RSS and host growth, and the eval loss and token accuracy (the
same in every mode: a check that they evaluate the same thing).

`Trainer` with no `preprocess_logits_for_metrics` keeps every batch's logits on the GPU (about 1 GB a batch here),
so it runs only --trainer-batches batches, sized to stay far from running out of memory.

    python tools/bench_gpu.py --out bench                          # the full run, one H100/H200, ~5 minutes
    python tools/bench_gpu.py --quick                              # a tiny model for a smoke run (CPU or GPU)
    python tools/bench_gpu.py --profile spilling bare_fwd_loss     # also torch.profiler tables of those modes

`spilling` reduces the logits with the fused Triton kernel on CUDA (spilleval/fused_reduce.py); `spilling_reference`
is the same trainer on the reference path (torch's argmax and log-softmax). A last table times the reduction alone
on one batch of logits of the model's shape: the argmax of the bare loop, the reference path and the fused kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

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
    count_parameters,
    fresh_output_dir,
    machine_info,
    markdown_table,
    run_isolated,
    settled_rss,
)

MODES = {
    "bare_fwd": "bare forward + argmax",
    "bare_fwd_loss": "bare forward + HF loss + argmax",
    "trainer_preprocess": "Trainer + preprocess_logits_for_metrics",
    "trainer_batch_metrics": "Trainer + batch_eval_metrics",
    "trainer": "Trainer default (logits kept)",
    "spilling": "SpillingTrainer",
    "spilling_reference": "SpillingTrainer, reference reduce (SPILLEVAL_FUSED_REDUCE=0)",
}
FULL_SHAPE = ModelShape(vocab=32_000, hidden=2048, layers=16, heads=16, kv_heads=16, intermediate=5632, seq_len=2048,
                        tie_embeddings=False)
QUICK_SHAPE = ModelShape(vocab=1000, hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, seq_len=64,
                         tie_embeddings=False)


def measure(mode: str, shape: dict, batch_size: int, batches: int, warmup: int, profile_batches: int = 0) -> dict:
    """One evaluation in this (child) process. With profile_batches, a torch.profiler table instead of timings."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model_shape = ModelShape(**shape)
    model = build_llama(model_shape, device=device, dtype=dtype)
    weights = _settled_gpu_memory()
    dataset = SyntheticLM(batches * batch_size, model_shape.seq_len, model_shape.vocab)
    profiler = _profiler(warmup, profile_batches) if profile_batches else None
    clock = StepClock(warmup=warmup, total=batches, hook=profiler.step if profiler else None)
    output_dir = fresh_output_dir()
    trainer = None
    if mode == "spilling_reference":
        from spilleval.reduce import FUSED_SWITCH

        os.environ[FUSED_SWITCH] = "0"  # this child process only
    if mode.startswith("trainer") or mode.startswith("spilling"):
        trainer_mode = "spilling" if mode.startswith("spilling") else mode
        trainer = build_trainer(trainer_mode, model, dataset, batch_size=batch_size, output_dir=output_dir, clock=clock,
                                spill_metrics=_spill_metrics())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = settled_rss()
    with PeakRSS() as peak, (profiler or _nothing()):
        if trainer is None:
            metrics = bare_loop(model, dataset, batch_size=batch_size, clock=clock, with_loss=mode == "bare_fwd_loss")
        else:
            metrics = trainer.evaluate()
    if profiler is not None:
        return {"mode": mode, "status": "ok", "profile": _profile_table(profiler)}
    gpu_peak = torch.cuda.max_memory_allocated() - weights if cuda else None
    steady = slice(warmup - 1, None)
    return {
        "mode": mode, "status": "ok", "batches": batches, "weights_bytes": weights,
        "parameters": count_parameters(model),
        "ms_per_batch": clock.ms_per_batch(), "median_ms_per_batch": clock.median_ms_per_batch(),
        "gpu_peak_above_weights": gpu_peak,
        "gpu_growth_per_batch": _slope(clock.gpu_allocated[steady]) if cuda else None,
        "host_baseline_rss": baseline, "host_peak_rss": peak.peak,
        "host_growth_in_loop": clock.rss[-1] - clock.rss[warmup - 1],
        "eval_loss": metrics.get("eval_loss", metrics.get("loss")),
        "token_accuracy": metrics.get("eval_token_accuracy", metrics.get("token_accuracy")),
    }


def _spill_metrics() -> list:
    """Token accuracy as an object, not by name: naming a metric loads every built-in metric, and with them
    reference libraries (jiwer, rouge-score, pycocoevalcap) that a bare GPU image may lack."""
    from spilleval.metrics.token import TokenAccuracy

    return [TokenAccuracy()]


def _settled_gpu_memory() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _slope(values: list[int]) -> float:
    """Bytes per batch, from the first to the last steady-state reading."""
    return (values[-1] - values[0]) / (len(values) - 1) if len(values) > 1 else 0.0


def _profiler(warmup: int, active: int):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=warmup, warmup=1, active=active, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule)


def _profile_table(profiler) -> str:
    averages = profiler.key_averages()
    if not torch.cuda.is_available():
        return averages.table(sort_by="cpu_time_total", row_limit=30)
    try:
        return averages.table(sort_by="device_time_total", row_limit=30)
    except (AttributeError, KeyError, ValueError):  # older torch
        return averages.table(sort_by="cuda_time_total", row_limit=30)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def reduce_timings(shape: dict, batch_size: int, repeats: int) -> dict:
    """Milliseconds to reduce one batch of random logits of the model's shape (the model's dtype, every position
    supervised): the bare loop's argmax, and `reduce_logits` with log-probs on the reference path and fused."""
    from spilleval.reduce import FUSED_SWITCH, reduce_logits

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    vocab, seq = shape["vocab"], shape["seq_len"]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch_size, seq, vocab, generator=gen, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (batch_size, seq), generator=gen, device=device)

    def timed(fn) -> float:
        fn()  # warm-up (compiles the kernel)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats * 1000

    def reduced(fused: bool):
        os.environ[FUSED_SWITCH] = "1" if fused else "0"
        return reduce_logits(logits, labels, keep_logprob=True)

    times = {"argmax (bare loop)": timed(lambda: logits.argmax(-1)),
             "reduce_logits, reference path": timed(lambda: reduced(False))}
    if cuda:
        times["reduce_logits, fused kernel"] = timed(lambda: reduced(True))
        fused, reference = reduced(True), reduced(False)
        times["pred_ids equal"] = bool(torch.equal(fused.pred_ids, reference.pred_ids))
        times["max |log-prob difference|"] = float((fused.label_logprob - reference.label_logprob).abs().max())
        times["|loss_sum difference| / loss_sum"] = float(abs(fused.loss_sum - reference.loss_sum) / reference.loss_sum)
    return {"status": "ok", "ms": times}


# ------------------------------------------------------------------------------------------------ report
def add_ratios(results: dict[str, dict]) -> None:
    """Time relative to the bare loops, GPU peak relative to Trainer + preprocess."""
    def value(mode, key):
        r = results.get(mode, {})
        return r.get(key) if r.get("status") == "ok" else None

    fwd, fwd_loss = value("bare_fwd", "ms_per_batch"), value("bare_fwd_loss", "ms_per_batch")
    preprocess_peak = value("trainer_preprocess", "gpu_peak_above_weights")
    for r in results.values():
        if r.get("status") != "ok":
            continue
        ms = r["ms_per_batch"]
        r["vs_bare_fwd"] = ms / fwd if ms and fwd else None
        r["vs_bare_fwd_loss"] = ms / fwd_loss if ms and fwd_loss else None
        peak = r["gpu_peak_above_weights"]
        r["gpu_peak_vs_preprocess"] = peak / preprocess_peak if peak is not None and preprocess_peak else None


def results_table(results: dict[str, dict]) -> str:
    rows = []
    for mode, label in MODES.items():
        r = results.get(mode)
        if r is None:
            continue
        if r["status"] != "ok":
            rows.append([label] + [None] * 12 + [r["status"]])
            continue
        gb = lambda v: None if v is None else f"{v / GiB:.2f}"  # noqa: E731
        mb = lambda v: None if v is None else f"{v / MiB:+.1f}"  # noqa: E731
        x = lambda v: None if v is None else f"{v:.3f}"  # noqa: E731
        rows.append([
            label, r["batches"], x(r["ms_per_batch"]), x(r["median_ms_per_batch"]), x(r["vs_bare_fwd"]),
            x(r["vs_bare_fwd_loss"]), gb(r["gpu_peak_above_weights"]), x(r["gpu_peak_vs_preprocess"]),
            mb(r["gpu_growth_per_batch"]), gb(r["host_peak_rss"]), mb(r["host_growth_in_loop"]),
            x(r["eval_loss"]) if r["eval_loss"] is not None else None, x(r["token_accuracy"]), r.get("note", "ok"),
        ])
    headers = ["mode", "batches", "ms / batch (mean)", "ms / batch (median)", "× bare fwd", "× bare fwd+loss",
               "GPU peak above weights (GB)", "× Trainer+preprocess", "GPU growth / batch (MB)",
               "host peak RSS (GB)", "host growth in loop (MB)", "eval loss", "token acc.", "status"]
    return markdown_table(headers, rows)


def goals_table(results: dict[str, dict]) -> str:
    """The issue's goals for SpillingTrainer, each with its measured value and whether it was met."""
    s = results.get("spilling", {})
    if s.get("status") != "ok":
        return "SpillingTrainer did not run: no goals to check."

    def row(goal, value, bound, fmt="{:.3f}"):
        if value is None or bound is None:
            return [goal, None, None, "not measured"]
        return [goal, fmt.format(value), fmt.format(bound), "met" if value <= bound else "missed"]

    trainer_loss = results.get("trainer_preprocess", {}).get("eval_loss")
    losses = (s["eval_loss"], trainer_loss)
    loss_gap = abs(losses[0] - losses[1]) if None not in losses else None
    host_growth = abs(s["host_growth_in_loop"]) / MiB
    gpu_growth = abs(s["gpu_growth_per_batch"] or 0) / MiB
    rows = [
        row("time ≤ 1.03 × bare forward + loss", s.get("vs_bare_fwd_loss"), 1.03),
        row("stretch: time ≤ 1.15 × bare forward", s.get("vs_bare_fwd"), 1.15),
        row("fused reduce (issue 16): time ≤ 1.02 × bare forward", s.get("vs_bare_fwd"), 1.02),
        row("eval_loss off Trainer + preprocess's (absolute)", loss_gap, 1e-5, "{:.2e}"),
        row("GPU peak above weights ≤ Trainer + preprocess", s.get("gpu_peak_vs_preprocess"), 1.0),
        row("stretch: GPU peak ≤ 0.6 × Trainer + preprocess", s.get("gpu_peak_vs_preprocess"), 0.6),
        row("flat GPU memory: growth per batch (MB)", gpu_growth, 1.0, "{:.2f}"),
        row("flat host memory: growth over the loop (MB)", host_growth, 64.0, "{:.1f}"),
    ]
    return markdown_table(["goal", "measured", "bound", "verdict"], rows)


def timings_table(timings: dict) -> str:
    if timings.get("status") != "ok":
        return f"reduce timings: {timings.get('status')}"
    rows = [[name, f"{value:.4g}" if isinstance(value, float) else value] for name, value in timings["ms"].items()]
    return markdown_table(["one batch of logits: reduction (ms) or check", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few batches: a smoke run")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--batches", type=int, help="batches per mode (default 210; --quick: 6)")
    parser.add_argument("--warmup", type=int, help="batches excluded from the timing (default 10; --quick: 2)")
    parser.add_argument("--batch-size", type=int, help="default 8; --quick: 4")
    parser.add_argument("--trainer-batches", type=int, default=12,
                        help="batches for the default Trainer, which keeps every batch's logits (default 12)")
    parser.add_argument("--profile", nargs="*", choices=list(MODES), default=[],
                        help="also profile these modes with torch.profiler (tables in gpu_profiles.txt)")
    parser.add_argument("--profile-batches", type=int, default=6)
    parser.add_argument("--limit-gb", type=float, default=64.0, help="host memory a mode may use (default 64)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for gpu.{json,md}")
    parser.add_argument("--name", default="gpu", help="file name stem under --out (default gpu)")
    args = parser.parse_args(argv)

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    batches = args.batches or (6 if args.quick else 210)
    warmup = args.warmup or (2 if args.quick else 10)
    batch_size = args.batch_size or (4 if args.quick else 8)
    limit = int(args.limit_gb * GiB)
    common = {"shape": asdict(shape), "batch_size": batch_size, "warmup": warmup}

    results: dict[str, dict] = {}
    info = None
    for mode in args.modes:
        n = min(batches, args.trainer_batches) if mode == "trainer" else batches
        result = run_isolated(measure, {"mode": mode, "batches": n, **common}, start_method="spawn",
                              rss_limit=limit)
        if mode == "trainer" and result.get("status") == "ok" and n < batches:
            result["note"] = f"stopped after {n} batches: it keeps every batch's logits on the GPU"
        results[mode] = {"mode": mode, **result}
        print(_progress(results[mode]), flush=True)
    add_ratios(results)
    profiles = {}
    for mode in args.profile:
        n = warmup + 1 + args.profile_batches
        if mode == "trainer":
            n = min(n, args.trainer_batches)
        result = run_isolated(measure, {"mode": mode, "batches": n, "profile_batches": args.profile_batches,
                                        **common}, start_method="spawn", rss_limit=limit)
        profiles[mode] = result.get("profile") or result["status"]

    timings = run_isolated(reduce_timings, {"shape": asdict(shape), "batch_size": batch_size,
                                            "repeats": 3 if args.quick else 20}, start_method="spawn",
                           rss_limit=limit)
    info = run_isolated(_machine_info, {}, start_method="spawn", rss_limit=limit)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python tools/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"machine": info, "command": command.strip(), "shape": asdict(shape), "batch_size": batch_size,
              "batches": batches, "warmup": warmup, "results": results, "reduce_timings": timings}
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1, default=str))
    tables = results_table(results) + "\n\n" + goals_table(results) + "\n\n" + timings_table(timings) + "\n"
    (args.out / f"{args.name}.md").write_text(tables)
    if profiles:
        text = "\n\n".join(f"===== {mode} ({args.profile_batches} batches) =====\n{table}"
                           for mode, table in profiles.items())
        (args.out / f"{args.name}_profiles.txt").write_text(text)
    print(json.dumps(info))
    print(tables)
    failed = [r for r in results.values() if r["status"].startswith("failed")]
    for r in failed:
        print(r.get("traceback", r["status"]), file=sys.stderr)
    return 1 if failed else 0


def _machine_info() -> dict:
    return machine_info()


def _progress(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['mode']:>22}  {r['status']}"
    gpu = r["gpu_peak_above_weights"]
    return (f"{r['mode']:>22}  {r['ms_per_batch']:8.2f} ms/batch  gpu peak "
            f"{(gpu or 0) / GiB:6.2f} GB  host peak {r['host_peak_rss'] / GiB:6.2f} GB  loss {r['eval_loss']}  "
            f"acc {r['token_accuracy']}")


if __name__ == "__main__":
    sys.exit(main())
