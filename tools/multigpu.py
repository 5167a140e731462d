"""Multi-GPU evaluation as users run it, against one GPU: the numbers must not depend on how many GPUs evaluate.

Set-ups, each on the same LLaVA-style model (trained briefly, so that its answers are partly right) and the same
uneven eval set (1,003 samples, batch 8 per process):

* `SpillingTrainer.evaluate()` on one GPU (the reference) and under `torchrun --nproc_per_node N` (NCCL);
* the README's DDP loop with `Evaluator` (`DistributedSampler`, NCCL) on one GPU and under torchrun;
* `SpillingTrainer` under `nn.DataParallel` (`python train.py` on a machine with several GPUs and no launcher), on
  a plain tiny Llama: DataParallel gathers the replicas' logits along the batch, which fails for a model that
  re-pads each replica's share to its own width, as the LLaVA-style model does (plain `Trainer` fails there too).

Every run's metrics, exit code and wall time are compared with the one-GPU reference and printed as a table.

    python tools/multigpu.py --out results              # a machine with 2+ GPUs, about two minutes
    python tools/multigpu.py --quick --device cpu       # a smoke run: gloo processes on the CPU (what CI can do)
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
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))

from spilleval.testing import (  # noqa: E402
    IMAGE_TOKEN,
    build_tokenizer,
    encode_qa,
    fit,
    multimodal_qa_dataset,
    pad_batch,
    pad_multimodal_batch,
    qa_examples,
    tiny_llama,
    tiny_llava,
)

METRICS = ["token_accuracy", "sequence_exact_match", "nll", "answer_macro_f1"]
BATCH = 8
TIMING_KEYS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time",
               "epoch")


# ----------------------------------------------------------------------------------------------- one run
def model_and_data(work: Path, samples: int, device: str, kind: str = "llava") -> tuple[Any, Any, list[dict[str, Any]]]:
    """The model trained by `prepare` and the eval set: LLaVA-style (images) or a plain Llama (text)."""
    tokenizer = build_tokenizer()
    if kind == "llava":
        model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), hidden=64)
        data = multimodal_qa_dataset(samples, tokenizer, seed=11)
    else:
        model = tiny_llama(len(tokenizer), hidden=64)
        data = [encode_qa(ex, tokenizer) for ex in qa_examples(samples, seed=11)]
    model.load_state_dict(torch.load(work / f"{kind}.pt", weights_only=True))
    return model.to(device).eval(), tokenizer, data


def run_trainer(work: Path, name: str, samples: int, device: str, kind: str) -> dict[str, Any]:
    from transformers import TrainingArguments

    from spilleval import SpillingTrainer

    model, tokenizer, data = model_and_data(work, samples, "cpu", kind)
    args = TrainingArguments(str(work / name / "out"), per_device_eval_batch_size=BATCH, report_to=[],
                             use_cpu=device == "cpu", disable_tqdm=True, save_strategy="no", logging_strategy="no")
    collate = pad_multimodal_batch if kind == "llava" else pad_batch
    trainer = SpillingTrainer(model=model, args=args, eval_dataset=data, data_collator=collate,
                              processing_class=tokenizer, metrics=METRICS, spill_dir=work / name / "spill")
    results = trainer.evaluate()
    return {k: v for k, v in results.items() if k not in TIMING_KEYS} | {"n_gpu": args.n_gpu}


def run_loop(work: Path, name: str, samples: int, device: str) -> dict[str, Any]:
    """The README's DDP loop (DistributedSampler, `with Evaluator(...)`), or the same loop in one process."""
    from torch.utils.data import DataLoader, DistributedSampler

    from spilleval import Evaluator

    distributed = "RANK" in os.environ
    if distributed:
        rank = int(os.environ["LOCAL_RANK"])
        if device == "cuda":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    target = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    model, tokenizer, data = model_and_data(work, samples, target)
    items = [{**item, "index": i} for i, item in enumerate(data)]
    sampler = DistributedSampler(items, shuffle=False) if distributed else None
    loader = DataLoader(items, batch_size=BATCH, sampler=sampler, collate_fn=pad_multimodal_batch)
    try:
        with Evaluator(work / name / "spill", METRICS, tokenizer=tokenizer, dataset_length=len(items)) as evaluator:
            for batch in loader:
                batch = {k: v.to(target) for k, v in batch.items()}
                index = batch.pop("index")
                with torch.no_grad():
                    logits = model(**batch).logits
                _, _, _, _, _, labels = model.prepare_inputs_labels_for_multimodal(
                    batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
                    batch["num_image_features"])  # the labels the model's loss uses (label_fn's job in a loop)
                evaluator.update(logits, labels, sample_index=index)
            return evaluator.finalize()
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1 if args.device == "cpu" else 4)
    work = Path(args.work)
    if args.what == "trainer":
        results = run_trainer(work, args.name, args.samples, args.device, args.model)
    else:
        results = run_loop(work, args.name, args.samples, args.device)
    rank = int(os.environ.get("RANK", 0))
    (work / args.name).mkdir(parents=True, exist_ok=True)
    (work / args.name / f"results-{rank}.json").write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------- the driver
