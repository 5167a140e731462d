"""Label capture: the labels the loss saw, the order of the sources, the fused chunked loss, clean uninstall."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from spilleval.capture import (
    AlignedLabels,
    LabelCaptureError,
    LossCall,
    LossCapture,
    find_logits,
    merge_replica_calls,
    resolve_labels,
)
from spilleval.reduce import reduce_logits
from spilleval.testing import (
    IMAGE_TOKEN,
    encode_qa,
    multimodal_qa_dataset,
    pad_batch,
    pad_multimodal_batch,
    qa_examples,
    tiny_llama,
    tiny_llava,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run ~100x slower when torch threads oversubscribe the CI's two cores (pytest -n 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return pad_batch([encode_qa(ex, tokenizer) for ex in qa_examples(6, seed=3)])


def _loss(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 17])
def test_fused_loss_equals_the_models_own_loss(tokenizer, batch, dtype, num_items):
    model = tiny_llama(len(tokenizer), seed=1).to(dtype).eval()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected = _loss(model, batch, **kwargs)
    # a tiny chunk budget forces many sequence chunks through the chunked log-softmax
    with LossCapture(model, chunk_bytes=3 * len(tokenizer) * 4) as capture:
        capture.start_batch(torch.arange(10, 16))
        fused = _loss(model, batch, **kwargs)
    call = capture.batch_call()
    assert call is not None and call.reduced is not None and call.shift and not call.preshifted
    assert fused.loss.dtype == torch.float32
    assert fused.loss.item() == pytest.approx(expected.loss.float().item(), rel=1e-5, abs=1e-6)
    assert torch.equal(fused.logits, expected.logits)
    reference = reduce_logits(expected.logits, batch["labels"], sample_index=torch.arange(10, 16)).to_host()
    fused_host = call.reduced.to_host()
    np.testing.assert_array_equal(fused_host.pred_ids, reference.pred_ids)
    np.testing.assert_array_equal(fused_host.label_ids, reference.label_ids)
    assert call.reduced.sample_index.tolist() == list(range(10, 16))
    assert call.reduced.label_logprob is None  # dropped unless keep_logprob


def test_uninstall_restores_the_models_loss_function(tokenizer, tiny_model):
    before = tiny_model.loss_function
    with LossCapture(tiny_model):
        assert tiny_model.loss_function is not before
    assert tiny_model.loss_function is before
    assert "_loss_function" not in tiny_model.__dict__


@pytest.mark.skipif(
    not hasattr(inspect.getattr_static(PreTrainedModel, "loss_function", None), "fset")
    or inspect.getattr_static(PreTrainedModel, "loss_function").fset is None,
    reason="transformers < 4.49 has no loss_function setter, so no user can set one (the read-only property path "
           "is what every other capture test exercises there)",
)
def test_user_set_loss_function_is_captured_not_fused_and_restored(tokenizer, batch):
    model = tiny_llama(len(tokenizer), seed=2).eval()
    seen = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        seen.append(labels)
        return logits.float().mean() * 0

    model.loss_function = my_loss
    with LossCapture(model) as capture:
        capture.start_batch()
        out = _loss(model, batch)
    assert out.loss.item() == 0.0 and len(seen) == 1  # the user's loss ran
    call = capture.batch_call()
    assert call is not None and call.reduced is None and torch.equal(call.labels, batch["labels"])
    assert model.loss_function is my_loss


def test_no_fusion_while_gradients_are_enabled(tokenizer, batch):
    model = tiny_llama(len(tokenizer), seed=2)
    with LossCapture(model) as capture:
        capture.start_batch()
        out = model(**batch)
    assert out.loss.requires_grad
    assert capture.batch_call().reduced is None


def test_preshifted_shift_labels_are_detected(tokenizer, batch, tiny_model):
    logits = torch.randn(*batch["labels"].shape, len(tokenizer))
    shift_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    with torch.no_grad(), LossCapture(tiny_model) as capture:
        capture.start_batch()
        loss = tiny_model.loss_function(logits=logits, labels=None, vocab_size=len(tokenizer),
                                        shift_labels=shift_labels)
    call = capture.batch_call()
    assert not call.shift and call.preshifted
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    aligned = call.aligned()
    unshifted = aligned.unshifted()
    assert torch.equal(unshifted[:, 1:], batch["labels"][:, 1:]) and (unshifted[:, 0] == -100).all()
    # the same tokens are evaluated either way
    a = reduce_logits(logits, shift_labels, shift=False).to_host()
    b = reduce_logits(logits, batch["labels"], shift=True).to_host()
    np.testing.assert_array_equal(a.pred_ids, b.pred_ids)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)


def test_read_only_loss_function_property_is_shadowed_and_restored():
    class Old(torch.nn.Module):  # transformers 4.46/4.47: loss_function had no setter
        @property
        def loss_function(self):
            return lambda logits, labels, vocab_size, **kw: torch.tensor(1.0)

    module = Old()
    with LossCapture(module) as capture:
        capture.start_batch()
        assert type(module) is not Old and isinstance(module, Old)
        module.loss_function(logits=torch.zeros(1, 2, 3), labels=torch.zeros(1, 2, dtype=torch.long), vocab_size=3)
    assert type(module) is Old
    assert capture.batch_call() is not None


# ------------------------------------------------------------------------------------------- resolution order
def _outputs(logits, labels=None):
    out = CausalLMOutputWithPast(logits=logits)
    if labels is not None:
        out["labels"] = labels
    return out


def test_resolution_order():
    logits = torch.zeros(2, 5, 7)
    mine = torch.full((2, 5), 1)
    loss_labels = torch.full((2, 5), 2)
    raw = torch.full((2, 5), 3)
    call = _call(loss_labels)
    fn = lambda inputs, outputs: torch.full((2, 5), 4)  # noqa: E731
    pick = lambda **kw: resolve_labels(logits=logits, inputs={"labels": raw}, **kw)  # noqa: E731
    assert pick(outputs=_outputs(logits, mine), loss_call=call, label_fn=fn).source == "outputs.labels"
    assert pick(outputs=_outputs(logits), loss_call=call, label_fn=fn).source == "loss_function"
    assert pick(outputs=_outputs(logits), loss_call=None, label_fn=fn).source == "label_fn"
    took = pick(outputs=_outputs(logits), loss_call=None, trainer_loss_took_labels=True)
    assert took.source == "trainer loss" and took.verify_with is None  # the trainer's own loss saw them
    with_loss = _outputs(logits)
    with_loss["loss"] = torch.tensor(1.5)
    chosen = pick(outputs=with_loss, loss_call=None)
    assert chosen.source == "batch labels" and torch.equal(chosen.labels, raw)
    assert chosen.verify_with is not None and float(chosen.verify_with) == 1.5  # checked against the model's loss
    with pytest.raises(LabelCaptureError, match="no loss to check them against.*trust_batch_labels=True"):
        pick(outputs=_outputs(logits), loss_call=None)  # nothing can verify them
    trusted = pick(outputs=_outputs(logits), loss_call=None, trust_batch_labels=True)
    assert trusted.source == "batch labels" and trusted.verify_with is None


def _call(labels):
    from spilleval.capture import LossCall

    return LossCall(labels, shift=True, preshifted=False)


def test_unrecoverable_labels_raise_a_clear_error():
    logits = torch.zeros(2, 9, 7)
    with pytest.raises(LabelCaptureError) as err:
        resolve_labels(_outputs(logits), logits, {"labels": torch.zeros(2, 6, dtype=torch.long)}, loss_call=None)
    message = str(err.value)
    assert "(2, 6)" in message and "(2, 9, 7)" in message and "(2, 9)" in message
    assert "label_fn" in message and "loss_function" in message


def test_wrong_shape_from_a_source_is_an_error_too():
    logits = torch.zeros(2, 9, 7)
    with pytest.raises(LabelCaptureError, match=r"label_fn have shape \(2, 4\)"):
        resolve_labels(_outputs(logits), logits, {}, loss_call=None, label_fn=lambda i, o: torch.zeros(2, 4))


def test_several_loss_calls_are_ambiguous(tokenizer, batch, tiny_model):
    logits = torch.zeros(*batch["labels"].shape, len(tokenizer))
    with torch.no_grad(), LossCapture(tiny_model) as capture:
        capture.start_batch()
        for _ in range(2):
            tiny_model.loss_function(logits=logits, labels=batch["labels"], vocab_size=len(tokenizer))
    assert capture.batch_call() is None and capture.num_calls == 2
    wide = torch.zeros(6, 40, len(tokenizer))
    with pytest.raises(LabelCaptureError, match="2 times"):
        resolve_labels(_outputs(wide), wide, batch, loss_call=None, loss_calls=2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_llava_style_model_labels_are_captured_from_its_loss(tokenizer, side):
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       padding_side=side).eval()
    batch = pad_multimodal_batch(multimodal_qa_dataset(5, tokenizer, seed=4), side=side)
    expected = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
        batch["num_image_features"])[5]
    with torch.no_grad(), LossCapture(model) as capture:
        capture.start_batch()
        outputs = model(**batch)
    logits = find_logits(outputs)
    assert logits.shape[1] > batch["labels"].shape[1]  # expanded: raw labels cannot line up
    aligned = resolve_labels(outputs, logits, batch, loss_call=capture.batch_call())
    assert isinstance(aligned, AlignedLabels) and aligned.source == "loss_function"
    assert torch.equal(aligned.labels, expected)


def test_data_parallel_replica_calls_are_put_back_in_scatter_order(tokenizer):
    """nn.DataParallel scatters a batch over device_ids and each replica calls the loss on its share, from a thread
    of its own, in any order: the merged call is the batch in scatter order (its rows, labels and reductions)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 9, 31, generator=gen)
    labels = torch.randint(0, 31, (7, 9), generator=gen)
    labels[torch.rand(7, 9, generator=gen) < 0.3] = -100
    index = torch.tensor([40, 41, 42, 43, 44, 45, 46])
    shares = [(3, slice(0, 3)), (1, slice(3, 6)), (2, slice(6, 7))]  # device_ids [3, 1, 2]: the scatter order
    calls = []
    for device, rows in reversed(shares):  # the threads finish in another order
        reduced = reduce_logits(logits[rows], labels[rows], shift=True, keep_logprob=True)
        calls.append(LossCall(labels[rows], shift=True, preshifted=False, reduced=reduced, replica=device))
    merged = merge_replica_calls(calls, [3, 1, 2], index)
    whole = reduce_logits(logits, labels, shift=True, keep_logprob=True, sample_index=index).to_host()
    assert torch.equal(merged.labels, labels)
    got = merged.reduced.to_host()
    np.testing.assert_array_equal(got.sample_index, index.numpy())
    np.testing.assert_array_equal(got.pred_ids, whole.pred_ids)
    np.testing.assert_array_equal(got.label_logprob, whole.label_logprob)
    assert float(merged.reduced.loss_sum) == pytest.approx(float(reduce_logits(
        logits, labels, shift=True, keep_logprob=True).loss_sum), rel=1e-12)
    # not one call per replica of this batch: ambiguous, nothing is trusted
    assert merge_replica_calls(calls[:2], [3, 1, 2], index) is None  # rows missing
    assert merge_replica_calls(calls + calls[:1], [3, 1, 2], index) is None  # a replica called twice
    assert merge_replica_calls(calls, [0, 1], index) is None  # a call from a device DataParallel did not use
