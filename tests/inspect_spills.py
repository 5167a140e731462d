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


# ----------------------------------------------------------------------------------------------- generation
GENERATION_METRICS = ["bleu", "rouge", "squad", "cider"]


def caption_generation_rows(tokenizer: Any, n: int, *, seed: int = 0) -> SampleBatch:
    """n generated captions (ragged: words dropped, replaced, added) with 2-5 reference captions each, in a
    "captions" column; the label ids are the first reference. Some predictions equal a reference."""
    rng = np.random.default_rng(seed)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    preds, labels, captions = [], [], []
    for i in range(n):
        base = [str(w) for w in rng.choice(CAPTION_WORDS, size=int(rng.integers(4, 12)))]
        refs = [" ".join(base)] + [" ".join(_edited(base, rng, 0.3)) for _ in range(int(rng.integers(1, 5)))]
        pred = base if i % 5 == 0 else _edited(base, rng, 0.4)
        preds.append(tokenizer.convert_tokens_to_ids(pred) + [eos])
        labels.append(tokenizer.convert_tokens_to_ids(base) + [eos])
        captions.append([r.capitalize() if k == 1 else r for k, r in enumerate(refs)])
    return SampleBatch.from_rows(range(n), preds, labels, vocab_size=len(tokenizer), aligned=False,
                                 columns={"captions": captions})


def vqa_generation_rows(tokenizer: Any, n: int, *, seed: int = 0) -> SampleBatch:
    """n generated short answers with a "question" column and several "answers" (VQA-style, repeats included)."""
    rng = np.random.default_rng(seed)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    preds, labels, questions, answers = [], [], [], []
    for i, example in enumerate(qa_examples(n, seed=seed)):
        answer = example["answer"]
        others = [str(w) for w in rng.choice(NUMBER_WORDS + COLOURS, size=int(rng.integers(1, 4)))]
        pred = answer.split() if i % 3 else [str(rng.choice(NUMBER_WORDS + COLOURS))]
        preds.append(tokenizer.convert_tokens_to_ids(pred) + [eos])
        labels.append(tokenizer.convert_tokens_to_ids(answer.split()) + [eos])
        questions.append(example["question"])
        answers.append([answer, *others, f"the {answer}"])
    return SampleBatch.from_rows(range(n), preds, labels, vocab_size=len(tokenizer), aligned=False,
                                 columns={"question": questions, "answers": answers})


def _edited(words: list[str], rng: np.random.Generator, rate: float) -> list[str]:
    out = []
    for word in words:
        roll = rng.random()
        if roll < rate / 3:
            continue  # dropped
        out.append(str(rng.choice(CAPTION_WORDS)) if roll < 2 * rate / 3 else word)
        if roll > 1 - rate / 3:
            out.append(str(rng.choice(CAPTION_WORDS)))  # an extra word
    return out or words[:1]


def write_generation_spill(path: Path, tokenizer: Any, rows: SampleBatch, *, references_column: str,
                           metrics: list[str] = GENERATION_METRICS, chunk_rows: int | None = None,
                           batch_size: int = 16, store_tokenizer: bool = True) -> Path:
    """Spill generated rows as `GenerationRun` does: task "generation", the metrics reading `references_column`."""
    from spilleval.generation import _with_references

    specs = [_with_references(m, references_column) for m in metrics]
    evaluator = Evaluator(path, specs, tokenizer=tokenizer if store_tokenizer else None, task="generation",
                          keep_logprob=False,
                          dataset_length=len(rows), chunk_rows=chunk_rows,
                          extra={"generation": {"references_column": references_column, "max_new_tokens": 32}})
    for start in range(0, len(rows), batch_size):
        evaluator.add(rows.take(np.arange(start, min(start + batch_size, len(rows)))), vocab_size=len(tokenizer))
    evaluator.finalize()
    return path
