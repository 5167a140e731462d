"""Language-model metrics against lm-evaluation-harness's definitions, and the label log-probs they rest on.

- `mc_accuracy` (multiple choice by log-likelihood) and `bits_per_byte` (bits per byte, byte and word perplexity)
  against lm-evaluation-harness's definitions, written out below from lm_eval/api/task.py (`process_results` of
  `multiple_choice` and `loglikelihood_rolling`, `count_words`, `count_bytes`) and lm_eval/api/metrics.py (`mean`,
  `weighted_mean`, `weighted_perplexity`, `bits_per_byte`): on random data (ties, empty choice strings, unicode),
  invariant under batch size, chunk size, order and world size, with the choices of a question scattered over
  batches, chunks and ranks; and on a real tiny Llama trained briefly, live (`Evaluator`, `SpillingTrainer`) and
  offline (`compute_from_spill`).
- `nll` and `loss_percentiles` equal `torch.nn.functional.cross_entropy` to the bit on CPU.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from brute_force import make_args
from conftest import make_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metric_data import VOCAB_WORDS, Sample, batches_of, decoded_texts, run_streaming, tokenizer
from torch.nn import functional as F

from spilleval import Evaluator, SpillingTrainer
from spilleval.metrics import compute_from_spill
from spilleval.metrics.inputs import MetricInputError
from spilleval.spill import SpillWriter
from spilleval.spill.writer import mark_spill_complete
from spilleval.testing import COLOURS, NUMBER_WORDS, SHAPES, pad_batch, qa_examples

MC_KEYS = {"acc": "mc_accuracy", "acc_norm": "mc_accuracy_norm", "acc_bytes": "mc_accuracy_bytes",
           "acc_token_norm": "mc_accuracy_token_norm"}
MC = {"name": "mc_accuracy", "params": {"choice_column": "choice"}}


# ------------------------------------------------------------------------ lm-evaluation-harness, written out
def mean(arr):
    return sum(arr) / len(arr)


def weighted_mean(items):
    a, b = zip(*items)
    return sum(a) / sum(b)


def weighted_perplexity(items):
    return math.exp(-weighted_mean(items))


def bits_per_byte(items):
    return -weighted_mean(items) / math.log(2)


def count_bytes(doc):
    return len(doc.encode("utf-8"))


def count_words(doc):
    return len(re.split(r"\s+", doc))


def process_multiple_choice(lls, choices, gold, token_lengths):
    """`process_results` of a multiple_choice task (acc, acc_norm, acc_bytes; multiple targets: `pred in gold`),
    and the same argmax over the log-likelihood per supervised token."""
    completion_len = np.array([float(len(i)) for i in choices])
    byte_length = np.array([float(len(i.encode("utf-8"))) for i in choices])
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice string: numpy's inf / nan, as in lm-eval
        pred = np.argmax(lls)
        pred_norm = np.argmax(lls / completion_len)
        pred_byte = np.argmax(lls / byte_length)
        pred_token = np.argmax(lls / np.array(token_lengths, dtype=float))
    return {"acc": 1.0 if pred in gold else 0.0, "acc_norm": 1.0 if pred_norm in gold else 0.0,
            "acc_bytes": 1.0 if pred_byte in gold else 0.0, "acc_token_norm": 1.0 if pred_token in gold else 0.0}


def reference_mc(questions, lls, choices, right, token_lengths) -> dict[str, float]:
    """Per-sample lists in dataset order -> lm-eval's metrics, averaged over questions (docs) with `mean`."""
    docs: dict[Any, list[int]] = {}
    for i, question in enumerate(questions):
        docs.setdefault((type(question).__name__, question), []).append(i)
    per_doc = [process_multiple_choice(tuple(lls[i] for i in members), [choices[i] for i in members],
                                       [k for k, i in enumerate(members) if right[i]],
                                       [token_lengths[i] for i in members])
               for members in docs.values()]
    out = {MC_KEYS[k]: mean([r[k] for r in per_doc]) for k in MC_KEYS}
    return {**out, "mc_questions": len(per_doc)}


