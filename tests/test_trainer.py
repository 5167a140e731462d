"""SpillingTrainer against brute force: every metric from the model's own processed labels and logits.

Real transformers Trainers, real config-built models (a LLaVA-style Llama, a plain Llama, a T5), a real tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from brute_force import (
    EVAL_BATCH,
    assert_metrics_equal,
    assert_spill_rows,
    brute_force,
    make_args,
)
from transformers import T5Config, T5ForConditionalGeneration, Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from spilleval import SpillReader
from spilleval.capture import LabelCaptureError
from spilleval.spill.writer import SpillExistsError
from spilleval.testing import (
    IMAGE_TOKEN,
    encode_qa,
    fit,
    multimodal_qa_dataset,
    pad_batch,
    pad_multimodal_batch,
    qa_examples,
    tiny_llama,
    tiny_llava,
)
from spilleval.trainer import SpillingTrainer, SpillPredictionOutput

ALL_METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run ~100x slower when torch threads oversubscribe the CI's two cores (pytest -n 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- LLaVA-style
@pytest.fixture(scope="module", params=["right", "left"])
def llava(request, tokenizer):
    """(model fine-tuned a little, dataset, collator) with the batch re-padded on the given side."""
    side = request.param
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), padding_side=side)
    data = multimodal_qa_dataset(22, tokenizer, seed=5)
    collate = lambda items: pad_multimodal_batch(items, side=side)  # noqa: E731
    fit(model, [collate(data[i : i + 8]) for i in range(0, 22, 8)])
    return model, data, collate


def llava_own_labels_and_logits(model, data, collate) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per eval batch: the labels the model's own preparation produces, and the logits its forward returns."""
    pairs = []
    for start in range(0, len(data), EVAL_BATCH):
        batch = collate(data[start : start + EVAL_BATCH])
        with torch.no_grad():
            _, positions, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
                batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
                batch["num_image_features"])
            logits = model(**batch).logits
        pairs.append((logits, labels))
    return pairs


def test_llava_style_model_every_metric_equals_brute_force(llava, tokenizer, tmp_path):
    model, data, collate = llava
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=collate,
                              processing_class=tokenizer, metrics=ALL_METRICS)
    metrics = trainer.evaluate()
    pairs = llava_own_labels_and_logits(model, data, collate)
    expected = brute_force(pairs, tokenizer, shift=True)
    assert 0.2 < expected["token_accuracy"] < 1.0 and expected["answer_macro_f1"] > 0  # a meaningful check
    assert_metrics_equal(metrics, expected)
    assert_spill_rows(trainer.last_spill_dir, expected)
    # plain Trainer's eval_loss is a mean of per-batch means (the last batch, of 2, weighs like those of 4):
    # SpillingTrainer's is token-weighted, so the two differ by the batches' composition only
    plain = Trainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=collate).evaluate()
    assert metrics["eval_loss"] != plain["eval_loss"] and metrics["eval_loss"] == pytest.approx(plain["eval_loss"],
                                                                                              rel=0.1)

    # The raw batch labels, made to fit the logits' width, evaluate different tokens: misalignment would show.
    raw_pairs = []
    for (logits, _), start in zip(pairs, range(0, len(data), EVAL_BATCH)):
        raw = collate(data[start : start + EVAL_BATCH])["labels"]
        raw_pairs.append((logits, torch.nn.functional.pad(raw, (0, logits.shape[1] - raw.shape[1]), value=-100)))
    misaligned = brute_force(raw_pairs, tokenizer, shift=True)
    assert misaligned["rows"][0] != expected["rows"][0]  # same label tokens, paired with the wrong positions
    assert misaligned["nll"] != expected["nll"] and misaligned["token_accuracy"] != expected["token_accuracy"]


