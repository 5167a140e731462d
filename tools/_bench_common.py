"""Shared parts of the benchmarks: synthetic data, config-built Llama models, the evaluation modes compared, isolated
runs under a host-memory guard, memory readings, machine facts and markdown tables.

Every mode sees the same model, the same batches and reports the same token accuracy, so the benchmarks double as a
check that the modes agree.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import platform
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import psutil
import torch

from spilleval.testing import peak_rss, reset_peak_rss

IGNORE_INDEX = -100
FIRST_WORD_ID = 5  # ids below are the special tokens of spilleval.testing.build_tokenizer
MiB = 2**20
GiB = 2**30


# ------------------------------------------------------------------------------------------------ data and model
class SyntheticLM(torch.utils.data.Dataset):
    """`n` random token sequences, each made from its index on demand: the dataset holds nothing that grows with n.

    answer_tokens=None supervises every position (language-model eval). answer_tokens=k supervises only the last k
    positions, filled with one of `num_answers` fixed answers (long prompt, short answer: the motivating example).
    Answers repeat each token twice, so a small random model with tied embeddings (which tends to predict the
    current token) gets about half of them right: the modes' accuracies are then a meaningful cross-check.
    """

    def __init__(self, n: int, seq_len: int, vocab: int, *, answer_tokens: int | None = None, num_answers: int = 32,
                 seed: int = 0) -> None:
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed
        self.answer_tokens = answer_tokens
        if answer_tokens is not None:
            g = torch.Generator().manual_seed(seed + 1)
            words = torch.randint(FIRST_WORD_ID, vocab, (num_answers, (answer_tokens + 1) // 2), generator=g)
            self.answers = words.repeat_interleave(2, dim=1)[:, :answer_tokens]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(FIRST_WORD_ID, self.vocab, (self.seq_len,), generator=g)
        if self.answer_tokens is None:
            labels = ids.clone()
        else:
            k = self.answer_tokens
            ids[-k:] = self.answers[i % len(self.answers)]
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[-k:] = ids[-k:]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@dataclass
class ModelShape:
    vocab: int = 32_000
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 2
    intermediate: int = 128
    seq_len: int = 256
    tie_embeddings: bool = True


def build_llama(shape: ModelShape, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` from a config (nothing downloaded); no KV cache in eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq_len, 128),
        use_cache=False,
        tie_word_embeddings=shape.tie_embeddings,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ measuring
class StepClock:
    """Per-batch readings that do not slow the loop: memory every batch, one synchronize when the steady state
    begins (after `warmup` batches) and one after the last batch."""

    def __init__(self, warmup: int, total: int, hook: Callable[[], None] | None = None) -> None:
        self.warmup, self.total, self.hook = warmup, total, hook
        self.cuda = torch.cuda.is_available()
        self.steps = 0
        self.gpu_allocated: list[int] = []
        self.rss: list[int] = []
        self.events: list[Any] = []  # one CUDA event per batch: per-batch times on the GPU's own timeline
        self.t0 = self.t1 = None

    def step(self) -> None:
        self.steps += 1
        if self.cuda:
            self.gpu_allocated.append(torch.cuda.memory_allocated())
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        self.rss.append(current_rss())
        if self.steps == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        if self.steps == self.total:
            self._sync()
            self.t1 = time.perf_counter()
        if self.hook is not None:
            self.hook()

    def ms_per_batch(self) -> float | None:
        """Mean wall time per steady-state batch (host clock between two synchronizations)."""
        if self.t0 is None or self.t1 is None or self.total <= self.warmup:
            return None
        return (self.t1 - self.t0) / (self.total - self.warmup) * 1000

    def median_ms_per_batch(self) -> float | None:
        """Median of the steady-state batch intervals between CUDA events (None off the GPU)."""
        steady = self.events[self.warmup - 1:]
        if len(steady) < 2:
            return None
        steady[-1].synchronize()
        gaps = sorted(a.elapsed_time(b) for a, b in zip(steady, steady[1:]))
        return gaps[len(gaps) // 2]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def clock_callback(clock: StepClock):
    """A `TrainerCallback` that ticks `clock` after every evaluation batch."""
    from transformers import TrainerCallback

    class _Tick(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):
            clock.step()

    return _Tick()


def current_rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory of this process inside a `with` block: the high-water mark (VmHWM), reset on entry."""

    def __enter__(self) -> "PeakRSS":
        reset_peak_rss()
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = peak_rss()


def settled_rss() -> int:
    """RSS after garbage collection: the post-setup baseline."""
    gc.collect()
    return current_rss()


# ------------------------------------------------------------------------------------------------ isolated runs
def run_isolated(target: Callable[..., dict], kwargs: dict, *, start_method: str, rss_limit: int,
                 poll_s: float = 0.01) -> dict:
    """Run `target(**kwargs)` in a child process; kill it if its RSS passes `rss_limit` bytes.

    Returns the target's dict, or {"status": "killed at the memory limit" | "failed: ..."}.
    """
    ctx = mp.get_context(start_method)
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, kwargs, send))
    proc.start()
    send.close()
    watched = psutil.Process(proc.pid)
    message, peak_seen = None, 0
    while message is None:
        if receive.poll(poll_s):
            try:
                message = receive.recv()
            except EOFError:
                break
            break
        try:
            rss = watched.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # it has exited; the pipe says how
        peak_seen = max(peak_seen, rss)
        if rss > rss_limit:
            proc.kill()
            proc.join()
            return {"status": f"killed at the {rss_limit / GiB:.1f} GB memory limit", "peak_rss": peak_seen}
    proc.join()
    if message is None:
        return {"status": f"failed: child exited with code {proc.exitcode}"}
    if not message["ok"]:
        return {"status": "failed: " + message["error"].strip().splitlines()[-1], "traceback": message["error"]}
    return message["result"]