def reference_rolling(lls, docs) -> dict[str, float]:
    """`process_results` + aggregation of a loglikelihood_rolling task over (log-likelihood, document text)."""
    return {"bits_per_byte": bits_per_byte([(ll, count_bytes(d)) for ll, d in zip(lls, docs)]),
            "byte_perplexity": weighted_perplexity([(ll, count_bytes(d)) for ll, d in zip(lls, docs)]),
            "word_perplexity": weighted_perplexity([(ll, count_words(d)) for ll, d in zip(lls, docs)])}


# ------------------------------------------------------------------------ random data
LOGPROBS = st.sampled_from([-0.5, -1.0, -2.0, -0.25, -0.0]) | st.floats(-12, 0, width=32)
CHOICE_STRINGS = ["A", "Paris", "ÉCOLE 日本語", "", "red cat", "😀", "two words"]


@st.composite
def mc_samples(draw: Any, max_questions: int = 8) -> list[Sample]:
    """Questions of 1-5 choices (at least one right), ids ints or strings (one type per column, as Arrow stores a
    column), log-probs that tie often, choices spread over the dataset in a random order."""
    samples = []
    as_string = draw(st.booleans())
    for q in range(draw(st.integers(1, max_questions))):
        k = draw(st.integers(1, 5))
        right = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        if not any(right):
            right[draw(st.integers(0, k - 1))] = True
        question = f"question {q}" if as_string else q
        for c in range(k):
            label = draw(st.lists(st.sampled_from(VOCAB_WORDS), min_size=1, max_size=4))
            logprob = draw(st.lists(LOGPROBS, min_size=len(label), max_size=len(label)))
            choice = draw(st.sampled_from(CHOICE_STRINGS))
            samples.append(Sample(pred=label, label=label, logprob=logprob,
                                  columns={"question_id": question, "choice_target": right[c], "choice": choice}))
    order = draw(st.permutations(range(len(samples))))
    return [samples[i] for i in order]


def exact_ll(logprob: Sequence[float]) -> float:
    return math.fsum(np.asarray(logprob, dtype=np.float32).astype(np.float64).tolist())


def reference_mc_of(samples: list[Sample], *, from_column: bool) -> dict[str, float]:
    choices = [s.columns["choice"] for s in samples] if from_column else decoded_texts(samples)[1]
    return reference_mc([s.columns["question_id"] for s in samples], [exact_ll(s.logprob) for s in samples],
                        choices, [s.columns["choice_target"] for s in samples], [len(s.logprob) for s in samples])


def write_ranks(path: Path, samples: list[Sample], order: Sequence[int], *, world: int, chunk_rows: int,
                batch_size: int) -> Path:
    """A complete spill of `world` shards: rank r evaluates order[r::world] after the order is padded with its first
    samples to a multiple of `world`, as `DistributedSampler` does (the reader drops the duplicates)."""
    padded = list(order) + list(order)[: (-len(order)) % world]
    manifest = make_manifest(len(tokenizer()), has_logprob=True, dataset_length=len(samples), world_size=world)
    for rank in range(world):
        with SpillWriter(path, manifest, rank=rank, chunk_rows=chunk_rows, tokenizer=tokenizer()) as writer:
            for batch in batches_of(samples, batch_size, padded[rank::world]):
                writer.write(batch)
    mark_spill_complete(path, manifest)
    return path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mc_samples(), st.integers(1, 3), st.integers(1, 7), st.integers(1, 6), st.integers(1, 9), st.randoms())
def test_multiple_choice_equals_lm_eval_at_any_batch_chunk_order_and_world_size(
        tmp_path_factory, samples, world, chunk_rows, batch_size, read_batch, rnd):
    order = list(range(len(samples)))
    rnd.shuffle(order)
    spill = write_ranks(tmp_path_factory.mktemp("mc") / "spill", samples, order, world=world, chunk_rows=chunk_rows,
                        batch_size=batch_size)
    by_column = compute_from_spill(spill, [{"name": "mc_accuracy",
                                            "params": {"choice_column": "choice", "batch_size": read_batch}}])
    assert by_column == reference_mc_of(samples, from_column=True)  # exactly: counts of right questions
    decoded = compute_from_spill(spill, [{"name": "mc_accuracy", "params": {"batch_size": read_batch}}])
    assert decoded == reference_mc_of(samples, from_column=False)


