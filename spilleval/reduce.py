"""Stage 2 of the data path: turn a batch of logits into token ids on the logits' own device.

Nothing of size V (the vocabulary) leaves the device. argmax runs in the logits' dtype (bf16/fp16 included);
the optional per-token label log-probability is computed in sequence chunks so that the float32 temporary is
bounded by `chunk_bytes`, never a float32 copy of the whole B x T x V tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch import IGNORE_INDEX, SampleBatch, id_dtype_for_vocab

DEFAULT_CHUNK_BYTES = 256 * 2**20


class NonFiniteLogitsError(ValueError):
    """Logits contain NaN or Inf; evaluating them would silently give wrong metrics."""


@dataclass
class ReducedBatch:
    """The reduced form of one batch, still on the logits' device. `to_host()` gives a `SampleBatch`."""

    sample_index: torch.Tensor  # int64 [B]
    offsets: torch.Tensor  # int64 [B+1]
    pred_ids: torch.Tensor  # int32 [N], only supervised positions
    label_ids: torch.Tensor  # int32 [N]
    vocab_size: int
    label_logprob: torch.Tensor | None = None  # float32 [N]
    loss_sum: torch.Tensor | None = None  # float64 scalar: -sum(label_logprob), for the eval loss

    def __len__(self) -> int:
        return int(self.sample_index.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.pred_ids.numel())

    def to_host(self) -> SampleBatch:
        """Copy to host numpy arrays, ids narrowed to uint16 when the vocabulary allows."""
        return self.start_host_copy().wait()

    def start_host_copy(self) -> "PendingHostCopy":
        """Start a non-blocking device-to-host copy; `.wait()` on the result yields the `SampleBatch`.

        On CUDA the copies go into pinned buffers behind an event, so the caller (the GPU loop) does not stall;
        the consumer thread waits on the event instead.
        """
        tensors = {
            "sample_index": self.sample_index,
            "offsets": self.offsets,
            "pred_ids": self.pred_ids,
            "label_ids": self.label_ids,
        }
        if self.label_logprob is not None:
            tensors["label_logprob"] = self.label_logprob
        if self.pred_ids.device.type == "cuda":
            host = {k: _pinned_copy(v) for k, v in tensors.items()}
            event = torch.cuda.Event()
            event.record()
            return PendingHostCopy(host, self.vocab_size, event)
        return PendingHostCopy({k: v.detach().cpu() for k, v in tensors.items()}, self.vocab_size, None)


@dataclass
class PendingHostCopy:
    tensors: dict[str, torch.Tensor]
    vocab_size: int
    event: "torch.cuda.Event | None"

    def wait(self) -> SampleBatch:
        if self.event is not None:
            self.event.synchronize()
        t = self.tensors
        dtype = id_dtype_for_vocab(self.vocab_size)
        logprob = t.get("label_logprob")
        return SampleBatch(
            sample_index=t["sample_index"].numpy().astype(np.int64, copy=False),
            offsets=t["offsets"].numpy().astype(np.int64, copy=False),
            pred_ids=t["pred_ids"].numpy().astype(dtype),
            label_ids=t["label_ids"].numpy().astype(dtype),
            label_logprob=None if logprob is None else logprob.numpy().astype(np.float32, copy=True),
        )


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor.detach(), non_blocking=True)
    return out


