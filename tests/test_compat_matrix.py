"""SpillingTrainer in the set-ups users really run, each against a brute-force loop over the same batches.

Every case uses a model trained briefly (token accuracy far from 0 and 1: an untrained model scores 0 whether the
labels are aligned or not), the labels the model's loss actually used, and compares every spilled sample's rows, not
only the aggregate. Set-ups: worker-sharded iterable datasets, label smoothing and `compute_loss_func` (causal LM
and seq2seq), models that rewrite their labels and compute their loss by hand (aligned: exact; misaligned with the
raw labels' shape: `LabelCaptureError`), classic and batched `compute_metrics` closures (what plain `Trainer` gives
them, to the array), PEFT LoRA, transformers' `LlavaForConditionalGeneration` and `Qwen2VLForConditionalGeneration`,
T5 and BART, bf16 evaluation, `eval_do_concat_batches=False`, `include_for_metrics`, `load_best_model_at_end`.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from brute_force import EVAL_BATCH, assert_metrics_equal, assert_spill_rows, brute_force, make_args
from spilleval import SpillReader
from spilleval.capture import LabelCaptureError
from spilleval.compat import ComputeMetricsError
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
from spilleval.trainer import SpillingTrainer

METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll"]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def qa_data(tokenizer) -> list[dict[str, Any]]:
    return [encode_qa(ex, tokenizer) for ex in qa_examples(22, seed=21)]


@pytest.fixture(scope="module")
def llama(tokenizer) -> LlamaForCausalLM:
    """A tiny Llama trained briefly on other questions of the same task (do not train it further in a test)."""
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(48, seed=22)]
    return fit(tiny_llama(len(tokenizer), seed=7), [pad_batch(train[i : i + 8]) for i in range(0, 48, 8)], steps=40)


def forward_pairs(model: torch.nn.Module, batches: list[dict[str, Any]],
                  labels_of: Callable[[dict[str, Any]], torch.Tensor] = lambda b: b["labels"]) -> list[tuple]:
    """(logits, the labels the model's loss used) per batch, as the brute force needs them."""
    pairs = []
    with torch.no_grad():
        for batch in batches:
            pairs.append((model(**batch).logits, labels_of(batch)))
    return pairs


def batches_of(data: list[dict[str, Any]], collate: Callable, size: int = EVAL_BATCH) -> list[dict[str, Any]]:
    return [collate(data[i : i + size]) for i in range(0, len(data), size)]


def check_exact(metrics: dict[str, Any], spill_dir, pairs, tokenizer, *, shift: bool = True,
                check_loss: bool = True, index: list[int] | None = None) -> dict[str, Any]:
    """The trainer's metrics and every spilled sample equal the brute force on a partly right model."""
    expected = brute_force(pairs, tokenizer, shift=shift)
    assert 0.1 < expected["token_accuracy"] < 0.95, expected["token_accuracy"]  # a check that can fail
    assert_metrics_equal(metrics, expected, check_loss=check_loss)
    assert_spill_rows(spill_dir, expected, index=index)
    return expected


def spilling(model, tokenizer, tmp_path, data, collate, metrics=METRICS, **kwargs) -> SpillingTrainer:
    args = make_args(tmp_path, **kwargs.pop("args", {}))
    return SpillingTrainer(model=model, args=args, eval_dataset=data, data_collator=collate,
                           processing_class=tokenizer, metrics=metrics, **kwargs)


# ----------------------------------------------------------------------------------------------- iterable datasets
class WorkerShardedStream(torch.utils.data.IterableDataset):
    """The torch-docs pattern: each dataloader worker takes one contiguous slice of the stream."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __iter__(self):
        lo, hi = worker_slice(len(self.items), torch.utils.data.get_worker_info())
        yield from self.items[lo:hi]


def worker_slice(n: int, info: Any) -> tuple[int, int]:
    if info is None:
        return 0, n
    per_worker = math.ceil(n / info.num_workers)
    lo = info.id * per_worker
    return lo, min(lo + per_worker, n)


@pytest.mark.parametrize("workers", [0, 2, 3])  # 0: the default; 3: uneven slices (8, 8, 6)
def test_worker_sharded_iterable_dataset_counts_every_sample_once(llama, qa_data, tokenizer, tmp_path, workers):
    trainer = spilling(llama, tokenizer, tmp_path, WorkerShardedStream(qa_data), pad_batch,
                       args={"dataloader_num_workers": workers})
    metrics = trainer.evaluate()
    # brute force: each worker's slice, in its own batches; row j of worker w is dataset index j * W + w
    pairs, index = [], []
    count = max(workers, 1)
    for worker in range(count):
        info = None if workers == 0 else type("Info", (), {"id": worker, "num_workers": workers})()
        lo, hi = worker_slice(len(qa_data), info)
        pairs += forward_pairs(llama, batches_of(qa_data[lo:hi], pad_batch))
        index += [j * count + worker for j in range(hi - lo)]
    check_exact(metrics, trainer.last_spill_dir, pairs, tokenizer, index=index)
    assert len(SpillReader(trainer.last_spill_dir)) == len(qa_data)
    assert SpillReader(trainer.last_spill_dir).manifest.dataset_length is None  # a stream has no length


# ----------------------------------------------------------------------------------------------- the trainer's own loss
def test_label_smoothing_causal_lm_is_exact(llama, qa_data, tokenizer, tmp_path):
    args = {"label_smoothing_factor": 0.1}
    trainer = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, args=args)
    metrics = trainer.evaluate()
    # eval_loss is the plain (unsmoothed) token-weighted cross-entropy, as without smoothing; Trainer reports the
    # smoothed training objective, which is larger
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(llama, batches_of(qa_data, pad_batch)), tokenizer)
    plain = Trainer(model=llama, args=make_args(tmp_path, **args), eval_dataset=qa_data,
                    data_collator=pad_batch).evaluate()
    assert plain["eval_loss"] > metrics["eval_loss"]


def test_compute_loss_func_causal_lm_is_exact(llama, qa_data, tokenizer, tmp_path):
    def shifted_ce(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    trainer = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, compute_loss_func=shifted_ce)
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(llama, batches_of(qa_data, pad_batch)), tokenizer)


def _seq2seq_item(example: dict[str, str], tokenizer: Any) -> dict[str, Any]:
    source = tokenizer(f"{example['question']} </s>", add_special_tokens=False)["input_ids"]
    target = tokenizer(f"{example['answer']} </s>", add_special_tokens=False)["input_ids"]
    return {"input_ids": source, "labels": target}


def seq2seq_collator(model: torch.nn.Module) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Pads sources and targets, and adds decoder_input_ids (as DataCollatorForSeq2Seq(model=...) does): with label
    smoothing the model gets no labels to build them from."""

    def collate(items):
        batch = pad_batch([{"input_ids": it["input_ids"], "labels": [-100] * len(it["input_ids"])} for it in items])
        width = max(len(it["labels"]) for it in items)
        batch["labels"] = torch.tensor([it["labels"] + [-100] * (width - len(it["labels"])) for it in items])
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch

    return collate


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq(request, tokenizer):
    torch.manual_seed(4)
    vocab = len(tokenizer)
    if request.param == "t5":
        config = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                          num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
        model = T5ForConditionalGeneration(config)
    else:
        config = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                            eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=None)
        model = BartForConditionalGeneration(config)
    collate = seq2seq_collator(model)
    train = [_seq2seq_item(ex, tokenizer) for ex in qa_examples(48, seed=23)]
    fit(model, batches_of(train, collate, 8), steps=60)
    data = [_seq2seq_item(ex, tokenizer) for ex in qa_examples(22, seed=24)]
    return model, data, collate