def test_motivating_closure_gives_the_builtin_numbers(llava, tokenizer, tmp_path):
    model, data, collate = llava
    args = make_args(tmp_path, batch_eval_metrics=True)
    trainer = SpillingTrainer(model=model, args=args, eval_dataset=data, data_collator=collate,
                              processing_class=tokenizer, compute_metrics=build_compute_metrics(tokenizer),
                              metrics=["token_accuracy"])
    from_closure = trainer.evaluate()
    trainer.compute_metrics = None
    trainer.spill_metrics = ["text_match"]
    builtin = trainer.evaluate()
    for key in ("eval_bit_match_accuracy", "eval_exact_match_accuracy"):
        assert from_closure[key] == builtin[key], key
    assert "eval_num_samples" not in builtin  # a count, not a metric to chart: results.json's provenance has it
    samples = json.loads((trainer.last_spill_dir / "results.json").read_text())["provenance"]["dataset"]["samples"]
    assert from_closure["eval_num_samples"] == samples == len(data)
    assert 0 < builtin["eval_bit_match_accuracy"] < 1
    # the second evaluation at the same step got a fresh directory
    assert trainer.last_spill_dir.name == "spill-eval-step-0-1"


def build_compute_metrics(tokenizer: transformers.PreTrainedTokenizer):
    """The closure of ../shared/context/motivating-example.md, its elided lines completed the obvious way."""
    accumulated_stats = {"bit_correct": 0, "bit_total": 0, "exact_match": 0, "samples": 0}

    def _compute_metrics(eval_preds, compute_result=False):
        predictions = eval_preds.predictions
        labels = eval_preds.label_ids

        logits = predictions[0]

        labels_np = labels.cpu().numpy()
        logits_np = logits.cpu().numpy()

        pred_ids = np.argmax(logits_np, axis=-1)  # (B, Seq, Vocab) -> (B, Seq)
        pred_ids = pred_ids[:, :-1]
        labels = labels_np[:, 1:]

        batch_bit_correct = batch_bit_total = batch_exact_match = 0  # completed
        batch_samples = labels.shape[0]  # completed
        for i in range(labels.shape[0]):
            label_mask = labels[i] != -100  # completed
            pred_mask = label_mask  # completed
            label_ids_i = labels[i][label_mask].tolist()
            pred_ids_i = pred_ids[i][pred_mask].tolist()

            label_text = tokenizer.decode(label_ids_i, skip_special_tokens=True)
            pred_text = tokenizer.decode(pred_ids_i, skip_special_tokens=True)
            batch_bit_correct += sum(1 for p, t in zip(pred_text, label_text) if p == t)  # completed
            batch_bit_total += len(label_text)  # completed
            batch_exact_match += int(pred_text == label_text)  # completed

        accumulated_stats["bit_correct"] += batch_bit_correct
        accumulated_stats["bit_total"] += batch_bit_total
        accumulated_stats["exact_match"] += batch_exact_match
        accumulated_stats["samples"] += batch_samples

        if compute_result:
            final_stats = {
                "bit_match_accuracy": (accumulated_stats["bit_correct"] / accumulated_stats["bit_total"])
                if accumulated_stats["bit_total"] > 0 else 0.0,
                "exact_match_accuracy": (accumulated_stats["exact_match"] / accumulated_stats["samples"])
                if accumulated_stats["samples"] > 0 else 0.0,
                "num_samples": accumulated_stats["samples"],
            }
            for key in accumulated_stats:
                accumulated_stats[key] = 0
            return final_stats
        return None

    return _compute_metrics


# ------------------------------------------------------------------------------------------- other models
def test_plain_llama_without_label_fn(tokenizer, tmp_path):
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(18, seed=6)]
    model = fit(tiny_llama(len(tokenizer), seed=3), [pad_batch(data[i : i + 6]) for i in range(0, 18, 6)], steps=30)
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, metrics=ALL_METRICS)
    metrics = trainer.evaluate()
    pairs = []
    for start in range(0, len(data), EVAL_BATCH):
        batch = pad_batch(data[start : start + EVAL_BATCH])
        with torch.no_grad():
            pairs.append((model(**batch).logits, batch["labels"]))
    expected = brute_force(pairs, tokenizer, shift=True)
    assert_metrics_equal(metrics, expected)
    assert_spill_rows(trainer.last_spill_dir, expected)


def _seq2seq_item(example: dict[str, str], tokenizer: Any) -> dict[str, Any]:
    source = tokenizer(f"{example['question']} </s>", add_special_tokens=False)["input_ids"]
    target = tokenizer(f"{example['answer']} </s>", add_special_tokens=False)["input_ids"]
    return {"input_ids": source, "labels": target}