def _child_main(target, kwargs, send) -> None:
    try:
        result = target(**kwargs)
        send.send({"ok": True, "result": result})
    except BaseException:  # noqa: BLE001 - reported to the parent, which prints it
        send.send({"ok": False, "error": traceback.format_exc()})
    finally:
        send.close()


# ------------------------------------------------------------------------------------------------ the modes
def shifted_token_counts(pred_ids, label_ids) -> tuple[int, int]:
    """(correct, total) over supervised positions, causal shift: pred[:, t] predicts label[:, t + 1]."""
    preds, labels = pred_ids[:, :-1], label_ids[:, 1:]
    mask = labels != IGNORE_INDEX
    return int(((preds == labels) & mask).sum()), int(mask.sum())


def _first(predictions):
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def accuracy_on_logits(eval_pred) -> dict[str, float]:
    """The classic `compute_metrics(eval_pred)`: gets every sample's logits at the end."""
    correct, total = shifted_token_counts(_first(eval_pred.predictions).argmax(-1), eval_pred.label_ids)
    return {"token_accuracy": correct / max(total, 1)}


def accuracy_on_ids(eval_pred) -> dict[str, float]:
    """`compute_metrics` after `preprocess_logits_for_metrics` turned logits into argmax ids."""
    correct, total = shifted_token_counts(_first(eval_pred.predictions), eval_pred.label_ids)
    return {"token_accuracy": correct / max(total, 1)}


def argmax_logits(logits, labels):
    return _first(logits).argmax(dim=-1)


def batch_accuracy_closure() -> Callable:
    """A `batch_eval_metrics` closure (the motivating example's style): running counts on the batch's device."""
    counts = {"correct": 0, "total": 0}

    def compute_metrics(eval_pred, compute_result: bool):
        preds, labels = _first(eval_pred.predictions).argmax(-1)[:, :-1], eval_pred.label_ids[:, 1:]
        mask = labels != IGNORE_INDEX
        counts["correct"] = counts["correct"] + ((preds == labels) & mask).sum()
        counts["total"] = counts["total"] + mask.sum()
        if compute_result:
            result = {"token_accuracy": float(counts["correct"]) / max(float(counts["total"]), 1.0)}
            counts["correct"] = counts["total"] = 0
            return result
        return {}

    return compute_metrics


TRAINER_MODES = ("trainer", "trainer_preprocess", "trainer_batch_metrics", "spilling")


def build_trainer(mode: str, model, dataset, *, batch_size: int, output_dir: str, clock: StepClock,
                  spill_metrics: list[str], tokenizer=None):
    """The `transformers.Trainer` (or `SpillingTrainer`) configured as `mode` evaluates."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_eval_batch_size=batch_size,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        batch_eval_metrics=(mode == "trainer_batch_metrics"),
        log_level="error",
    )
    common = {"model": model, "args": args, "eval_dataset": dataset, "callbacks": [clock_callback(clock)]}
    if mode == "trainer":
        trainer = Trainer(compute_metrics=accuracy_on_logits, **common)
    elif mode == "trainer_preprocess":
        trainer = Trainer(compute_metrics=accuracy_on_ids, preprocess_logits_for_metrics=argmax_logits, **common)
    elif mode == "trainer_batch_metrics":
        trainer = Trainer(compute_metrics=batch_accuracy_closure(), **common)
    elif mode == "spilling":
        from spilleval.trainer import SpillingTrainer

        trainer = SpillingTrainer(metrics=spill_metrics, processing_class=tokenizer,
                                  spill_dir=os.path.join(output_dir, "spill"), **common)
    else:
        raise ValueError(f"unknown trainer mode {mode!r}; known: {', '.join(TRAINER_MODES)}")
    trainer.remove_callback(PrinterCallback)  # the benchmark prints its own table
    return trainer


def bare_loop(model, dataset, *, batch_size: int, clock: StepClock, with_loss: bool) -> dict[str, float]:
    """The floor: a `torch.no_grad` loop, forward (+ the model's own loss) and argmax; counts on the device."""
    from transformers import default_data_collator

    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=default_data_collator,
                                         pin_memory=device.type == "cuda")
    correct = total = loss_sum = 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            out = model(**batch, labels=labels) if with_loss else model(**batch)
            preds = out.logits.argmax(-1)[:, :-1]
            mask = labels[:, 1:] != IGNORE_INDEX
            correct = correct + ((preds == labels[:, 1:]) & mask).sum()
            total = total + mask.sum()
            if with_loss:
                loss_sum = loss_sum + out.loss.detach()
            del out, preds
            clock.step()
    result = {"token_accuracy": float(correct) / max(float(total), 1.0)}
    if with_loss:
        result["loss"] = float(loss_sum) / max(clock.steps, 1)
    return result


def fresh_output_dir() -> str:
    return tempfile.mkdtemp(prefix="spilleval-bench-")


# ------------------------------------------------------------------------------------------------ reporting
def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, GPU, library versions, date, load."""
    import accelerate
    import transformers

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / GiB, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / GiB, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