@pytest.mark.parametrize("loss", ["model", "label_smoothing", "compute_loss_func"])
def test_seq2seq_is_exact_whatever_computes_the_loss(seq2seq, tokenizer, tmp_path, loss):
    model, data, collate = seq2seq
    kwargs: dict[str, Any] = {}
    if loss == "label_smoothing":
        kwargs["args"] = {"label_smoothing_factor": 0.1}
    elif loss == "compute_loss_func":
        kwargs["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: F.cross_entropy(
            outputs.logits.reshape(-1, outputs.logits.shape[-1]), labels.reshape(-1))
    trainer = spilling(model, tokenizer, tmp_path, data, collate, **kwargs)
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(data, collate)), tokenizer,
                shift=False)
    assert SpillReader(trainer.last_spill_dir).manifest.task == "seq2seq"


# ----------------------------------------------------------------------------------------------- hand-written losses
def _hand_loss_llama(trained: LlamaForCausalLM, rewrite: Callable[[torch.Tensor], torch.Tensor]) -> LlamaForCausalLM:
    """The trained Llama, but its forward rewrites the labels with `rewrite` and computes the loss by hand (no
    self.loss_function, no outputs.labels): its logits keep the raw labels' shape."""

    class HandLoss(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
            logits = super().forward(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = None
            if labels is not None:
                new = rewrite(labels)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), new[:, 1:].reshape(-1))
            return CausalLMOutputWithPast(loss=loss, logits=logits)  # loss set at construction: every version

    model = HandLoss(trained.config)
    model.load_state_dict(trained.state_dict())
    return model.eval()


