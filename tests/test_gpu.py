"""The GPU path, on a CUDA device (skipped elsewhere: CI has none; run on the GPU machine with the benchmarks).

On a GPU the reduction never makes the host wait: supervised positions are picked out and checked on the host
copy, and the evaluator spills each batch one call later. These tests hold that path to the same exact answers
as the CPU path, and check that its errors still come, clearly and before anything committed is lost.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brute_force import EVAL_BATCH, assert_metrics_equal, assert_spill_rows, brute_force, make_args
from test_trainer import llava_own_labels_and_logits

from spilleval import Evaluator, SpillReader
from spilleval.metrics.answers import AnswerMacroF1
from spilleval.metrics.token import NegativeLogLikelihood, SequenceExactMatch, TokenAccuracy
from spilleval.reduce import FUSED_SWITCH, NonFiniteLogitsError, _reduce_in_chunks, reduce_logits
from spilleval.testing import IMAGE_TOKEN, fit, multimodal_qa_dataset, pad_multimodal_batch, tiny_llava
from spilleval.trainer import SpillingTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 500
# metric objects, not names: a name loads every built-in metric, and with them reference libraries (jiwer,
# rouge-score, pycocoevalcap) that a bare GPU image may lack


def gpu_safe_metrics() -> list:
    return [TokenAccuracy(), SequenceExactMatch(), NegativeLogLikelihood(), AnswerMacroF1()]


def batch_of(rows: np.ndarray, *, seq: int = 33, nan_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(rows[0]))
    logits = torch.randn(len(rows), seq, VOCAB, generator=gen)
    labels = torch.randint(0, VOCAB, (len(rows), seq), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100
    if nan_row is not None:
        logits[nan_row, 5] = float("nan")
        labels[nan_row, 6] = 7  # a supervised position after the NaN logits (causal shift)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_on_gpu_equals_cpu(dtype):
    logits, labels = batch_of(np.arange(4))
    logits = logits.to(dtype)
    cpu = reduce_logits(logits, labels, keep_logprob=True, chunk_bytes=4096).to_host()
    gpu_reduced = reduce_logits(logits.cuda(), labels.cuda(), keep_logprob=True, chunk_bytes=4096)
    gpu = gpu_reduced.to_host()
    np.testing.assert_array_equal(gpu.offsets, cpu.offsets)
    np.testing.assert_array_equal(gpu.pred_ids, cpu.pred_ids)
    np.testing.assert_array_equal(gpu.label_ids, cpu.label_ids)
    np.testing.assert_allclose(gpu.label_logprob, cpu.label_logprob, rtol=1e-5, atol=1e-5)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                  reduction="sum")
    assert float(gpu_reduced.loss_sum) == pytest.approx(float(reference), rel=1e-6)


# ------------------------------------------------------------------------------ the fused kernel (fused_reduce.py)
def hostile_logits(batch: int, seq: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits [batch, seq, vocab] with every case the argmax and the log-sum-exp must get right: ties
    (first index wins), a whole row tied, NaN (first NaN wins), +Inf, a row of -Inf, -Inf in part of a row, and a
    maximum past index 65,535 when the vocabulary allows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen) * 4
    logits[0, 1] = torch.randint(0, 3, (vocab,), generator=gen).float()  # many ties at the maximum
    logits[0, 2] = 1.5  # a whole row tied: index 0
    logits[1, 1, [vocab // 2, vocab // 3]] = float("nan")
    logits[1, 2, [vocab - 1, 1]] = float("inf")
    logits[1, 3] = float("-inf")
    logits[1, 4, : vocab // 2] = float("-inf")
    logits[0, 4, [vocab - 1, vocab - 2]] = 40.0  # a tie at the end of the row
    return logits.to(dtype)


def reference_reduction(logits: torch.Tensor, labels: torch.Tensor):
    """What the reference path of `reduce_logits` gives per position (argmax, log-prob, supervised non-finite)."""
    pred, logprob, nonfinite = _reduce_in_chunks(logits, labels, keep_logprob=True, check_finite=True,
                                                 chunk_bytes=2**20)
    mask = labels != -100
    return pred, logprob.masked_fill(~mask, 0.0), nonfinite & mask


@pytest.mark.parametrize("vocab", [3, 500, 4097, 70_001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_kernel_equals_the_reference_path(dtype, vocab):
    from spilleval.fused_reduce import fused_reduce

    full = hostile_logits(3, 9, vocab, dtype, seed=vocab).cuda()
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, (3, 9), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.25] = -100
    labels[2, 3] = vocab + 4  # out of range: clamped for the read, reported by to_host()
    labels[1, 1:5] = torch.tensor([vocab // 2, 0, 0, vocab - 1])  # the non-finite rows are supervised
    labels = labels.cuda()
    layouts = {
        "contiguous": (full, labels),
        "shifted rows": (full[:, :-1], labels[:, 1:]),
        "sequence-major": (full.transpose(0, 1).contiguous().transpose(0, 1), labels.t().contiguous().t()),
        "strided vocab": (full.transpose(1, 2).contiguous().transpose(1, 2), labels),
    }
    for name, (logits, aligned) in layouts.items():
        pred, logprob, nonfinite = fused_reduce(logits, aligned)
        ref_pred, ref_logprob, ref_nonfinite = reference_reduction(logits, aligned)
        assert torch.equal(pred, ref_pred), name
        assert torch.equal(pred.long(), torch.argmax(logits, dim=-1)), name
        assert torch.equal(nonfinite, ref_nonfinite), name
        torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)
    assert int(pred[1, 1]) == vocab // 3  # the first NaN, not the first column


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reduce_logits_on_gpu_uses_the_fused_kernel_and_the_loss_equals_cross_entropy(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 65, 32_000, generator=gen) * 3).to(dtype).cuda()
    labels = torch.randint(0, 32_000, (4, 65), generator=gen)
    labels[:, :7] = -100
    labels = labels.cuda()
    fused = reduce_logits(logits, labels, keep_logprob=True)
    monkeypatch.setenv(FUSED_SWITCH, "0")
    reference = reduce_logits(logits, labels, keep_logprob=True)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 32_000),
                                                 labels[:, 1:].reshape(-1), reduction="sum")
    assert torch.equal(fused.pred_ids, reference.pred_ids)
    torch.testing.assert_close(fused.label_logprob, reference.label_logprob, rtol=1e-5, atol=1e-5)
    assert float(fused.loss_sum) == pytest.approx(float(expected), rel=1e-6)
    fused_host, reference_host = fused.to_host(), reference.to_host()
    np.testing.assert_array_equal(fused_host.pred_ids, reference_host.pred_ids)
    np.testing.assert_array_equal(fused_host.offsets, reference_host.offsets)


def test_out_of_range_label_on_gpu_is_a_clear_error_and_the_device_survives():
    logits, labels = batch_of(np.arange(3))
    labels[1, 4] = VOCAB + 7
    reduced = reduce_logits(logits.cuda(), labels.cuda(), keep_logprob=True)  # the gather is clamped
    with pytest.raises(ValueError, match=f"label id out of range \\[0, {VOCAB}\\): found {VOCAB + 7}"):
        reduced.to_host()
    torch.cuda.synchronize()  # no device-side assert was triggered
    assert torch.ones(2, device="cuda").sum().item() == 2


def test_evaluator_on_gpu_raises_nan_a_batch_late_and_keeps_what_came_before(tmp_path):
    evaluator = Evaluator(tmp_path / "spill", [TokenAccuracy()], dataset_length=12, chunk_rows=4)
    for start, nan_row in ((0, None), (4, None), (8, 1)):
        rows = np.arange(start, start + 4)
        logits, labels = batch_of(rows, nan_row=nan_row)
        evaluator.update(logits.cuda(), labels.cuda(), sample_index=rows)  # the last one is checked at finalize
    with pytest.raises(NonFiniteLogitsError, match=r"sample\(s\) 9\b"):
        evaluator.finalize()
    reader = SpillReader(tmp_path / "spill", allow_partial=True)
    assert sorted(reader.table()["sample_index"].to_pylist()) == list(range(8))


def test_spilling_trainer_on_gpu_equals_brute_force_on_the_gpu_logits(tokenizer, tmp_path):
    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).cuda()
    data = multimodal_qa_dataset(22, tokenizer, seed=5)

    def collate(items):
        return pad_multimodal_batch(items)

    fit(model, [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in collate(data[i : i + 8]).items()}
                for i in range(0, 22, 8)])
    trainer = SpillingTrainer(model=model, args=make_args(tmp_path, use_cpu=False), eval_dataset=data,
                              data_collator=collate, processing_class=tokenizer,
                              metrics=gpu_safe_metrics())
    metrics = trainer.evaluate()
    cuda_collate = lambda items: {k: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
                                  for k, v in collate(items).items()}
    pairs = [(logits.cpu(), labels.cpu()) for logits, labels in llava_own_labels_and_logits(model, data, cuda_collate)]
    expected = brute_force(pairs, tokenizer, shift=True)
    assert 0.2 < expected["token_accuracy"] < 1.0
    assert_metrics_equal(metrics, expected)
    assert_spill_rows(trainer.last_spill_dir, expected)
    assert len(pairs) == -(-len(data) // EVAL_BATCH)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nn.DataParallel)")
def test_data_parallel_equals_the_model_on_one_gpu(tokenizer, tmp_path):
    """`python train.py` on a machine with several GPUs and no launcher: Trainer wraps the model in nn.DataParallel,
    whose replicas each compute the loss on their share of the batch. The replicas' captured labels and reductions
    are put back in scatter order: every spilled row and metric equals the brute force on one GPU."""
    from spilleval.testing import encode_qa, pad_batch, qa_examples, tiny_llama

    model = tiny_llama(len(tokenizer), seed=3).cuda()
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(37, seed=6)]  # 37: an uneven last batch
    fit(model, [{k: v.cuda() for k, v in pad_batch(data[i : i + 8]).items()} for i in range(0, 32, 8)], steps=40)
    args = make_args(tmp_path, use_cpu=False)
    assert args.n_gpu >= 2  # Trainer will use nn.DataParallel
    trainer = SpillingTrainer(model=model, args=args, eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, metrics=gpu_safe_metrics())
    metrics = trainer.evaluate()
    batch = args.eval_batch_size  # per_device_eval_batch_size x n_gpu
    pairs = []
    with torch.no_grad():
        for start in range(0, len(data), batch):
            inputs = {k: v.cuda() for k, v in pad_batch(data[start : start + batch]).items()}
            pairs.append((model(**inputs).logits.float().cpu(), inputs["labels"].cpu()))
    expected = brute_force(pairs, tokenizer, shift=True)
    assert 0.1 < expected["token_accuracy"] < 0.95
    assert_metrics_equal(metrics, expected)
    assert_spill_rows(trainer.last_spill_dir, expected)