def prepare(work: Path, device: str) -> None:
    """Train both models briefly, once, for every run to load."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    llava = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), hidden=64)
    train = multimodal_qa_dataset(256, tokenizer, seed=12)
    batches = [pad_multimodal_batch(train[i : i + 32]) for i in range(0, 256, 32)]
    llama = tiny_llama(len(tokenizer), hidden=64)
    text = [encode_qa(ex, tokenizer) for ex in qa_examples(256, seed=12)]
    for kind, model, data in (("llava", llava, batches), ("llama", llama, [pad_batch(text[i : i + 32])
                                                                           for i in range(0, 256, 32)])):
        model.to(device)
        fit(model, [{k: v.to(device) for k, v in b.items()} for b in data], steps=80)
        torch.save(model.cpu().state_dict(), work / f"{kind}.pt")


def launch(work: Path, name: str, what: str, samples: int, device: str, *, processes: int, visible: str,
           model: str = "llava") -> dict:
    base = [str(TOOLS / "multigpu.py"), "run", what, "--work", str(work), "--name", name, "--samples",
            str(samples), "--device", device, "--model", model]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *base]
    else:
        command = [sys.executable, *base]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = visible
    start = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.monotonic() - start
    ranks = sorted((work / name).glob("results-*.json")) if (work / name).exists() else []
    results = [json.loads(p.read_text()) for p in ranks]
    return {"name": name, "exit_code": done.returncode, "seconds": seconds, "results": results,
            "log": (done.stdout + done.stderr)[-4000:]}


def compare(run: dict, reference: dict) -> str:
    """'equal' when every rank returned the reference's numbers (eval_loss and nll to 1e-9 relative)."""
    if run["exit_code"] != 0 or not run["results"]:
        return f"FAILED (exit {run['exit_code']})"
    want = {k: v for k, v in reference["results"][0].items() if k != "n_gpu"}
    for got in run["results"]:
        for key, value in want.items():
            other = got.get(key)
            close = other == value or (isinstance(value, float) and other is not None
                                       and abs(other - value) <= 1e-9 * max(abs(value), 1e-12))
            if not close:
                return f"differs: {key} {other!r} vs {value!r}"
    return "equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("run", help="(internal) one process of one set-up")
    one.add_argument("what", choices=["trainer", "loop"])
    one.add_argument("--work", required=True)
    one.add_argument("--name", required=True)
    one.add_argument("--samples", type=int, required=True)
    one.add_argument("--device", default="cuda")
    one.add_argument("--model", default="llava", choices=["llava", "llama"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gpus", type=int, default=None, help="processes / GPUs (default: all visible GPUs, CPU: 2)")
    parser.add_argument("--quick", action="store_true", help="47 samples instead of 1,003")
    parser.add_argument("--out", default=None, help="write the results as JSON in this folder")
    args = parser.parse_args()
    if args.command == "run":
        return run(args)

    gpus = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.device == "cuda" and gpus < 2:
        sys.exit(f"needs 2+ GPUs, found {torch.cuda.device_count()}")
    samples = 47 if args.quick else 1003
    work = Path(tempfile.mkdtemp(prefix="multigpu-"))
    prepare(work, "cuda" if args.device == "cuda" else "cpu")
    all_gpus = ",".join(str(i) for i in range(gpus))
    runs = [
        launch(work, "trainer-1", "trainer", samples, args.device, processes=1, visible="0"),
        launch(work, f"trainer-torchrun-{gpus}", "trainer", samples, args.device, processes=gpus, visible=all_gpus),
        launch(work, "loop-1", "loop", samples, args.device, processes=1, visible="0"),
        launch(work, f"loop-torchrun-{gpus}", "loop", samples, args.device, processes=gpus, visible=all_gpus),
    ]
    if args.device == "cuda":  # no launcher, several GPUs visible: Trainer wraps the model in nn.DataParallel
        runs += [launch(work, "llama-1", "trainer", samples, args.device, processes=1, visible="0", model="llama"),
                 launch(work, f"llama-dataparallel-{gpus}", "trainer", samples, args.device, processes=1,
                        visible=all_gpus, model="llama")]
    references = {"trainer": runs[0], "loop": next(r for r in runs if r["name"] == "loop-1"),
                  "llama": next((r for r in runs if r["name"] == "llama-1"), None)}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    print(f"\n{samples} samples, batch {BATCH} per process, {device}, torch {torch.__version__}\n")
    print("| set-up | exit | wall s | ranks | eval_loss / loss | token_accuracy | answer_macro_f1 | vs 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        first = r["results"][0] if r["results"] else {}
        loss = first.get("eval_loss", first.get("nll"))
        accuracy = first.get("eval_token_accuracy", first.get("token_accuracy"))
        f1 = first.get("eval_answer_macro_f1", first.get("answer_macro_f1"))
        verdict = compare(r, references[r["name"].split("-")[0]])
        print(f"| {r['name']} | {r['exit_code']} | {r['seconds']:.1f} | {len(r['results'])} | {loss} | {accuracy} "
              f"| {f1} | {verdict} |")
    failed = [r for r in runs if compare(r, references[r["name"].split("-")[0]]) != "equal"]
    for r in failed:
        print(f"\n--- {r['name']} (exit {r['exit_code']}) ---\n{r['log']}", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "multigpu.json").write_text(json.dumps({"device": device, "samples": samples,
                                                                 "runs": runs}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
