"""The obvious way, on the whole data in memory: metrics and per-sample rows from (logits, the labels the model's
loss used), for comparing `SpillingTrainer` and `Evaluator` against. Shared by the trainer, compatibility and GPU
tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from transformers import TrainingArguments

from spilleval import SpillReader
from spilleval.metrics.text import char_agreement

EVAL_BATCH = 4


def make_args(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    defaults = dict(per_device_eval_batch_size=EVAL_BATCH, report_to=[], use_cpu=True, disable_tqdm=True,
                    save_strategy="no", logging_strategy="no")
    output_dir = kwargs.pop("output_dir", str(tmp_path / "out"))
    return TrainingArguments(output_dir, **{**defaults, **kwargs})


def brute_force(pairs: list[tuple[torch.Tensor, torch.Tensor]], tokenizer: Any, *, shift: bool) -> dict[str, Any]:
    """All metrics from (logits, aligned labels) per batch, computed the obvious way on the whole data."""
    preds, labels, logprobs = [], [], []
    for logits, lab in pairs:
        if shift:
            logits, lab = logits[:, :-1], lab[:, 1:]
        logp = torch.log_softmax(logits.double(), dim=-1)
        for i in range(len(lab)):
            mask = lab[i] != -100
            preds.append(logits[i].argmax(-1)[mask].tolist())
            labels.append(lab[i][mask].tolist())
            logprobs += logp[i][mask].gather(-1, lab[i][mask].unsqueeze(-1)).squeeze(-1).tolist()
    pairs_flat = [(p, q) for row_p, row_l in zip(preds, labels) for p, q in zip(row_p, row_l)]
    pred_text = tokenizer.batch_decode(preds, skip_special_tokens=True)
    label_text = tokenizer.batch_decode(labels, skip_special_tokens=True)
    nll = -math.fsum(logprobs) / len(logprobs)
    return {
        "rows": (preds, labels),
        "loss": nll,  # SpillingTrainer's eval_loss: the token-weighted cross-entropy, whatever the batches
        "token_accuracy": sum(p == q for p, q in pairs_flat) / len(pairs_flat),
        "sequence_exact_match": float(np.mean([p == q for p, q in zip(preds, labels)])),
        "bit_match_accuracy": sum(map(char_agreement, pred_text, label_text)) / sum(map(len, label_text)),
        "exact_match_accuracy": float(np.mean([p == q for p, q in zip(pred_text, label_text)])),
        "nll": nll,
        "perplexity": math.exp(nll),
        "answer_macro_f1": f1_score(label_text, pred_text, average="macro"),
    }


def assert_metrics_equal(metrics: dict[str, Any], expected: dict[str, Any], prefix: str = "eval", *,
                         check_loss: bool = True) -> None:
    for key in ("token_accuracy", "sequence_exact_match", "bit_match_accuracy", "exact_match_accuracy",
                "answer_macro_f1"):
        if f"{prefix}_{key}" in metrics:
            assert metrics[f"{prefix}_{key}"] == expected[key], key  # counts and ratios: exactly equal
    for key in ("nll", "perplexity"):
        if f"{prefix}_{key}" in metrics:
            assert metrics[f"{prefix}_{key}"] == pytest.approx(expected[key], rel=1e-6), key
    if check_loss:
        assert metrics[f"{prefix}_loss"] == pytest.approx(expected["loss"], rel=1e-6)
        if f"{prefix}_nll" in metrics:  # the same number, from per-sample sums instead of per-token values
            assert metrics[f"{prefix}_loss"] == pytest.approx(metrics[f"{prefix}_nll"], rel=1e-12)


def assert_spill_rows(spill_dir: Path, expected: dict[str, Any], index: list[int] | None = None) -> None:
    """Every spilled sample's (pred ids, label ids) equals the brute force's; `index[j]` is the dataset index of
    the j-th brute-force row (default: j)."""
    preds, labels = expected["rows"]
    index = list(range(len(preds))) if index is None else index
    reader = SpillReader(spill_dir)
    assert len(reader) == len(preds)
    for j, i in enumerate(index):
        got_pred, got_label = reader.get(i).row(0)
        assert got_label.tolist() == labels[j] and got_pred.tolist() == preds[j], f"sample {i}"
