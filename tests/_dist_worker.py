"""One rank of a real multi-process evaluation (gloo on CPU), started by tests/test_distributed.py.

    python tests/_dist_worker.py '<json config>'      # RANK / WORLD_SIZE in the environment (or torchrun's)

Scenarios (config["scenario"]):
  evaluate   `Evaluator` in a plain DDP loop: a tiny real Llama, DistributedSampler (shuffled, padded), batch 4.
  raise      the same, but rank config["fail_rank"] raises after two batches (inside `with evaluator:`); the
             others wait until it has posted its failure, so their next update must stop them.
  crash      the same, but rank config["fail_rank"] dies (os._exit) after two batches, telling no one.
  drop_last  the same with DistributedSampler(drop_last=True), which leaves a sample out: every rank must refuse.
  trainer    `SpillingTrainer.evaluate()` on the LLaVA-style test model (launched by torchrun); with
             config["stream"], the eval set is an IterableDataset whose batches accelerate dispatches from rank 0.
Each rank writes `<out>/rank-<r>.json`: the results it returned, or the error it raised, and how long it took.
`evaluate_qa` also runs in the test process without any process group: the single-process reference.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from spilleval import Evaluator
from spilleval.testing import (
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

NUM_SAMPLES = 37  # not a multiple of world size x batch size for world sizes 2 and 3
BATCH_SIZE = 4
METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]
# the plain loop also scores every 3 consecutive samples as the choices of one question (the first one right), so
# a question's choices are spread over ranks and batches by the shuffling sampler
CHOICES = 3
EVALUATE_METRICS = [*METRICS, "mc_accuracy", "bits_per_byte"]


def qa_items(tokenizer: Any) -> list[dict[str, Any]]:
    return [encode_qa(ex, tokenizer, index=i) | {"question": ex["question"]}
            for i, ex in enumerate(qa_examples(NUM_SAMPLES, seed=5))]



def train_models(directory: Path) -> None:
    """Fit both test models a little, once, and save their weights for every rank to load."""
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    items = qa_items(tokenizer)
    llama = tiny_llama(len(tokenizer), seed=3)
    keys = ("input_ids", "attention_mask", "labels")
    fit(llama, [{k: v for k, v in pad_batch(items[i : i + 8]).items() if k in keys} for i in range(0, len(items), 8)])
    torch.save(llama.state_dict(), directory / "llama.pt")
    llava = _llava(tokenizer)
    data = llava_dataset(tokenizer)
    fit(llava, [pad_multimodal_batch(data[i : i + 8]) for i in range(0, len(data), 8)])
    torch.save(llava.state_dict(), directory / "llava.pt")


def _llava(tokenizer: Any) -> torch.nn.Module:
    return tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def load(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def row_stable_logits(model: Any, items: list[dict[str, Any]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a batch, each row computed alone at one fixed width.

    CPU matmuls may round a row differently when the batch around it changes shape; computing rows alone makes
    every row's logits independent of which rank and batch it lands in, so runs can be compared bit for bit.
    """
    logits, labels = [], []
    for item in items:
        pad = width - len(item["input_ids"])
        ids = torch.tensor([item["input_ids"] + [0] * pad])
        mask = torch.tensor([[1] * len(item["input_ids"]) + [0] * pad])
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
        labels.append(torch.tensor([item["labels"] + [-100] * pad]))
    return torch.cat(logits), torch.cat(labels)


