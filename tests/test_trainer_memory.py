"""Flat host memory: SpillingTrainer.evaluate() over 64 vs 640 samples (vocab 32,000, seq 256) in fresh processes.

Each evaluation runs in its own subprocess (this file is also the child script) and reports its peak RSS. The
spilleval growth must stay under 64 MB. For contrast, plain `Trainer` + `compute_metrics` is measured on fewer
samples (its logits, 32.8 MB per sample here, would not fit this machine at 640) and its growth is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

VOCAB, SEQ = 32_000, 256
LOGITS_MB_PER_SAMPLE = SEQ * VOCAB * 4 / 2**20


def run_child(mode: str, samples: int, out: Path) -> float:
    """Peak RSS (MiB) of one evaluation in a fresh interpreter."""
    done = subprocess.run([sys.executable, __file__, mode, str(samples), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


@pytest.mark.slow
def test_spilling_trainer_host_memory_is_flat_while_trainer_grows_with_logits(tmp_path):
    small, large = run_child("spill", 64, tmp_path / "a"), run_child("spill", 640, tmp_path / "b")
    growth = large - small
    few, more = 8, 32
    trainer_growth = run_child("trainer", more, tmp_path / "d") - run_child("trainer", few, tmp_path / "c")
    print(
        f"\nSpillingTrainer: peak RSS {small:.0f} MiB at 64 samples, {large:.0f} MiB at 640 (growth {growth:+.0f} MiB)"
        f"\nTrainer+compute_metrics: growth {trainer_growth:+.0f} MiB from {few} to {more} samples "
        f"(their logits: {(more - few) * LOGITS_MB_PER_SAMPLE:.0f} MiB; at 640 samples they would be "
        f"{640 * LOGITS_MB_PER_SAMPLE / 1024:.1f} GiB)"
    )
    assert growth < 64, f"SpillingTrainer's peak RSS grew by {growth:.0f} MiB from 64 to 640 samples"


# ----------------------------------------------------------------------------------------------- the child
def _child(mode: str, samples: int, out: str) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from spilleval.testing import peak_rss, tiny_llama
    from spilleval.trainer import SpillingTrainer

    torch.set_num_threads(1)

    class RandomTokens(torch.utils.data.Dataset):
        """Generated on access, so the dataset itself takes no memory that grows with its length."""

        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(4, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids.clone()}

    model = tiny_llama(VOCAB, hidden=16, layers=1, heads=2, max_positions=SEQ).eval()
    args = TrainingArguments(out, per_device_eval_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True)
    if mode == "spill":
        trainer = SpillingTrainer(model=model, args=args, eval_dataset=RandomTokens(), metrics=["token_accuracy"])
    else:
        def compute_metrics(eval_pred):
            logits, labels = eval_pred.predictions, eval_pred.label_ids
            return {"token_accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

        trainer = Trainer(model=model, args=args, eval_dataset=RandomTokens(), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    peak_mib = peak_rss() / 2**20  # VmHWM of this fresh process (ru_maxrss would inherit pytest's peak)
    print(json.dumps({"peak_rss_mib": peak_mib, "token_accuracy": metrics["eval_token_accuracy"]}))


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
