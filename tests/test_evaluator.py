"""Evaluator with a real tiny Llama and a real tokenizer: live results equal in-memory references computed from
the full logits, the spill holds what the metrics saw, and bad use fails early with a clear message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from spilleval import Evaluator, SampleBatch, SpillReader
from spilleval.evaluator import EmptyEvaluationError
from spilleval.metrics.runner import MetricConfigError
from spilleval.spill import SpillExistsError

METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]


def build_compute_metrics(tokenizer):
    """The motivating example's batch_eval_metrics closure, with its elided lines completed the obvious way."""
    accumulated_stats = {"bit_correct": 0, "bit_total": 0, "exact_match": 0, "samples": 0}

    def _compute_metrics(eval_preds, compute_result=False):
        logits_np = eval_preds["predictions"][0].cpu().numpy()
        labels_np = eval_preds["label_ids"].cpu().numpy()
        pred_ids = np.argmax(logits_np, axis=-1)[:, :-1]
        labels = labels_np[:, 1:]
        for i in range(labels.shape[0]):
            label_mask = labels[i] != -100
            pred_mask = label_mask
            label_text = tokenizer.decode(labels[i][label_mask].tolist(), skip_special_tokens=True)
            pred_text = tokenizer.decode(pred_ids[i][pred_mask].tolist(), skip_special_tokens=True)
            accumulated_stats["bit_correct"] += sum(1 for p, t in zip(pred_text, label_text) if p == t)
            accumulated_stats["bit_total"] += len(label_text)
            accumulated_stats["exact_match"] += int(pred_text == label_text)
            accumulated_stats["samples"] += 1
        if compute_result:
            s = accumulated_stats
            return {
                "bit_match_accuracy": s["bit_correct"] / s["bit_total"] if s["bit_total"] > 0 else 0.0,
                "exact_match_accuracy": s["exact_match"] / s["samples"] if s["samples"] > 0 else 0.0,
            }
        return None

    return _compute_metrics


@pytest.fixture(scope="module")
def forward_outputs(trained_model, qa_batches):
    """(batch, logits, loss) per batch; with output_hidden_states like the motivating example's model."""
    out = []
    with torch.no_grad():
        for batch in qa_batches:
            result = trained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=batch["labels"], output_hidden_states=True)
            out.append((batch, result.logits, result.loss))
    return out


def references(forward_outputs, tokenizer) -> dict[str, float]:
    """Everything held in memory at once: what a naive evaluation would compute."""
    closure = build_compute_metrics(tokenizer)
    text = None
    correct = total = exact_rows = rows = 0
    nll_terms, pred_texts, label_texts = [], [], []
    for i, (batch, logits, loss) in enumerate(forward_outputs):
        text = closure({"predictions": (logits, None), "label_ids": batch["labels"]},
                       compute_result=i == len(forward_outputs) - 1)
        pred = logits[:, :-1].argmax(-1)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        correct += int((pred == labels)[mask].sum())
        total += int(mask.sum())
        exact_rows += int(((pred == labels) | ~mask).all(dim=1).sum())
        rows += len(labels)
        logprob = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        nll_terms.append(-logprob[mask])
        for r in range(len(labels)):
            pred_texts.append(tokenizer.decode(pred[r][mask[r]].tolist(), skip_special_tokens=True))
            label_texts.append(tokenizer.decode(labels[r][mask[r]].tolist(), skip_special_tokens=True))
    nll = float(torch.cat(nll_terms).mean())
    return {
        "token_accuracy": correct / total,
        "sequence_exact_match": exact_rows / rows,
        **text,
        "nll": nll,
        "perplexity": math.exp(nll),
        "answer_macro_f1": float(f1_score(label_texts, pred_texts, average="macro")),
    }


def run_evaluator(spill_dir, forward_outputs, tokenizer, **kwargs) -> tuple[Evaluator, dict[str, float]]:
    evaluator = Evaluator(spill_dir, metrics=METRICS, tokenizer=tokenizer,
                          dataset_length=sum(len(b["input_ids"]) for b, _, _ in forward_outputs), **kwargs)
    for batch, logits, _ in forward_outputs:
        evaluator.update(logits, batch["labels"], sample_index=batch["index"],
                         columns={"answer_words": [[str(int(x))] for x in batch["index"]]})
    return evaluator, evaluator.finalize()