def test_multiple_choice_ties_nan_and_empty_choices_follow_numpy():
    """np.argmax: the first of tied maxima, NaN beats every number (0 / 0 for an empty choice with log-lik 0)."""
    def question(lls, choices, right):
        return [Sample(pred=["a"] * len(lp), label=["a"] * len(lp), logprob=lp,
                       columns={"question_id": 0, "choice_target": r, "choice": c})
                for lp, c, r in zip(lls, choices, right)]

    cases = [
        question([[-1.0], [-1.0]], ["x", "y"], [False, True]),  # tie: the first wins, wrong
        question([[-1.0], [-2.0, -0.0]], ["", "yy"], [True, False]),  # -1/0 = -inf loses
        question([[-0.0], [-2.0]], ["", "yy"], [True, False]),  # 0/0 = NaN wins every normalised argmax
        question([[-3.0], [-1.0, -1.0]], ["a", "bb"], [True, True]),  # two right choices
    ]
    for samples in cases:
        got = run_corpus(samples, MC)
        assert got == reference_mc_of(samples, from_column=True)


def run_corpus(samples: list[Sample], spec: Any) -> dict[str, float]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spill = write_ranks(Path(tmp) / "s", samples, range(len(samples)), world=1, chunk_rows=2, batch_size=2)
        return compute_from_spill(spill, [spec])


@pytest.mark.parametrize("columns, message", [
    ({"question_id": 0, "choice_target": False, "choice": "a"}, "no choice of question 0 is marked right"),
    ({"question_id": 0, "choice_target": "yes", "choice": "a"}, "marks the right choice with True"),
    ({"question_id": 1.5, "choice_target": True, "choice": "a"}, "a question id is an int or a string"),
])
def test_multiple_choice_bad_columns_are_clear_errors(columns, message):
    with pytest.raises(MetricInputError, match=message):
        run_corpus([Sample(pred=["a"], label=["a"], logprob=[-1.0], columns=columns)], MC)


def test_a_choice_without_supervised_tokens_is_a_clear_error():
    samples = [Sample(pred=[], label=[], logprob=[], columns={"question_id": 0, "choice_target": True, "choice": ""})]
    with pytest.raises(MetricInputError, match="sample 0 .* has no supervised token"):
        run_corpus(samples, MC)


# ------------------------------------------------------------------------ bits per byte, random data
@st.composite
def documents(draw: Any) -> list[Sample]:
    out = []
    for _ in range(draw(st.integers(1, 20))):
        pred, label = draw(st.lists(st.sampled_from(VOCAB_WORDS), max_size=6)), draw(
            st.lists(st.sampled_from(VOCAB_WORDS), max_size=6))
        width = max(len(pred), len(label))
        out.append(Sample(pred=pred, label=label, logprob=draw(st.lists(LOGPROBS, min_size=width, max_size=width)),
                          columns={"text": draw(st.text(max_size=20))}))
    return out


def reference_bpb(samples: list[Sample], *, from_column: bool) -> dict[str, float]:
    texts = [s.columns["text"] for s in samples] if from_column else decoded_texts(samples)[1]
    docs = [(exact_ll(s.logprob), t) for s, t in zip(samples, texts) if s.logprob]  # supervised samples only
    return reference_rolling(*zip(*docs))


@settings(max_examples=30, deadline=None)
@given(documents(), st.integers(1, 6), st.integers(1, 6), st.randoms(), st.booleans())
def test_bits_per_byte_equals_lm_eval_and_is_invariant(samples, size_a, size_b, rnd, from_column):
    spec = {"name": "bits_per_byte", "params": {"references_column": "text" if from_column else None}}
    order = list(range(len(samples)))
    rnd.shuffle(order)
    whole = run_streaming([spec], batches_of(samples, size_a))
    got = whole.compute_streaming()
    if count_bytes_of(samples, from_column):
        want = reference_bpb(samples, from_column=from_column)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    else:  # no byte of text: lm-evaluation-harness divides by zero, spilleval says NaN
        assert math.isnan(got["bits_per_byte"]) and math.isnan(got["byte_perplexity"])
    shuffled = run_streaming([spec], batches_of(samples, size_b, order))
    split = len(samples) // 2
    left = run_streaming([spec], batches_of(samples, size_a, order[:split]))
    left.merge(run_streaming([spec], batches_of(samples, size_b, order[split:])).states())
    for other in (shuffled, left):  # an exact sum and two counts: the same bits
        assert same(other.compute_streaming(), got)


