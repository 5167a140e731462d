"""`make demo`: evaluate a tiny Llama with spilleval, then recompute the metrics from the spill directory alone.

1. Build a word-level tokenizer (the `tokenizers` library) and a tiny `LlamaForCausalLM` from a config (no downloads).
2. Train it for a few hundred steps on synthetic question answering, so its answers are partly right.
3. Evaluate it with `spilleval.Evaluator` in a plain PyTorch loop: logits are reduced to token ids on the device,
   streaming metrics update batch by batch, the ids are spilled to out/demo/evaluator/.
4. Run the real `spilleval compute` and `spilleval inspect` commands on that directory and check that the numbers
   recomputed from the directory alone equal the live ones, exactly. Any difference fails the demo.
5. The user story: fine-tune a tiny LLaVA-style model (a mixin over a config-built `LlamaForCausalLM`, a vision
   projector over synthetic image features, a different number of image positions per sample, inserted
   mid-sequence, so the raw labels do not line up with the logits) with `SpillingTrainer` evaluating during
   training; each evaluation spills to its own directory. Then `spilleval compute` / `inspect` on the last spill
   must give exactly the numbers the trainer logged.

Each step is a function so that other scenarios (e.g. a `SpillingTrainer` with a LLaVA-style model) can reuse
`recompute_and_compare` and `inspect` on their own spill directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spilleval import Evaluator, SpillReader
from spilleval.spill.results import metrics_by_name
from spilleval.testing import (
    IMAGE_TOKEN,
    build_tokenizer,
    encode_qa,
    multimodal_qa_dataset,
    pad_batch,
    pad_multimodal_batch,
    qa_examples,
    tiny_llama,
    tiny_llava,
    train_qa,
)
from spilleval.trainer import SpillingTrainer

OUT = Path(__file__).resolve().parents[1] / "out" / "demo"
METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]
EVAL_SAMPLES = 512
BATCH_SIZE = 32


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 100 - len(text)), flush=True)


def build_and_train(steps: int = 300) -> tuple[Any, Any]:
    """A real tokenizer and a tiny Llama trained briefly on the synthetic QA task."""
    tokenizer = build_tokenizer()
    model = tiny_llama(len(tokenizer), hidden=64, layers=2, heads=2, seed=0)
    start = time.perf_counter()
    train_qa(model, tokenizer, steps=steps, batch_size=32, lr=3e-3)
    params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tokenizer)} tokens; model: LlamaForCausalLM, {params:,} parameters; "
          f"trained {steps} steps in {time.perf_counter() - start:.1f} s")
    return tokenizer, model


def eval_batches(tokenizer: Any, n: int = EVAL_SAMPLES, batch_size: int = BATCH_SIZE):
    """Held-out questions (another seed than training), padded batches with their dataset indices."""
    examples = qa_examples(n, seed=7)
    items = [encode_qa(ex, tokenizer, index=i) for i, ex in enumerate(examples)]
    for start in range(0, n, batch_size):
        batch = pad_batch(items[start : start + batch_size], tokenizer.pad_token_id)
        batch["questions"] = [ex["question"] for ex in examples[start : start + batch_size]]
        yield batch


def evaluate_with_evaluator(model: Any, tokenizer: Any, spill_dir: Path) -> dict[str, float]:
    """The plain-loop integration: forward, `evaluator.update(logits, labels, sample_index)`, `finalize()`."""
    evaluator = Evaluator(spill_dir, metrics=METRICS, tokenizer=tokenizer, dataset_length=EVAL_SAMPLES,
                          chunk_rows=128, extra={"demo": "evaluator"})
    start = time.perf_counter()
    with torch.no_grad():
        for batch in eval_batches(tokenizer):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            evaluator.update(logits, batch["labels"], sample_index=batch["index"],
                             columns={"question": batch["questions"]})
    results = evaluator.finalize()
    print(f"evaluated {EVAL_SAMPLES} samples into {spill_dir} in {time.perf_counter() - start:.1f} s")
    return results


def fine_tune_with_spilling_trainer(tokenizer: Any, output_dir: Path) -> SpillingTrainer:
    """A tiny LLaVA-style model fine-tuned by `SpillingTrainer`, which evaluates every 80 steps into a fresh spill."""
    from transformers import TrainingArguments

    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       padding_side="right", hidden=64, layers=2, heads=2)
    args = TrainingArguments(
        str(output_dir), max_steps=240, learning_rate=3e-3, warmup_steps=20, per_device_train_batch_size=16,
        per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=80, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = SpillingTrainer(  # the one change from transformers.Trainer: the import, and the metrics to keep
        model=model, args=args, processing_class=tokenizer, data_collator=pad_multimodal_batch,
        train_dataset=multimodal_qa_dataset(3840, tokenizer, seed=1),
        eval_dataset=multimodal_qa_dataset(128, tokenizer, seed=2),
        metrics=METRICS,
    )
    start = time.perf_counter()
    trainer.train()
    print(f"{'step':>5}  {'eval_loss':>9}  {'token_accuracy':>14}  {'exact_match':>11}  {'answer_macro_f1':>15}  spill")
    for log in trainer.state.log_history:
        if "eval_token_accuracy" in log:
            print(f"{log['step']:>5}  {log['eval_loss']:>9.4f}  {log['eval_token_accuracy']:>14.4f}  "
                  f"{log['eval_exact_match_accuracy']:>11.4f}  {log['eval_answer_macro_f1']:>15.4f}  "
                  f"spill-eval-step-{log['step']}/")
    print(f"fine-tuned {args.max_steps} steps, evaluating every {args.eval_steps}, in "
          f"{time.perf_counter() - start:.1f} s")
    return trainer


def logged_metrics(trainer: SpillingTrainer) -> dict[str, float]:
    """The spilleval metrics of the trainer's last evaluation, as logged during training (without `eval_`)."""
    last = [log for log in trainer.state.log_history if "eval_token_accuracy" in log][-1]
    return {name: last[f"eval_{name}"] for name in SpillReader(trainer.last_spill_dir).results()}


