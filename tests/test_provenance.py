"""results.json says what was evaluated: the weights (after load_best_model_at_end: the best checkpoint's), the step,
the eval set, the code; its metrics are keyed as the trainer logged them, and `spilleval compute --json` prints the
same shape."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from brute_force import make_args
from conftest import SPILLEVAL_SCRIPT, make_manifest, random_batch, split_batch

from spilleval import Evaluator, SampleBatch, SpillReader
from spilleval.provenance import eval_set_fingerprint, git_record, weights_fingerprint
from spilleval.spill import SpillWriter
from spilleval.testing import encode_qa, fit, pad_batch, qa_examples, tiny_llama
from spilleval.trainer import SpillingTrainer

METRICS = ["token_accuracy", "sequence_exact_match"]


def results_record(spill) -> dict:
    return json.loads((spill / "results.json").read_text())


@pytest.mark.slow
def test_after_load_best_model_at_end_the_spill_names_the_best_checkpoint(tokenizer, tmp_path):
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(48, seed=50)]
    evals = [encode_qa(ex, tokenizer) for ex in qa_examples(16, seed=51)]
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                     max_steps=16, learning_rate=1e-2, per_device_train_batch_size=8, load_best_model_at_end=True,
                     metric_for_best_model="token_accuracy", greater_is_better=True)
    trainer = SpillingTrainer(model=tiny_llama(len(tokenizer), seed=9), args=args, train_dataset=train,
                              eval_dataset=evals, data_collator=pad_batch, processing_class=tokenizer, metrics=METRICS)
    trainer.train()
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    metrics = trainer.evaluate()
    spill = trainer.last_spill_dir
    assert spill.name == "spill-eval-step-16-1"  # the step's own spill exists: a numbered one, never overwritten
    record = results_record(spill)
    checkpoint = record["provenance"]["checkpoint"]
    assert checkpoint["global_step"] == 16 and checkpoint["loaded_checkpoint_step"] == best_step
    assert checkpoint["loaded_checkpoint"].endswith(f"checkpoint-{best_step}")
    # the weights evaluated are the best checkpoint's: the fingerprint its own evaluation recorded
    fingerprints = {step: results_record(tmp_path / "out" / f"spill-eval-step-{step}")["provenance"]["model"]
                    ["weights_fingerprint"] for step in (4, 8, 12, 16)}
    assert record["provenance"]["model"]["weights_fingerprint"] == fingerprints[best_step]
    assert len(set(fingerprints.values())) == 4  # every step's weights differ
    # the metrics under the keys the trainer logged, with the same values
    assert record["metrics"] == {k: v for k, v in metrics.items() if k in record["metrics"]}
    assert set(record["metrics"]) == {"eval_loss", "eval_token_accuracy", "eval_sequence_exact_match"}
    assert record["provenance"]["dataset"]["samples"] == 16 and record["provenance"]["metric_key_prefix"] == "eval"


def test_compute_json_prints_the_shape_of_results_json(tokenizer, tmp_path):
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(12, seed=52)]
    model = fit(tiny_llama(len(tokenizer), seed=10), [pad_batch(data[i : i + 6]) for i in (0, 6)], steps=20)
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, metrics=METRICS)
    trainer.evaluate()
    spill = trainer.last_spill_dir
    done = subprocess.run([str(SPILLEVAL_SCRIPT), "compute", str(spill), "--json"], capture_output=True, text=True,
                          check=True)
    printed, stored = json.loads(done.stdout), results_record(spill)
    assert printed == stored  # metrics, provenance and the 95% intervals the run stored, recomputed the same
    assert stored["intervals"]["eval_loss"]["method"] == "bootstrap"
    assert stored["intervals"]["eval_loss"]["low"] < stored["metrics"]["eval_loss"] < stored["intervals"]["eval_loss"]["high"]
    assert SpillReader(spill).results() == {k[len("eval_"):]: v for k, v in stored["metrics"].items()}
    model_record = stored["provenance"]["model"]
    assert model_record["class"] == "LlamaForCausalLM" and model_record["parameters"] == model.num_parameters()
    assert stored["provenance"]["versions"]["spilleval"] and stored["provenance"]["run"]["run_time_s"] >= 0


def test_the_eval_set_fingerprint_does_not_depend_on_batching_chunking_or_order(tmp_path):
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 40, vocab_size=300)
    fingerprints = set()
    for name, order, size, chunk_rows in (("a", np.arange(40), 8, 5), ("b", rng.permutation(40), 3, 17)):
        shuffled = batch.take(order)
        with SpillWriter(tmp_path / name, make_manifest(300), chunk_rows=chunk_rows) as writer:
            for piece in split_batch(shuffled, size):
                writer.write(piece)
        fingerprints.add(eval_set_fingerprint(SpillReader(tmp_path / name)))
    assert len(fingerprints) == 1 and next(iter(fingerprints))[0] == 40
    other = SampleBatch.from_rows([0], [[1, 2]], [[1, 3]], vocab_size=300)
    with SpillWriter(tmp_path / "other", make_manifest(300)) as writer:
        writer.write(other)
    assert eval_set_fingerprint(SpillReader(tmp_path / "other"))[1] != eval_set_fingerprint(SpillReader(tmp_path / "a"))[1]


def test_weights_fingerprint_follows_the_weights(tokenizer):
    model = tiny_llama(len(tokenizer), seed=11)
    same = copy.deepcopy(model)
    assert weights_fingerprint(model) == weights_fingerprint(same)
    with torch.no_grad():
        next(same.parameters())[0, 0] += 1e-3
    assert weights_fingerprint(model) != weights_fingerprint(same)



def test_weights_fingerprint_of_a_tensor_whose_last_float32_position_rounds_past_its_end():
    """16,777,220 - 1 rounds up to 16,777,220 in float32 (as 32,000 x 2,048 - 1 does): the sampled positions stay in
    the tensor, and changing its last value changes the fingerprint."""
    layer = torch.nn.Linear(16_777_220, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    before = weights_fingerprint(layer)
    with torch.no_grad():
        layer.weight[0, -1] = 1.0
    assert weights_fingerprint(layer) != before

def test_git_record_names_the_commit_and_uncommitted_changes(tmp_path):
    assert git_record(tmp_path) is None  # not a repository
    run = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout.strip()
    run("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    run("add", "train.py")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    record = git_record(tmp_path)
    assert record == {"commit": run("rev-parse", "HEAD"), "dirty": False, "root": str(tmp_path.resolve())}
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_record(tmp_path)["dirty"] is True


def test_a_plain_evaluator_records_its_provenance_unprefixed(tmp_path, tokenizer):
    rng = np.random.default_rng(4)
    evaluator = Evaluator(tmp_path / "spill", METRICS, dataset_length=20, provenance={"model": {"name": "mine"}})
    for piece in split_batch(random_batch(rng, 20, vocab_size=300), 6):
        evaluator.add(piece, vocab_size=300)
    results = evaluator.finalize()
    record = results_record(tmp_path / "spill")
    assert record["metrics"] == results and record["provenance"]["model"] == {"name": "mine"}
    assert record["provenance"]["dataset"]["samples"] == 20 and record["provenance"]["metric_key_prefix"] is None
    assert record["provenance"]["git"] == git_record() and sys.version.split()[0] in str(record["provenance"])