def _shift_by_two(labels: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(labels, -100)
    out[:, 2:] = labels[:, :-2]
    return out


def test_hand_loss_with_the_raw_labels_is_verified_and_exact(llama, qa_data, tokenizer, tmp_path):
    model = _hand_loss_llama(llama, rewrite=lambda labels: labels)
    trainer = spilling(model, tokenizer, tmp_path, qa_data, pad_batch)
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(qa_data, pad_batch)), tokenizer)


def test_same_shape_misaligned_labels_are_an_error_never_a_number(llama, qa_data, tokenizer, tmp_path):
    model = _hand_loss_llama(llama, rewrite=_shift_by_two)
    trainer = spilling(model, tokenizer, tmp_path, qa_data, pad_batch)
    with pytest.raises(LabelCaptureError, match=r"do not reproduce the model's own loss.*label_fn="):
        trainer.evaluate()
    # the opt-in exists for models whose loss differs for another reason; label_fn gives the right labels
    fixed = spilling(model, tokenizer, tmp_path / "fixed", qa_data, pad_batch,
                     label_fn=lambda inputs, outputs: _shift_by_two(inputs["labels"]))
    metrics = fixed.evaluate()
    pairs = forward_pairs(model, batches_of(qa_data, pad_batch), labels_of=lambda b: _shift_by_two(b["labels"]))
    expected = brute_force(pairs, tokenizer, shift=True)
    assert_metrics_equal(metrics, expected)
    assert_spill_rows(fixed.last_spill_dir, expected)


def test_one_feature_per_image_left_repadding_is_an_error(tokenizer, tmp_path):
    """A LLaVA-style model with one feature per image (so no length change) and left re-padding, hand-written loss:
    the logits have the raw labels' shape, the rows are shifted for every shorter sample."""
    base = type(tiny_llava(8, image_token_id=4))

    class OneFeatureLlava(base):
        def forward(self, input_ids=None, attention_mask=None, labels=None, images=None, num_image_features=None):
            _, positions, mask, _, embeds, new_labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, None, labels, images, num_image_features, padding_side="left")
            logits = super().forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), new_labels[:, 1:].reshape(-1))
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    template = tiny_llava(len(tokenizer), image_token_id=image_token)
    model = OneFeatureLlava(template.config)
    model.load_state_dict(template.state_dict())
    data = multimodal_qa_dataset(12, tokenizer, max_features=1, seed=25)
    fit(model, [pad_multimodal_batch(data[i : i + 6]) for i in range(0, 12, 6)], steps=30)
    with torch.no_grad():
        logits = model(**pad_multimodal_batch(data[:EVAL_BATCH])).logits
    assert logits.shape[:2] == pad_multimodal_batch(data[:EVAL_BATCH])["labels"].shape  # the trap: same shape
    trainer = spilling(model, tokenizer, tmp_path, data, pad_multimodal_batch)
    with pytest.raises(LabelCaptureError, match="do not reproduce the model's own loss"):
        trainer.evaluate()


# ----------------------------------------------------------------------------------------------- compute_metrics closures
def run_clm_closures():
    """transformers' examples/pytorch/language-modeling/run_clm.py: argmax on the device, shift in the closure."""

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds.predictions, eval_preds.label_ids
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        mask = labels != -100
        return {"accuracy": float((preds[mask] == labels[mask]).mean())}

    return compute_metrics, preprocess_logits_for_metrics


