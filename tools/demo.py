"""`make demo`: the user story end to end, on CPU, in well under three minutes.

1. Build a word-level tokenizer and a tiny LLaVA-style model (a mixin over a config-built `LlamaForCausalLM`, a
   vision projector over synthetic image features, a different number of image positions per sample, inserted
   mid-sequence, so the raw labels do not line up with the logits).
2. Fine-tune it for a few steps with `SpillingTrainer` evaluating during training: every evaluation spills the
   reduced predictions to its own directory and reports exact metrics (token accuracy, text match, NLL, macro-F1).
3. Run `spilleval compute` and `spilleval inspect` on the last spill, and check that the numbers recomputed from
   the directory alone equal the ones the trainer logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import TrainingArguments

from spilleval.testing import IMAGE_TOKEN, build_tokenizer, multimodal_qa_dataset, pad_multimodal_batch, tiny_llava
from spilleval.trainer import SpillingTrainer

METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]
SPILLEVAL = Path(sys.executable).with_name("spilleval")  # the console script installed next to this python
console = Console()


def fine_tune(workdir: Path) -> SpillingTrainer:
    tokenizer = build_tokenizer()
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       padding_side="right", hidden=64, layers=2, heads=4)
    args = TrainingArguments(
        str(workdir), max_steps=120, learning_rate=3e-3, warmup_steps=10, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, eval_strategy="steps", eval_steps=40, logging_steps=40, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = SpillingTrainer(
        model=model, args=args, processing_class=tokenizer, data_collator=pad_multimodal_batch,
        train_dataset=multimodal_qa_dataset(800, tokenizer, seed=1),
        eval_dataset=multimodal_qa_dataset(160, tokenizer, seed=2),
        metrics=METRICS,  # the one change from transformers.Trainer: the import, and which metrics to keep
    )
    trainer.train()
    return trainer


def show_evaluations(trainer: SpillingTrainer) -> dict[str, float]:
    evals = [log for log in trainer.state.log_history if "eval_token_accuracy" in log]
    table = Table(title="evaluations during training (SpillingTrainer, exact, flat memory)")
    keys = ["eval_loss", "eval_token_accuracy", "eval_exact_match_accuracy", "eval_bit_match_accuracy",
            "eval_nll", "eval_answer_macro_f1"]
    table.add_column("step", justify="right")
    for key in keys:
        table.add_column(key.removeprefix("eval_"), justify="right")
    for log in evals:
        table.add_row(str(log["step"]), *(f"{log[k]:.4f}" for k in keys))
    console.print(table)
    return evals[-1]


def recompute(spill_dir: Path, logged: dict[str, float]) -> bool:
    """`spilleval inspect` and `spilleval compute --json` on the spill; True when every number matches."""
    console.rule(f"spilleval inspect {spill_dir}")
    subprocess.run([str(SPILLEVAL), "inspect", str(spill_dir)], check=True)
    console.rule(f"spilleval compute {spill_dir}")
    done = subprocess.run([str(SPILLEVAL), "compute", str(spill_dir), "--json", "--quiet"], check=True,
                          capture_output=True, text=True)
    recomputed = json.loads(done.stdout)["metrics"]
    table = Table(title="logged by the trainer vs recomputed from the directory alone")
    for column in ("metric", "trainer", "spilleval compute", "equal"):
        table.add_column(column)
    all_equal = True
    for name, value in recomputed.items():
        live = logged[f"eval_{name}"]
        equal = live == value
        all_equal &= equal
        table.add_row(name, repr(live), repr(value), "[green]yes[/]" if equal else "[red]NO[/]")
    console.print(table)
    return all_equal


def main() -> int:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="spilleval-demo-"))
    console.rule("fine-tuning a tiny LLaVA-style model with SpillingTrainer")
    trainer = fine_tune(workdir)
    logged = show_evaluations(trainer)
    spills = sorted((p.name for p in workdir.glob("spill-*")), key=lambda name: int(name.rsplit("-", 1)[1]))
    console.print(f"one spill directory per evaluation under {workdir}: {', '.join(spills)}")
    ok = recompute(trainer.last_spill_dir, logged)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; spills kept in {workdir}")
    if not ok:
        console.print("[red]the recomputed metrics differ from the logged ones[/]")
        return 1
    console.print("[green]every metric recomputed from the spill equals the one logged during training[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
