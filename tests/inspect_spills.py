"""Readable spills for the inspection tests: QA answers and captions over the word-level test tokenizer.

Predictions are the references with some words replaced, so decoded output reads like a model's mistakes, and the
wrong positions are known exactly. Written through the real `Evaluator` (streaming metrics, results.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spilleval import Evaluator
from spilleval.batch import SampleBatch
from spilleval.testing import COLOURS, NUMBER_WORDS, SHAPES, qa_examples

METRICS = ["token_accuracy", "sequence_exact_match", "nll", "text_match"]
CAPTION_WORDS = COLOURS + SHAPES + ["a", "with", "and", "in", "the"]


def qa_rows(tokenizer: Any, n: int, *, seed: int = 0, wrong_rate: float = 0.3) -> SampleBatch:
    """n samples: short answers and longer captions, ~wrong_rate of the words wrong in the hard samples."""
    rng = np.random.default_rng(seed)
    examples = qa_examples(n, seed=seed)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    replacement = tokenizer.convert_tokens_to_ids(NUMBER_WORDS + COLOURS)
    labels, preds, logprobs, questions = [], [], [], []
    for i, example in enumerate(examples):
        if i % 4 == 3:  # a caption: longer references
            words = rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 24))).tolist()
            text, question = " ".join(words), "describe the image"
        else:
            text, question = example["answer"], example["question"]
        label = tokenizer.convert_tokens_to_ids(text.split()) + [eos]
        hard = rng.random() < 0.5
        wrong = rng.random(len(label)) < (wrong_rate if hard else 0.0)
        pred = [int(rng.choice(replacement)) if w else t for t, w in zip(label, wrong)]
        pred = [p if p != t or not w else (p + 1) for p, t, w in zip(pred, label, wrong)]  # really wrong
        labels.append(label)
        preds.append(pred)
        logprobs.append(np.where(wrong, -rng.uniform(1.0, 5.0, len(label)), -rng.uniform(0.0, 0.4, len(label))))
        questions.append(question)
    return SampleBatch.from_rows(range(n), preds, labels, vocab_size=len(tokenizer), logprobs=logprobs,
                                 columns={"question": questions})


def write_qa_spill(path: Path, tokenizer: Any, rows: SampleBatch, *, chunk_rows: int | None = None,
                   batch_size: int = 64, metrics: list[str] = METRICS) -> Path:
    """Spill `rows` with the real Evaluator in batches of `batch_size` (results.json included)."""
    evaluator = Evaluator(path, metrics=metrics, tokenizer=tokenizer, keep_logprob=rows.label_logprob is not None,
                          dataset_length=len(rows), chunk_rows=chunk_rows)
    for start in range(0, len(rows), batch_size):
        evaluator.add(rows.take(np.arange(start, min(start + batch_size, len(rows)))), vocab_size=len(tokenizer))
    evaluator.finalize()
    return path