def spilleval_command(*args: str) -> subprocess.CompletedProcess:
    """Run the installed `spilleval` console script, as a user would."""
    script = Path(sys.executable).with_name("spilleval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "spilleval.cli"]
    done = subprocess.run(command + list(args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`spilleval {' '.join(args)}` failed ({done.returncode}):\n{done.stderr}")
    return done


def recompute_and_compare(spill_dir: Path, live: dict[str, float]) -> None:
    """`spilleval compute <dir> --json` must print exactly the live numbers; print both side by side."""
    payload = json.loads(spilleval_command("compute", str(spill_dir), "--json").stdout)
    recomputed = metrics_by_name(payload)  # compute --json keys the metrics as the run logged them (eval_...)
    print(f"{'metric':<24}{'live (finalize)':>22}{'spilleval compute':>22}   same")
    mismatches = []
    for key in sorted(set(live) | set(recomputed)):
        a, b = live.get(key), recomputed.get(key)
        same = a == b
        mismatches += [] if same else [key]
        print(f"{key:<24}{_show(a):>22}{_show(b):>22}   {'yes' if same else 'NO'}")
    if mismatches:
        raise SystemExit(f"FAILED: recomputed metrics differ from the live ones: {', '.join(mismatches)}")
    print(f"OK: all {len(live)} numbers recomputed from {spill_dir} alone equal the live ones, bit for bit.")


def inspect(spill_dir: Path) -> None:
    print(spilleval_command("inspect", str(spill_dir)).stdout)


def _show(value: Any) -> str:
    return "(missing)" if value is None else f"{value:.10g}" if isinstance(value, float) else str(value)


def fresh_dir(path: Path) -> Path:
    """Remove what an earlier demo left (spilleval never overwrites a spill)."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    torch.set_num_threads(1)  # a model this small is fastest on one thread, and then shares a busy machine well
    start = time.perf_counter()
    banner("1. tokenizer and tiny Llama, trained briefly on synthetic QA")
    tokenizer, model = build_and_train()
    banner("2. Evaluator in a plain PyTorch loop: reduce on device, stream metrics, spill")
    spill_dir = fresh_dir(OUT / "evaluator")
    live = evaluate_with_evaluator(model, tokenizer, spill_dir)
    banner("3. `spilleval compute` from the directory alone equals the live results")
    recompute_and_compare(spill_dir, live)
    banner("4. `spilleval inspect`")
    inspect(spill_dir)
    banner("5. SpillingTrainer: a LLaVA-style model fine-tuned with evaluation during training")
    trainer = fine_tune_with_spilling_trainer(tokenizer, fresh_dir(OUT / "trainer"))
    banner(f"6. `spilleval compute` / `inspect` on the last spill: {trainer.last_spill_dir.name}")
    recompute_and_compare(trainer.last_spill_dir, logged_metrics(trainer))
    inspect(trainer.last_spill_dir)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