class Recorder:
    """A compute_metrics closure that records what it was given (`compute_result` is passed on when given)."""

    def __init__(self, closure: Callable[..., Any]) -> None:
        self.closure, self.calls = closure, []

    def __call__(self, eval_pred, compute_result=None):
        self.calls.append(copy.deepcopy((eval_pred.predictions, eval_pred.label_ids, eval_pred.inputs,
                                         eval_pred.losses)))
        if compute_result is None:
            return self.closure(eval_pred)
        return self.closure(eval_pred, compute_result=compute_result)


def assert_same_arrays(a: Any, b: Any, *, rtol: float = 0.0) -> None:
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_arrays(x, y, rtol=rtol)
    elif a is None:
        assert b is None
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def assert_same_eval_pred(ours: tuple, theirs: tuple) -> None:
    """predictions, label_ids and inputs to the bit; losses to float32 rounding: spilleval's fused loss sums the
    same per-token values as transformers' cross_entropy, in another order."""
    assert_same_arrays(ours[:3], theirs[:3])
    assert_same_arrays(ours[3], theirs[3], rtol=1e-6)


@pytest.mark.parametrize("settings", [
    {},
    {"eval_do_concat_batches": False},
    {"include_for_metrics": ["inputs", "loss"]},
], ids=["default", "no_concat", "inputs_and_loss"])
def test_classic_closure_gets_exactly_what_plain_trainer_gives_it(llama, qa_data, tokenizer, tmp_path, settings):
    compute_metrics, preprocess = run_clm_closures()
    if settings.get("eval_do_concat_batches") is False:  # lists of per-batch arrays: count the right tokens
        def compute_metrics(eval_preds):
            pairs = [(p[:, :-1], lab[:, 1:]) for p, lab in zip(eval_preds.predictions, eval_preds.label_ids)]
            right = sum(int((p == lab)[lab != -100].sum()) for p, lab in pairs)
            return {"accuracy": right / sum(int((lab != -100).sum()) for _, lab in pairs)}
    plain_rec, spill_rec = Recorder(compute_metrics), Recorder(compute_metrics)
    plain = Trainer(model=llama, args=make_args(tmp_path, **settings), eval_dataset=qa_data, data_collator=pad_batch,
                    compute_metrics=plain_rec, preprocess_logits_for_metrics=preprocess).evaluate()
    trainer = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, args=settings, compute_metrics=spill_rec,
                       preprocess_logits_for_metrics=preprocess)
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == plain["eval_accuracy"] == metrics["eval_token_accuracy"]
    assert 0.1 < metrics["eval_accuracy"] < 0.95
    assert_same_eval_pred(spill_rec.calls[-1], plain_rec.calls[-1])


def test_classic_closure_without_preprocess_gets_argmax_ids_and_a_clear_error_if_it_wants_logits(
        llama, qa_data, tokenizer, tmp_path):
    compute_metrics, preprocess = run_clm_closures()
    plain_rec, spill_rec = Recorder(compute_metrics), Recorder(compute_metrics)
    Trainer(model=llama, args=make_args(tmp_path), eval_dataset=qa_data, data_collator=pad_batch,
            compute_metrics=plain_rec, preprocess_logits_for_metrics=preprocess).evaluate()
    metrics = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, compute_metrics=spill_rec).evaluate()
    assert_same_eval_pred(spill_rec.calls[-1], plain_rec.calls[-1])  # ids stand in for the logits, same layout
    assert metrics["eval_accuracy"] == metrics["eval_token_accuracy"]

    def llava_script_closure(eval_pred):  # written for logits
        logits, labels = eval_pred
        if isinstance(logits, tuple):
            logits = logits[0]
        preds = np.argmax(logits, axis=-1)
        preds, labels = preds[:, :-1], labels[:, 1:]
        return {"accuracy": float((preds == labels)[labels != -100].mean())}

    trainer = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, compute_metrics=llava_script_closure)
    with pytest.raises(ComputeMetricsError, match=r"IndexError.*int64 \[22, \d+\].*never keeps logits.*np\.argmax"):
        trainer.evaluate()