def count_bytes_of(samples: list[Sample], from_column: bool) -> int:
    texts = [s.columns["text"] for s in samples] if from_column else decoded_texts(samples)[1]
    return sum(count_bytes(t) for s, t in zip(samples, texts) if s.logprob)


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# ------------------------------------------------------------------------ a real model
def mc_items(tokenizer: Any, n_questions: int = 12, n_choices: int = 4, seed: int = 3) -> list[dict[str, Any]]:
    """The synthetic QA questions as a multiple-choice task: the right answer, one wrong answer of its kind (a
    number word; a colour, with or without a shape word) and answers of the other kind, in a random order. A model
    trained briefly tells the kinds apart but rarely the right one of a kind: partly right. Each choice is one
    sample whose supervised tokens are the choice's continuation after "answer :"."""
    rng = random.Random(seed)
    colours = COLOURS + [f"{c} {s}" for c in COLOURS for s in SHAPES]
    items = []
    for q, example in enumerate(qa_examples(n_questions, seed=seed)):
        right = example["answer"]
        same, other = (NUMBER_WORDS, colours) if right in NUMBER_WORDS else (colours, NUMBER_WORDS)
        options = [right, rng.choice([a for a in same if a != right]), *rng.sample(other, n_choices - 2)]
        rng.shuffle(options)
        prompt = tokenizer(f"<s> {example['question']} answer :", add_special_tokens=False)["input_ids"]
        for option in options:
            continuation = tokenizer(option, add_special_tokens=False)["input_ids"]
            items.append({"input_ids": prompt + continuation, "labels": [-100] * len(prompt) + continuation,
                          "question_id": q, "choice_target": option == right, "choice": option})
    return items


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row: float32 log-probs of the (shifted) supervised labels, as lm-evaluation-harness's HF model computes
    them (`F.log_softmax(logits, dim=-1)`, gathered at the continuation)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    gathered = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [gathered[i][targets[i] != -100] for i in range(len(targets))]


def reference_from_logprobs(items: list[dict[str, Any]], logprobs: list[torch.Tensor], tok: Any) -> dict[str, Any]:
    """lm-eval's numbers from per-item label log-probs (dataset order): log-likelihoods summed in float32 as
    lm-eval does (`float(logits.sum())`) and exactly in float64 (spilleval's definition); both must agree here."""
    questions = [it["question_id"] for it in items]
    right = [it["choice_target"] for it in items]
    lengths = [len(lp) for lp in logprobs]
    decoded = tok.batch_decode([[x for x in it["labels"] if x != -100] for it in items], skip_special_tokens=True)
    lm_eval_lls = [float(lp.sum()) for lp in logprobs]
    exact_lls = [math.fsum(lp.double().tolist()) for lp in logprobs]
    by_column = reference_mc(questions, exact_lls, [it["choice"] for it in items], right, lengths)
    assert by_column == reference_mc(questions, lm_eval_lls, [it["choice"] for it in items], right, lengths)
    return {"by_column": by_column, "decoded": reference_mc(questions, exact_lls, decoded, right, lengths),
            "rolling": reference_rolling(exact_lls, decoded)}


COLUMNS = ("question_id", "choice_target", "choice")


