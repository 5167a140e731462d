"""One pass over each logits row on CUDA: the argmax, the logsumexp and the label's log-probability together.

`reduce_logits` with log-probabilities otherwise reads every row twice (an argmax, then a float32 log-softmax
written out whole and gathered from), which made the eval loss cost ~5 % of a bare forward on an H200. This Triton
kernel reads each bf16/fp16/fp32 row once, keeping per lane a running maximum, its first index and a sum of
exponentials rescaled to that maximum (one `exp` per element), and writes three numbers per position.

What each position gets, matching the reference path (`torch.argmax`, `log_softmax` in float32):
- argmax: the first index of the maximum; in a row holding NaN, the first NaN (as `torch.argmax`); 0 in a row of -inf.
- label log-probability: `(logit[label] - max) - log(sum(exp(logits - max)))` in float32, within 1e-5 of
  `cross_entropy`; NaN when the row's maximum is not finite (NaN, +Inf, or a row of -inf), as `log_softmax` gives;
  0.0 at positions labelled -100 (they add nothing to the loss). Labels outside [0, V) are clamped for the read, as
  the reference path's gather is; `ReducedBatch.to_host()` reports them.
- nonfinite: the row's maximum is not finite and the position is supervised (what the reference path flags).

The sum's order depends only on the vocabulary size (the block size is a function of it, never autotuned), so a
row's result is the same whatever the batch it comes in. This module imports triton: `reduce.py` imports it only on
CUDA, and falls back to the reference path when triton is missing or the logits do not fit.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_VOCAB = 2**31 - 2**16  # column indices and the NaN sentinel stay within int32


@triton.jit
def _row_reduce_kernel(
    logits_ptr, labels_ptr, argmax_ptr, logprob_ptr, nonfinite_ptr,
    seq_len, vocab,
    stride_b, stride_t, stride_v, label_stride_b, label_stride_t,
    ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // seq_len).to(tl.int64)
    t = (row % seq_len).to(tl.int64)
    base = logits_ptr + b * stride_b + t * stride_t
    lanes = tl.arange(0, BLOCK)
    top = tl.full([BLOCK], float("-inf"), tl.float32)  # each lane's running maximum (NaN never enters it)
    total = tl.zeros([BLOCK], tl.float32)  # each lane's sum of exp(x - top)
    first = tl.zeros([BLOCK], tl.int32)  # each lane's first index of its maximum
    first_nan = tl.zeros([BLOCK], tl.int32) + vocab  # each lane's first NaN, `vocab` if none
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        x = tl.load(base + cols.to(tl.int64) * stride_v, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        bigger = x > top
        # exp(-|x - top|) rescales the sum when x is the new maximum and is x's own term otherwise; a -inf logit
        # adds nothing (its difference to a -inf maximum would be NaN)
        gap = tl.where(x == float("-inf"), float("-inf"), -tl.abs(x - top))
        scale = tl.exp(gap)
        total = tl.where(bigger, total * scale + 1.0, total + scale)
        first = tl.where(bigger, cols, first)
        top = tl.where(bigger, x, top)
        first_nan = tl.minimum(first_nan, tl.where(x != x, cols, vocab))

    row_max = tl.max(top, axis=0)
    argmax = tl.min(tl.where(top == row_max, first, vocab), axis=0)
    nan_at = tl.min(first_nan, axis=0)
    has_nan = nan_at < vocab
    argmax = tl.where(has_nan, nan_at, argmax)
    finite = (row_max > float("-inf")) & (row_max < float("inf")) & (~has_nan)
    shift = tl.where(finite, row_max, 0.0)
    row_sum = tl.sum(total * tl.exp(top - shift), axis=0)

    label = tl.load(labels_ptr + b * label_stride_b + t * label_stride_t).to(tl.int64)
    supervised = label != ignore_index
    safe = tl.minimum(tl.maximum(label, 0), vocab - 1)
    label_logit = tl.load(base + safe * stride_v).to(tl.float32)
    logprob = (label_logit - shift) - tl.log(row_sum)
    logprob = tl.where(finite, logprob, float("nan"))
    tl.store(argmax_ptr + row, argmax)
    tl.store(logprob_ptr + row, tl.where(supervised, logprob, 0.0))
    tl.store(nonfinite_ptr + row, (supervised & (~finite)).to(tl.uint8))


def fits(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these [B, T, V] logits (else the reference path runs)."""
    return logits.dtype in DTYPES and 0 < logits.shape[-1] <= MAX_VOCAB and logits.numel() > 0


def block_size(vocab: int) -> int:
    """Elements per lane sweep: a function of the vocabulary alone, so the summation order is too."""
    return min(4096, triton.next_power_of_2(vocab))


def fused_reduce(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """argmax (int32 [B, T]), label log-probability (float32 [B, T]) and nonfinite (bool [B, T]) of `logits`
    [B, T, V] (any strides) against aligned `labels` [B, T], in one read of the logits; see the module docstring."""
    batch, seq, vocab = logits.shape
    device = logits.device
    argmax = torch.empty((batch, seq), dtype=torch.int32, device=device)
    logprob = torch.empty((batch, seq), dtype=torch.float32, device=device)
    nonfinite = torch.empty((batch, seq), dtype=torch.uint8, device=device)
    block = block_size(vocab)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _row_reduce_kernel[(batch * seq,)](
            logits, labels, argmax, logprob, nonfinite,
            seq, vocab,
            logits.stride(0), logits.stride(1), logits.stride(2), labels.stride(0), labels.stride(1),
            ignore_index,
            BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    return argmax, logprob, nonfinite.view(torch.bool)