def evaluate_qa(spill_dir: str | Path, models: Path, *, fail_rank: int | None = None, failure: str = "raise",
                dist_timeout: float = 60.0, chunk_rows: int = 3, drop_last: bool = False) -> dict[str, Any]:
    """The plain DDP evaluation loop of the README, on whatever process group is initialised (or none)."""
    from torch.utils.data import DataLoader, DistributedSampler

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = load(tiny_llama(len(tokenizer), seed=3), models / "llama.pt")
    items = qa_items(tokenizer)
    width = max(len(it["input_ids"]) for it in items)
    distributed = torch.distributed.is_initialized()
    sampler = DistributedSampler(items, shuffle=True, seed=0, drop_last=drop_last) if distributed else None
    loader = DataLoader(items, batch_size=BATCH_SIZE, sampler=sampler, collate_fn=list)
    rank = torch.distributed.get_rank() if distributed else 0
    with Evaluator(spill_dir, EVALUATE_METRICS, tokenizer=tokenizer, dataset_length=len(items), chunk_rows=chunk_rows,
                   dist_timeout=dist_timeout) as evaluator:
        for step, batch in enumerate(loader):
            if fail_rank is not None and step == 2:
                if rank == fail_rank and failure == "crash":
                    os._exit(17)
                if rank == fail_rank:
                    raise RuntimeError(f"injected failure in the forward pass on rank {rank}")
                if failure == "raise":  # let the failure be posted first: this rank must stop at its next update
                    wait_for_failure_post(evaluator)
            logits, labels = row_stable_logits(model, batch, width)
            index = [it["index"] for it in batch]
            evaluator.update(logits, labels, sample_index=index,
                             columns={"question": [it["question"] for it in batch],
                                      "question_id": [i // CHOICES for i in index],
                                      "choice_target": [i % CHOICES == 0 for i in index]})
        return evaluator.finalize()


def wait_for_failure_post(evaluator: Evaluator) -> None:
    from spilleval.distributed import FAIL_FAST_INTERVAL_S

    deadline = time.monotonic() + 60
    while not evaluator._coordinator.store.check(["failed"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(FAIL_FAST_INTERVAL_S)  # the next update looks at the store again


def llava_dataset(tokenizer: Any) -> list[dict[str, Any]]:
    """37 multimodal samples, the longest (after image expansion) last.

    The padded last batch of rank 1 ([36, 0, 1, 2] under accelerate) is then as wide as sample 36 alone, the last
    batch of a single process, so sample 36's logits do not depend on the world size either.
    """
    data = multimodal_qa_dataset(NUM_SAMPLES, tokenizer, seed=5)
    longest = max(range(len(data)), key=lambda i: len(data[i]["input_ids"]) + len(data[i]["images"]))
    return data[:longest] + data[longest + 1 :] + [data[longest]]


def argmax_ids(logits: Any, labels: Any) -> Any:
    """transformers' run_clm.py preprocess_logits_for_metrics."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(dim=-1)


def shifted_accuracy(eval_pred: Any) -> dict[str, float]:
    """A classic closure (run_clm.py's, masked) plus what it saw: rows and a checksum of the supervised ids."""
    preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((preds == labels)[mask].mean()), "rows": int(preds.shape[0]),
            "label_sum": float(labels[mask].sum()), "pred_sum": float(preds[mask].sum())}


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self):
        yield from self.items


def fixed_width_collator(items: list[dict[str, Any]]) -> Any:
    """Pads every batch of a stream to one width: accelerate concatenates the batches it dispatches."""
    width = max(len(it["input_ids"]) for it in items)

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        padded = [{**it, "input_ids": it["input_ids"] + [0] * (width - len(it["input_ids"])),
                   "labels": it["labels"] + [-100] * (width - len(it["labels"]))} for it in batch]
        out = pad_multimodal_batch(padded)
        out["attention_mask"] = torch.tensor([[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"]))
                                              for it in batch])
        images = torch.zeros(len(batch), 6, out["images"].shape[-1])
        images[:, : out["images"].shape[1]] = out["images"]
        out["images"] = images
        return out

    return collate


def build_trainer(output_dir: str | Path, spill_dir: str | Path, models: Path, *, stream: bool = False) -> Any:
    from transformers import TrainingArguments

    from spilleval import SpillingTrainer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    args = TrainingArguments(str(output_dir), per_device_eval_batch_size=BATCH_SIZE, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", logging_strategy="no")
    data = llava_dataset(tokenizer)
    return SpillingTrainer(model=load(_llava(tokenizer), models / "llava.pt"), args=args,
                           eval_dataset=Stream(data) if stream else data,
                           data_collator=fixed_width_collator(data) if stream else pad_multimodal_batch,
                           processing_class=tokenizer, metrics=METRICS, spill_dir=spill_dir,
                           compute_metrics=shifted_accuracy, preprocess_logits_for_metrics=argmax_ids)


def main() -> None:
    config = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    out = Path(config["out"]) / f"rank-{rank}.json"
    start = time.monotonic()
    record: dict[str, Any] = {"rank": rank, "world_size": world_size}
    try:
        if config["scenario"] == "trainer":
            trainer = build_trainer(config["output_dir"], config["spill_dir"], Path(config["models"]),
                                    stream=config.get("stream", False))
            record["results"] = trainer.evaluate()  # the Trainer initialises the process group itself
        else:
            torch.distributed.init_process_group(
                "gloo", init_method=config.get("init_method", "env://"), rank=rank, world_size=world_size
            )
            record["results"] = evaluate_qa(
                config["spill_dir"], Path(config["models"]), fail_rank=config.get("fail_rank"),
                failure=config["scenario"], dist_timeout=config.get("dist_timeout", 60.0),
                drop_last=config["scenario"] == "drop_last",
            )
    except Exception as error:  # noqa: BLE001 - the test inspects it
        record["error_type"] = type(error).__name__
        record["error"] = str(error)
        record["notes"] = list(getattr(error, "__notes__", []))
        record["traceback"] = traceback.format_exc()
    record["elapsed_s"] = time.monotonic() - start
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