def test_multiple_choice_on_a_trained_model_live_and_offline_equal_lm_eval(trained_model, tokenizer, tmp_path):
    """The choices of each question land in different batches and chunks (batch 3, 4 choices, shuffled order)."""
    items = mc_items(tokenizer)
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    logprobs: list[torch.Tensor | None] = [None] * len(items)
    specs = [MC, "bits_per_byte", "nll"]
    evaluator = Evaluator(tmp_path / "spill", specs, tokenizer=tokenizer, chunk_rows=5, dataset_length=len(items))
    with evaluator:
        for start in range(0, len(order), 3):
            rows = order[start : start + 3]
            batch = pad_batch([items[i] for i in rows])
            with torch.no_grad():
                logits = trained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i, lp in zip(rows, label_logprobs(logits, batch["labels"])):
                logprobs[i] = lp
            evaluator.update(logits, batch["labels"], sample_index=rows,
                             columns={c: [items[i][c] for i in rows] for c in COLUMNS})
        live = evaluator.finalize()
    want = reference_from_logprobs(items, logprobs, tokenizer)
    assert {k: live[k] for k in want["by_column"]} == want["by_column"]
    assert 0.25 < live["mc_accuracy"] < 1 and live["mc_questions"] == 12  # above chance, partly right
    assert live["mc_accuracy_norm"] != live["mc_accuracy"]  # the length normalisation changes answers here
    for key, value in want["rolling"].items():
        assert live[key] == pytest.approx(value, rel=1e-9), key
    assert compute_from_spill(tmp_path / "spill") == live
    decoded = compute_from_spill(tmp_path / "spill", [{"name": "mc_accuracy", "params": {}}])
    assert decoded == want["decoded"]


@pytest.mark.slow
def test_spilling_trainer_carries_the_question_columns(trained_model, tokenizer, tmp_path):
    """SpillingTrainer spills the dataset columns its metrics read; the numbers equal lm-eval's on the logits of
    the trainer's own eval batches (batch 4, the dataset's order)."""
    items = mc_items(tokenizer, n_questions=7, n_choices=3)
    trainer = SpillingTrainer(model=trained_model, args=make_args(tmp_path), eval_dataset=items,
                              data_collator=pad_batch, processing_class=tokenizer,
                              metrics=[MC, "bits_per_byte", "token_accuracy"])
    metrics = trainer.evaluate()
    logprobs = []
    for start in range(0, len(items), 4):
        batch = pad_batch(items[start : start + 4])
        with torch.no_grad():
            logits = trained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs += label_logprobs(logits, batch["labels"])
    want = reference_from_logprobs(items, logprobs, tokenizer)
    assert {k: metrics[f"eval_{k}"] for k in want["by_column"]} == want["by_column"]
    for key, value in want["rolling"].items():
        assert metrics[f"eval_{key}"] == pytest.approx(value, rel=1e-9), key
    assert compute_from_spill(trainer.last_spill_dir)["mc_accuracy"] == metrics["eval_mc_accuracy"]


def test_spilling_trainer_names_a_missing_metric_column(trained_model, tokenizer, tmp_path):
    items = [{k: v for k, v in it.items() if k != "choice"} for it in mc_items(tokenizer, n_questions=2)]
    trainer = SpillingTrainer(model=trained_model, args=make_args(tmp_path), eval_dataset=items,
                              data_collator=pad_batch, processing_class=tokenizer, metrics=[MC])
    with pytest.raises(KeyError, match="no 'choice' column, which metric\\(s\\) mc_accuracy read"):
        trainer.evaluate()


# ------------------------------------------------------------------------ exact label log-probs on CPU
def test_nll_and_loss_percentiles_equal_cross_entropy_to_the_bit_on_cpu(trained_model, qa_batches, tokenizer,
                                                                          tmp_path):
    """The spilled label log-probs are -cross_entropy to the bit, so nll is the correctly rounded mean of
    cross_entropy(reduction="none") and loss_percentiles is numpy.percentile of the per-sample means."""
    q = [0, 10, 50, 90, 99, 100]
    specs = ["nll", {"name": "loss_percentiles", "params": {"percentiles": q}}]
    per_sample: list[list[float]] = []
    with Evaluator(tmp_path / "spill", specs, tokenizer=tokenizer) as evaluator:
        for batch in qa_batches:
            with torch.no_grad():
                logits = trained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            evaluator.update(logits, batch["labels"], sample_index=batch["index"])
            targets = batch["labels"][:, 1:]
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="none").view(targets.shape)
            per_sample += [ce[i][targets[i] != -100].double().tolist() for i in range(len(targets))]
        results = evaluator.finalize()
    tokens = [x for row in per_sample for x in row]
    nll = math.fsum(tokens) / len(tokens)
    assert results["nll"] == nll and results["perplexity"] == math.exp(nll)
    losses = [math.fsum(row) / len(row) for row in per_sample if row]
    assert [results[f"loss_p{x}"] for x in q] == np.percentile(losses, q).tolist()