def _pad_seq2seq(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = pad_batch([{"input_ids": it["input_ids"], "labels": [-100] * len(it["input_ids"])} for it in items])
    width = max(len(it["labels"]) for it in items)
    batch["labels"] = torch.tensor([it["labels"] + [-100] * (width - len(it["labels"])) for it in items])
    return batch


def test_seq2seq_t5_without_label_fn(tokenizer, tmp_path):
    torch.manual_seed(4)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    data = [_seq2seq_item(ex, tokenizer) for ex in qa_examples(18, seed=7)]
    model = fit(T5ForConditionalGeneration(config), [_pad_seq2seq(data[i : i + 6]) for i in range(0, 18, 6)])
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=_pad_seq2seq,
                              processing_class=tokenizer, metrics=ALL_METRICS)
    metrics = trainer.evaluate()
    pairs = []
    for start in range(0, len(data), EVAL_BATCH):
        batch = _pad_seq2seq(data[start : start + EVAL_BATCH])
        with torch.no_grad():
            pairs.append((model(**batch).logits, batch["labels"]))
    expected = brute_force(pairs, tokenizer, shift=False)
    assert expected["token_accuracy"] > 0.2
    assert_metrics_equal(metrics, expected)
    assert SpillReader(trainer.last_spill_dir).manifest.task == "seq2seq"


# ------------------------------------------------------------------------------------------- errors, label_fn
def _hidden_labels_llava(tokenizer):
    """A LLaVA-style model that computes its loss by hand: processed labels are neither returned nor captured."""
    base = type(tiny_llava(8, image_token_id=4))

    class HandLossLlava(base):
        def forward(self, input_ids=None, attention_mask=None, labels=None, images=None, num_image_features=None):
            prepared = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, None, labels, images, num_image_features)
            _, positions, mask, _, embeds, new_labels = prepared
            out = super().forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            loss = torch.nn.functional.cross_entropy(logits, new_labels[:, 1:].reshape(-1))
            # a loss given at construction is in the output's dict on every transformers version (assigning
            # out.loss afterwards is not before 5.3, and Trainer then finds no loss)
            return CausalLMOutputWithPast(loss=loss, logits=out.logits)

    torch.manual_seed(0)
    template = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = HandLossLlava(template.config)
    model.load_state_dict(template.state_dict())
    return model.eval()


def test_unrecoverable_labels_raise_the_clear_error_and_label_fn_fixes_it(tokenizer, tmp_path):
    model = _hidden_labels_llava(tokenizer)
    data = multimodal_qa_dataset(6, tokenizer, seed=8)
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data,
                              data_collator=pad_multimodal_batch, processing_class=tokenizer)
    with pytest.raises(LabelCaptureError, match=r"label_fn=.*shape \(4, \d+\)"):
        trainer.evaluate()

    def label_fn(inputs, outputs):
        return model.prepare_inputs_labels_for_multimodal(
            inputs["input_ids"], None, inputs["attention_mask"], None, inputs["labels"], inputs["images"],
            inputs["num_image_features"])[5]

    fixed = SpillingTrainer(model=model, args=make_args(tmp_path, output_dir=str(tmp_path / "fixed")),
                            eval_dataset=data, data_collator=pad_multimodal_batch, processing_class=tokenizer,
                            label_fn=label_fn, metrics=ALL_METRICS)
    metrics = fixed.evaluate()
    expected = brute_force(llava_own_labels_and_logits(model, data, pad_multimodal_batch), tokenizer, shift=True)
    assert_metrics_equal(metrics, expected)


# ------------------------------------------------------------------------------------------- compatibility
@pytest.fixture(scope="module")
def qa_setup(tokenizer):
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(10, seed=9)]
    return tiny_llama(len(tokenizer), seed=5).eval(), data


def test_classic_compute_metrics_gets_what_plain_trainer_gives_it(qa_setup, tokenizer, tmp_path):
    """The closure gets plain Trainer's arrays, to the padding: argmax ids (unshifted) for the logits, raw labels."""
    model, data = qa_setup
    seen: dict[str, Any] = {}

    def compute_metrics(eval_pred):
        seen.setdefault("runs", []).append((eval_pred.predictions, eval_pred.label_ids))
        preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
        mask = labels != -100
        return {"my_accuracy": float((preds == labels)[mask].mean())}

    argmax = lambda logits, labels: logits.argmax(-1)  # noqa: E731 - what a plain-Trainer user writes
    plain = Trainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                    compute_metrics=compute_metrics, preprocess_logits_for_metrics=argmax).evaluate()
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_my_accuracy"] == plain["eval_my_accuracy"] == metrics["eval_token_accuracy"]
    (plain_preds, plain_labels), (preds, labels) = seen["runs"]
    assert preds.dtype == plain_preds.dtype and labels.dtype == plain_labels.dtype
    np.testing.assert_array_equal(preds, plain_preds)
    np.testing.assert_array_equal(labels, plain_labels)