def test_live_results_equal_the_in_memory_references(tmp_path, forward_outputs, tokenizer):
    evaluator, results = run_evaluator(tmp_path / "eval", forward_outputs, tokenizer, chunk_rows=5)
    want = references(forward_outputs, tokenizer)
    assert 0.2 < want["token_accuracy"] < 0.9 and 0 < want["exact_match_accuracy"] < 1  # right and wrong answers
    assert set(results) == set(want)
    for key in ("token_accuracy", "sequence_exact_match", "bit_match_accuracy", "exact_match_accuracy",
                "answer_macro_f1"):
        assert results[key] == want[key], key
    # log-probs are float32 on the model's side: equal to the float64 reference to float32 precision
    assert results["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert results["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    # the eval loss numerator equals the model's own loss (mean CE over supervised tokens) times the tokens
    model_loss_sum = sum(float(loss) * int((b["labels"][:, 1:] != -100).sum()) for b, _, loss in forward_outputs)
    assert evaluator.loss_sum == pytest.approx(model_loss_sum, rel=1e-5)


def test_results_json_manifest_and_spill_agree_with_live(tmp_path, forward_outputs, tokenizer):
    _, results = run_evaluator(tmp_path / "eval", forward_outputs, tokenizer, chunk_rows=7)
    reader = SpillReader(tmp_path / "eval")
    assert reader.results() == results
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert record["metrics"] == results and record["provenance"]["dataset"]["samples"] == 32
    manifest = reader.manifest
    assert manifest.status == "complete" and manifest.has_logprob and manifest.dataset_length == 32
    assert [m["name"] for m in manifest.metrics] == METRICS
    assert manifest.vocab_size == len(tokenizer) and manifest.id_dtype == "uint16"
    assert reader.completeness().missing == [] and len(reader) == 32
    assert len(reader.chunks) == math.ceil(32 / 7)
    first = reader.get(9)
    assert first.columns["answer_words"] == [["9"]]
    assert reader.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_default_sample_index_and_add_of_reduced_batches(tmp_path, forward_outputs, tokenizer):
    """No sample_index: rows are numbered in arrival order; `add` takes host batches (e.g. generated ids)."""
    evaluator = Evaluator(tmp_path / "eval", metrics=["token_accuracy", "text_match"], tokenizer=tokenizer)
    for batch, logits, _ in forward_outputs[:2]:
        evaluator.update(logits, batch["labels"])
    evaluator.add(SampleBatch.from_rows([8, 9], [[5, 6], [7]], [[5, 6], [8]], vocab_size=len(tokenizer)),
                  vocab_size=len(tokenizer))
    results = evaluator.finalize()
    reader = SpillReader(tmp_path / "eval")
    assert sorted(int(i) for b in reader.iter_chunks() for i in b.sample_index) == list(range(10))
    assert len(reader) == 10 and "num_samples" not in results  # the count is provenance, not a metric
    assert not reader.manifest.has_logprob  # not needed by these metrics: not kept


def test_keep_logprob_defaults_to_what_the_metrics_need(tmp_path):
    assert Evaluator(tmp_path / "a", metrics=["nll"]).keep_logprob
    assert not Evaluator(tmp_path / "b", metrics=["token_accuracy"]).keep_logprob
    with pytest.raises(MetricConfigError, match="keep_logprob=True"):
        Evaluator(tmp_path / "c", metrics=["nll"], keep_logprob=False)


def test_bad_use_fails_early_and_clearly(tmp_path, forward_outputs, tokenizer):
    with pytest.raises(MetricConfigError, match="need a tokenizer"):
        Evaluator(tmp_path / "t", metrics=["text_match"])
    empty = Evaluator(tmp_path / "empty")
    with pytest.raises(EmptyEvaluationError, match="no sample was evaluated"):
        empty.finalize()
    run_evaluator(tmp_path / "eval", forward_outputs[:1], tokenizer)
    with pytest.raises(SpillExistsError, match="never overwrites"):
        Evaluator(tmp_path / "eval", metrics=METRICS, tokenizer=tokenizer)
    batch, logits, _ = forward_outputs[0]
    misaligned = Evaluator(tmp_path / "mis")
    with pytest.raises(ValueError, match="do not line up"):
        misaligned.update(logits[:, 1:], batch["labels"])