def reduce_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    sample_index: torch.Tensor | np.ndarray | list[int] | None = None,
    keep_logprob: bool = False,
    check_finite: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    vocab_size: int | None = None,
) -> ReducedBatch:
    """Reduce `logits [B, T, V]` and aligned `labels [B, T]` to the supervised positions' ids.

    shift=True is the causal-LM convention (`logits[:, :-1]` predicts `labels[:, 1:]`); shift=False is for
    seq2seq models whose decoder logits already line up with the labels. Positions labelled -100 are dropped.
    `sample_index` maps rows to dataset rows (defaults to 0..B-1). With `keep_logprob`, the log-probability of
    each label token is kept (float32), computed chunk by chunk; `loss_sum` is then set too.
    """
    _check_shapes(logits, labels)
    batch_size = logits.shape[0]
    vocab = int(vocab_size or logits.shape[-1])
    labels = labels.to(logits.device)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    _check_label_range(labels, mask, vocab)

    per_token_bytes = logits.shape[-1] * (4 if keep_logprob else logits.element_size())
    step = max(1, chunk_bytes // max(1, batch_size * per_token_bytes))
    preds, logprobs, nonfinite = [], [], []
    for start in range(0, logits.shape[1], step):
        chunk = logits[:, start : start + step]
        top, argmax = chunk.max(dim=-1)  # one pass: NaN and +Inf propagate into `top`; -Inf masking is legal
        preds.append(argmax)
        if check_finite:
            nonfinite.append(~torch.isfinite(top))
        if keep_logprob:
            logprobs.append(_label_logprob(chunk, labels[:, start : start + step]))
    pred_full = torch.cat(preds, dim=1) if preds else labels.new_zeros(labels.shape)

    index = _as_index_tensor(sample_index, batch_size, logits.device)
    if check_finite and nonfinite:
        _raise_if_nonfinite(torch.cat(nonfinite, dim=1) & mask, index)

    lengths = mask.sum(dim=1)
    offsets = torch.zeros(batch_size + 1, dtype=torch.int64, device=logits.device)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    reduced = ReducedBatch(
        sample_index=index,
        offsets=offsets,
        pred_ids=pred_full[mask].to(torch.int32),
        label_ids=labels[mask].to(torch.int32),
        vocab_size=vocab,
    )
    if keep_logprob:
        lp_full = torch.cat(logprobs, dim=1) if logprobs else labels.new_zeros(labels.shape, dtype=torch.float32)
        reduced.label_logprob = lp_full[mask]
        reduced.loss_sum = -reduced.label_logprob.double().sum()
    return reduced


def _label_logprob(chunk: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) for one sequence chunk, in float32. The chunk's float32 copy is the bounded temporary."""
    chunk32 = chunk.float()
    safe = labels.clamp(min=0).unsqueeze(-1)
    return chunk32.gather(-1, safe).squeeze(-1) - torch.logsumexp(chunk32, dim=-1)


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not line up with logits {tuple(logits.shape)}: expected labels of "
            f"shape {tuple(logits.shape[:2])}. If the model rewrites labels inside forward (e.g. expands image "
            "placeholders), pass the labels the loss saw (spilleval.capture or label_fn=...)."
        )
    if logits.is_floating_point() is False:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_label_range(labels: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    if not bool(mask.any()):
        return
    supervised = labels[mask]
    lo, hi = int(supervised.min()), int(supervised.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"label id out of range [0, {vocab}): found {lo if lo < 0 else hi}. Labels must be token ids or "
            f"{IGNORE_INDEX} (ignored); check the padding value of your collator."
        )


def _as_index_tensor(sample_index, batch_size: int, device: torch.device) -> torch.Tensor:
    if sample_index is None:
        return torch.arange(batch_size, dtype=torch.int64, device=device)
    index = torch.as_tensor(np.asarray(sample_index) if isinstance(sample_index, list) else sample_index)
    index = index.to(device=device, dtype=torch.int64).reshape(-1)
    if index.numel() != batch_size:
        raise ValueError(f"sample_index has {index.numel()} entries for a batch of {batch_size}")
    return index


def _raise_if_nonfinite(bad: torch.Tensor, index: torch.Tensor) -> None:
    rows = bad.any(dim=1)
    if bool(rows.any()):
        samples = index[rows].tolist()
        shown = ", ".join(map(str, samples[:10])) + (" ..." if len(samples) > 10 else "")
        raise NonFiniteLogitsError(
            f"logits contain NaN/Inf at supervised positions of sample(s) {shown}. "
            "Check the model's numerics (e.g. fp16 overflow: evaluate in bf16 or fp32)."
        )