def test_predict_returns_metrics_and_a_lazy_reader(qa_setup, tokenizer, tmp_path):
    model, data = qa_setup
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path), data_collator=pad_batch,
                              processing_class=tokenizer, metrics=["token_accuracy", "text_match"])
    output = trainer.predict(data)
    assert isinstance(output, SpillPredictionOutput)
    predictions, label_ids, metrics = output  # unpacks like transformers' PredictionOutput
    assert isinstance(predictions, SpillReader) and label_ids is None
    assert set(metrics) >= {"test_loss", "test_token_accuracy", "test_exact_match_accuracy"}
    assert output.reader.path.name == "spill-test-step-0" and len(output.reader) == len(data)
    assert output.reader.results()["token_accuracy"] == metrics["test_token_accuracy"]


def test_spill_dirs_are_fresh_and_never_overwritten(qa_setup, tokenizer, tmp_path):
    model, data = qa_setup
    kwargs = dict(model=model, data_collator=pad_batch, processing_class=tokenizer)
    trainer = SpillingTrainer(args=make_args(tmp_path), eval_dataset={"a": data[:5], "b": data[5:]}, **kwargs)
    metrics = trainer.evaluate()
    assert {"eval_a_token_accuracy", "eval_b_token_accuracy"} <= set(metrics)
    assert sorted(p.name for p in (tmp_path / "out").glob("spill-*")) == ["spill-eval_a-step-0", "spill-eval_b-step-0"]

    fixed = SpillingTrainer(args=make_args(tmp_path), eval_dataset=data, spill_dir=tmp_path / "mine", **kwargs)
    fixed.evaluate()
    assert (tmp_path / "mine" / "manifest.json").exists()
    with pytest.raises(SpillExistsError, match="never overwrites"):
        fixed.evaluate()
    with pytest.raises(ValueError, match=r"\{step\}"):
        SpillingTrainer(args=make_args(tmp_path, eval_strategy="steps", eval_steps=1), eval_dataset=data,
                        spill_dir=tmp_path / "mine", **kwargs)


def test_text_metrics_without_a_tokenizer_fail_at_construction(qa_setup, tmp_path):
    model, data = qa_setup
    with pytest.raises(ValueError, match="tokenizer"):
        SpillingTrainer(model=model, args=make_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                        metrics=["text_match"])


# ------------------------------------------------------------------------------------------- during training
@pytest.mark.slow
def test_eval_during_training_loads_the_best_checkpoint_by_a_corpus_metric(tokenizer, tmp_path):
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(24, seed=10)]
    model = tiny_llama(len(tokenizer), seed=6)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                     max_steps=12, learning_rate=1e-2, per_device_train_batch_size=8, logging_strategy="steps",
                     logging_steps=3, load_best_model_at_end=True, metric_for_best_model="answer_macro_f1",
                     greater_is_better=True, save_total_limit=None)
    trainer = SpillingTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:12],
                              data_collator=pad_batch, processing_class=tokenizer,
                              metrics=["token_accuracy", "answer_macro_f1"])
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_answer_macro_f1" in log]
    assert [log["step"] for log in evals] == [3, 6, 9, 12]
    best = max(evals, key=lambda log: log["eval_answer_macro_f1"])  # first of equals, as transformers keeps it
    assert best["step"] != 12  # (with this seed the best is not simply the last checkpoint)
    assert trainer.state.best_metric == best["eval_answer_macro_f1"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    for log in evals:  # one spill per evaluation, and its recomputed numbers are the logged ones
        spill = tmp_path / "out" / f"spill-eval-step-{log['step']}"
        assert SpillReader(spill).results()["answer_macro_f1"] == log["eval_answer_macro_f1"]
    # the model in memory is the best checkpoint's
    reloaded = trainer.evaluate()
    assert reloaded["eval_answer_macro_f1"] == best["eval_answer_macro_f1"]