def test_classic_closure_on_a_model_that_rewrites_its_labels_gets_the_aligned_labels(tokenizer, tmp_path):
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    data = multimodal_qa_dataset(14, tokenizer, seed=26)
    fit(model, [pad_multimodal_batch(data[i : i + 7]) for i in range(0, 14, 7)], steps=40)
    compute_metrics, preprocess = run_clm_closures()
    recorder = Recorder(compute_metrics)
    trainer = spilling(model, tokenizer, tmp_path, data, pad_multimodal_batch, compute_metrics=recorder,
                       preprocess_logits_for_metrics=preprocess)
    metrics = trainer.evaluate()
    pairs = forward_pairs(model, batches_of(data, pad_multimodal_batch), labels_of=lambda b: llava_labels(model, b))
    check_exact(metrics, trainer.last_spill_dir, pairs, tokenizer)
    assert metrics["eval_accuracy"] == metrics["eval_token_accuracy"]
    preds, labels, _, _ = recorder.calls[-1]
    width = max(lab.shape[1] for _, lab in pairs)
    expected_labels = np.concatenate([F.pad(lab, (0, width - lab.shape[1]), value=-100).numpy() for _, lab in pairs])
    np.testing.assert_array_equal(labels, expected_labels)  # the model's own processed labels, padded as Trainer


def llava_labels(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The labels the LLaVA-style model's own preparation produces for a batch (the ones its loss uses)."""
    with torch.no_grad():
        return model.prepare_inputs_labels_for_multimodal(
            batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
            batch["num_image_features"])[5]


def test_batch_eval_metrics_closure_gets_what_plain_trainer_gives_it(llama, qa_data, tokenizer, tmp_path):
    _, preprocess = run_clm_closures()

    def accumulate(eval_pred, compute_result=False):
        state = accumulate.__dict__.setdefault("state", [0, 0])
        preds, labels = eval_pred.predictions[:, :-1], eval_pred.label_ids[:, 1:]
        mask = labels != -100
        state[0] += int((preds == labels)[mask].sum())
        state[1] += int(mask.sum())
        if compute_result:
            result, accumulate.state = {"accuracy": state[0] / state[1]}, [0, 0]
            return result
        return None

    args = {"batch_eval_metrics": True}
    plain_rec, spill_rec = Recorder(accumulate), Recorder(accumulate)
    plain = Trainer(model=llama, args=make_args(tmp_path, **args), eval_dataset=qa_data, data_collator=pad_batch,
                    compute_metrics=plain_rec, preprocess_logits_for_metrics=preprocess).evaluate()
    metrics = spilling(llama, tokenizer, tmp_path, qa_data, pad_batch, args=args, compute_metrics=spill_rec,
                       preprocess_logits_for_metrics=preprocess).evaluate()
    assert metrics["eval_accuracy"] == plain["eval_accuracy"] == metrics["eval_token_accuracy"]
    assert len(spill_rec.calls) == len(plain_rec.calls) == math.ceil(len(qa_data) / EVAL_BATCH)
    for ours, theirs in zip(spill_rec.calls, plain_rec.calls):
        assert_same_arrays(ours[:2], tuple(np.asarray(t) for t in theirs[:2]))


# ----------------------------------------------------------------------------------------------- other models
def test_peft_lora_is_exact(llama, qa_data, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fit(model, batches_of(qa_data[:8], pad_batch, 8), steps=5)  # the adapter moves the predictions a little
    # transformers < 4.49 finds no label names on a PEFT model (and then reports no eval_loss): name them
    trainer = spilling(model, tokenizer, tmp_path, qa_data, pad_batch, args={"label_names": ["labels"]})
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(qa_data, pad_batch)), tokenizer)


def test_bf16_evaluation_is_exact(llama, qa_data, tokenizer, tmp_path):
    model = copy.deepcopy(llama)  # bf16_full_eval casts the model in place
    trainer = spilling(model, tokenizer, tmp_path, qa_data, pad_batch, args={"bf16_full_eval": True})
    metrics = trainer.evaluate()
    assert next(model.parameters()).dtype == torch.bfloat16
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(qa_data, pad_batch)), tokenizer)


def _hf_llava(tokenizer) -> tuple[LlavaForConditionalGeneration, int]:
    """transformers' own LLaVA, tiny: a CLIP tower over 8x8 images (4 patches = 4 image tokens) and a Llama."""
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(8)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=8, patch_size=4),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=0),
        image_token_index=image_token, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=4,
    )
    return LlavaForConditionalGeneration(config), image_token


def test_transformers_llava_is_exact(tokenizer, tmp_path):
    model, image_token = _hf_llava(tokenizer)

    def item(example, seed):
        qa = encode_qa(example, tokenizer)  # the processor's job: the placeholder expanded to 4 image tokens
        qa["input_ids"] = [qa["input_ids"][0]] + [image_token] * 4 + qa["input_ids"][1:]
        qa["labels"] = [-100] * 5 + qa["labels"][1:]
        qa["pixel_values"] = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(seed))
        return qa

    def collate(items):
        batch = pad_batch([{k: v for k, v in it.items() if k != "pixel_values"} for it in items])
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        return batch

    train = [item(ex, i) for i, ex in enumerate(qa_examples(48, seed=27))]
    fit(model, batches_of(train, collate, 8), steps=50)
    data = [item(ex, 1000 + i) for i, ex in enumerate(qa_examples(22, seed=28))]
    trainer = spilling(model, tokenizer, tmp_path, data, collate)
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(data, collate)), tokenizer)


def _qwen2_vl_config(qwen: Any, vocab: int, image_token: int) -> Any:
    """A tiny Qwen2-VL config; transformers >= 4.53 nests the language model under text_config."""
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 2,
            "eos_token_id": 3}
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
              "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3}
    tokens = {"image_token_id": image_token, "video_token_id": 1, "vision_start_token_id": 2,
              "vision_end_token_id": 3}
    if "text_config" in inspect.signature(qwen.Qwen2VLConfig.__init__).parameters:
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4}
        return qwen.Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=2, eos_token_id=3, **tokens)
    return qwen.Qwen2VLConfig(**text, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                              vision_config=vision, **tokens)


def test_qwen2_vl_is_exact(tokenizer, tmp_path):
    qwen = pytest.importorskip("transformers.models.qwen2_vl")
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(9)
    config = _qwen2_vl_config(qwen, len(tokenizer), image_token)
    model = qwen.Qwen2VLForConditionalGeneration(config)

    def item(example, seed):  # a 2x2 grid of patches merges into one image token
        qa = encode_qa(example, tokenizer)
        qa["input_ids"] = [qa["input_ids"][0], image_token] + qa["input_ids"][1:]
        qa["labels"] = [-100, -100] + qa["labels"][1:]
        qa["pixel_values"] = torch.randn(4, 24, generator=torch.Generator().manual_seed(seed))
        return qa

    takes_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters  # transformers >= 5

    def collate(items):
        batch = pad_batch([{k: v for k, v in it.items() if k != "pixel_values"} for it in items])
        if takes_token_types:
            batch["mm_token_type_ids"] = (batch["input_ids"] == image_token).long()
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])  # patches of all images
        batch["image_grid_thw"] = torch.tensor([[1, 2, 2]] * len(items))
        return batch

    train = [item(ex, i) for i, ex in enumerate(qa_examples(48, seed=29))]
    fit(model, batches_of(train, collate, 8), steps=50)
    data = [item(ex, 1000 + i) for i, ex in enumerate(qa_examples(22, seed=30))]
    trainer = spilling(model, tokenizer, tmp_path, data, collate)
    metrics = trainer.evaluate()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(data, collate)), tokenizer)


@pytest.mark.slow
def test_load_best_model_at_end_then_evaluate_is_exact(tokenizer, qa_data, tmp_path):
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(48, seed=31)]
    model = tiny_llama(len(tokenizer), seed=8)
    args = {"eval_strategy": "steps", "eval_steps": 4, "save_strategy": "steps", "save_steps": 4, "max_steps": 16,
            "learning_rate": 1e-2, "per_device_train_batch_size": 8, "load_best_model_at_end": True,
            "metric_for_best_model": "token_accuracy", "greater_is_better": True}
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path, **args), train_dataset=train,
                              eval_dataset=qa_data, data_collator=pad_batch, processing_class=tokenizer,
                              metrics=METRICS)
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_token_accuracy"] == trainer.state.best_metric
    model.eval()
    check_exact(metrics, trainer.last_spill_dir, forward_pairs(model, batches_of(qa_data, pad_batch)), tokenizer)
