"""Stage 2 of the data path: turn a batch of logits into token ids on the logits' own device.

Nothing of size V (the vocabulary) leaves the device. argmax runs in the logits' dtype (bf16/fp16 included);
the optional per-token label log-probability is computed in sequence chunks so that its float32 temporaries stay
within `chunk_bytes`, never a float32 copy of the whole B x T x V tensor. On CUDA, with triton, one fused kernel
(`fused_reduce.py`) computes the argmax and the label log-probability in a single read of the logits instead,
with no temporary of size V at all; SPILLEVAL_FUSED_REDUCE=0 switches it off.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .batch import IGNORE_INDEX, SampleBatch, id_dtype_for_vocab

DEFAULT_CHUNK_BYTES = 256 * 2**20
FUSED_SWITCH = "SPILLEVAL_FUSED_REDUCE"  # "0": the reference path on CUDA too


class NonFiniteLogitsError(ValueError):
    """Logits contain NaN or Inf; evaluating them would silently give wrong metrics."""


@dataclass
class DeferredCheck:
    """A check of a batch that needs values computed on the device: `values` travels to the host with the batch,
    and `check(values)` runs there when the copy is done (it may raise, before the batch is spilled). The loop so
    never waits for the GPU to learn that a batch is sound."""

    values: torch.Tensor
    check: Callable[[np.ndarray], None]


@dataclass
class ReducedBatch:
    """One batch reduced on its device, still padded to [B, T]: building it never makes the host wait for the GPU.

    Picking out the supervised positions (a ragged result whose size only the device knows) and checking labels
    and logits happen on a host copy, in `start_host_copy().wait()` or `to_host()`. An evaluation loop can so queue
    the next batch's forward while this one finishes: a host synchronisation per batch measured 1.3 ms of an
    89 ms batch on an H100 (see BENCHMARKS.md).
    """

    sample_index: torch.Tensor  # int64 [B], on the host
    pred_ids: torch.Tensor  # int32 [B, T], argmax at every position
    label_ids: torch.Tensor  # int32 [B, T], -100 where not supervised
    vocab_size: int
    row_nll: torch.Tensor  # float64 [B]: -sum of the row's label log-probs (zeros unless `has_nll`)
    row_tokens: torch.Tensor  # int64 [B]: supervised positions per row
    label_logprob: torch.Tensor | None = None  # float32 [B, T], 0 where not supervised
    nonfinite_rows: torch.Tensor | None = None  # bool [B]: NaN/Inf logits at a supervised position
    checks: list[DeferredCheck] = field(default_factory=list)  # batch-level checks run on the host copy
    has_nll: bool = False  # row_nll was computed: the host batch carries it as `sample_nll` (the exact eval loss)

    def __len__(self) -> int:
        return int(self.sample_index.numel())

    @property
    def loss_sum(self) -> torch.Tensor:
        """-sum of the supervised label log-probabilities (float64, on the device): the loss numerator."""
        return self.row_nll.sum()

    @property
    def token_count(self) -> torch.Tensor:
        """Supervised positions in the batch (int64, on the device): the loss denominator."""
        return self.row_tokens.sum()

    @staticmethod
    def concat(batches: "list[ReducedBatch]", *, device: torch.device) -> "ReducedBatch":
        """Batches of one step (nn.DataParallel's replicas, each on its own device) as one batch on `device`, rows
        in the order given; still without a synchronisation."""

        def joined(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            if any(p is None for p in parts):
                return None
            return torch.cat([p.to(device, non_blocking=True) for p in parts])

        widths = {b.pred_ids.shape[1] for b in batches}
        if len(widths) != 1:
            raise ValueError(f"cannot join reduced batches of different sequence lengths {sorted(widths)}")
        return ReducedBatch(
            sample_index=torch.cat([b.sample_index for b in batches]),
            pred_ids=joined("pred_ids"),
            label_ids=joined("label_ids"),
            vocab_size=batches[0].vocab_size,
            row_nll=joined("row_nll"),
            row_tokens=joined("row_tokens"),
            label_logprob=joined("label_logprob"),
            nonfinite_rows=joined("nonfinite_rows"),
            checks=[check for b in batches for check in b.checks],
            has_nll=all(b.has_nll for b in batches),
        )

    def take_rows(self, rows: np.ndarray) -> "ReducedBatch":
        """Only `rows` (host indices), still on the device and still without a synchronisation."""
        host_rows = torch.as_tensor(rows, dtype=torch.int64)
        device_rows = host_rows.to(self.pred_ids.device, non_blocking=True)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, device_rows)

        return ReducedBatch(
            sample_index=self.sample_index[host_rows],
            pred_ids=pick(self.pred_ids),
            label_ids=pick(self.label_ids),
            vocab_size=self.vocab_size,
            row_nll=pick(self.row_nll),
            row_tokens=pick(self.row_tokens),
            label_logprob=pick(self.label_logprob),
            nonfinite_rows=pick(self.nonfinite_rows),
            checks=self.checks,  # they concern the whole batch the model saw
            has_nll=self.has_nll,
        )

    def to_host(self) -> SampleBatch:
        """The ragged `SampleBatch` of the supervised positions; raises on bad labels or non-finite logits."""
        return self.start_host_copy().wait()

    def start_host_copy(self) -> "PendingHostCopy":
        """Start a non-blocking device-to-host copy; `.wait()` on the result yields the `SampleBatch`.

        On CUDA the copies go into pinned buffers behind an event, so the caller (the GPU loop) does not stall.
        """
        tensors = {"pred_ids": self.pred_ids, "label_ids": self.label_ids, "row_nll": self.row_nll}
        if self.label_logprob is not None:
            tensors["label_logprob"] = self.label_logprob
        if self.nonfinite_rows is not None:
            tensors["nonfinite_rows"] = self.nonfinite_rows
        for i, deferred in enumerate(self.checks):
            tensors[f"check_{i}"] = deferred.values
        checks = [deferred.check for deferred in self.checks]
        sample_index = self.sample_index.detach().cpu()
        if self.pred_ids.device.type == "cuda":
            host = {k: _pinned_copy(v) for k, v in tensors.items()}
            event = torch.cuda.Event()
            event.record()
            return PendingHostCopy(sample_index, host, self.vocab_size, event, checks, self.has_nll)
        host = {k: v.detach().cpu() for k, v in tensors.items()}
        return PendingHostCopy(sample_index, host, self.vocab_size, checks=checks, has_nll=self.has_nll)


@dataclass
class PendingHostCopy:
    """A `ReducedBatch` on its way to the host. `wait()` picks the supervised positions and checks them."""

    sample_index: torch.Tensor
    tensors: dict[str, torch.Tensor]
    vocab_size: int
    event: "torch.cuda.Event | None" = None
    checks: list[Callable[[np.ndarray], None]] = field(default_factory=list)
    has_nll: bool = False

    def wait(self) -> SampleBatch:
        if self.event is not None:
            self.event.synchronize()
        t = {k: v.numpy() for k, v in self.tensors.items()}
        index = self.sample_index.numpy().astype(np.int64, copy=False)
        labels = t["label_ids"]
        mask = labels != IGNORE_INDEX
        _check_label_range(labels[mask], self.vocab_size)
        if "nonfinite_rows" in t:
            _raise_if_nonfinite(t["nonfinite_rows"], index)
        for i, check in enumerate(self.checks):
            check(t[f"check_{i}"])
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=offsets[1:])
        dtype = id_dtype_for_vocab(self.vocab_size)
        logprob = t.get("label_logprob")
        return SampleBatch(
            sample_index=index,
            offsets=offsets,
            pred_ids=t["pred_ids"][mask].astype(dtype),
            label_ids=labels[mask].astype(dtype),
            label_logprob=None if logprob is None else logprob[mask].astype(np.float32, copy=False),
            sample_nll=t["row_nll"].astype(np.float64, copy=False) if self.has_nll else None,
            label_positions=np.nonzero(mask)[1].astype(np.int32),  # row-major: the order of the ids
        )

    @property
    def loss_sum(self) -> float:
        """-sum of the supervised label log-probabilities (valid after `wait()`)."""
        return float(np.sum(self.tensors["row_nll"].numpy(), dtype=np.float64))


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
    """Reduce `logits [B, T, V]` and aligned `labels [B, T]` to argmax ids (and label log-probs), on their device.

    shift=True is the causal-LM convention (`logits[:, :-1]` predicts `labels[:, 1:]`); shift=False is for
    seq2seq models whose decoder logits already line up with the labels. Positions labelled -100 are dropped by
    `to_host()`, which also raises on label ids outside the vocabulary and on NaN/Inf logits at supervised
    positions (naming the samples). `sample_index` maps rows to dataset rows (defaults to 0..B-1). With
    `keep_logprob`, the log-probability of each label token is computed in float32 (0 at positions labelled -100),
    and `loss_sum` with it: chunk by chunk with torch's log-softmax, or on CUDA by the fused kernel.
    """
    _check_shapes(logits, labels)
    batch_size, vocab = logits.shape[0], int(vocab_size or logits.shape[-1])
    index = _as_index_tensor(sample_index, batch_size)
    labels = labels.to(logits.device, non_blocking=True)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    fused = _fused_kernel(logits) if keep_logprob else None
    if fused is not None:  # one read of each row on CUDA (spilleval/fused_reduce.py)
        pred_ids, label_logprob, nonfinite = fused(logits, labels, ignore_index=IGNORE_INDEX)
    else:
        pred_ids, label_logprob, nonfinite = _reduce_in_chunks(
            logits, labels, keep_logprob=keep_logprob, check_finite=check_finite, chunk_bytes=chunk_bytes)
        if label_logprob is not None:
            label_logprob.masked_fill_(~mask, 0.0)
        if nonfinite is not None:
            nonfinite &= mask
    reduced = ReducedBatch(
        sample_index=index,
        pred_ids=pred_ids,
        label_ids=labels.to(torch.int32),
        vocab_size=vocab,
        row_nll=torch.zeros(batch_size, dtype=torch.float64, device=logits.device),
        row_tokens=mask.sum(dim=1),
    )
    if check_finite:
        reduced.nonfinite_rows = nonfinite.any(dim=1)
    if keep_logprob:
        reduced.label_logprob = label_logprob
        reduced.row_nll = -reduced.label_logprob.double().sum(dim=1)
        reduced.has_nll = True
    return reduced


def _reduce_in_chunks(
    logits: torch.Tensor, labels: torch.Tensor, *, keep_logprob: bool, check_finite: bool, chunk_bytes: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The reference path: argmax ids, label log-probs and non-finite maxima per position, sequence chunk by
    sequence chunk, with torch's own kernels (bit for bit `cross_entropy` on the CPU)."""
    # in range for the gather whatever the labels hold: out-of-range ids are reported by to_host(), and a gather
    # out of bounds would be a device-side assert that kills the CUDA context
    safe_labels = labels.clamp(0, logits.shape[-1] - 1)
    batch_size = logits.shape[0]
    per_position_bytes = _logprob_temporary_bytes(logits) if keep_logprob else logits.shape[-1] * logits.element_size()
    step = max(1, chunk_bytes // max(1, batch_size * per_position_bytes))
    preds, logprobs, nonfinite = [], [], []
    for start in range(0, logits.shape[1], step):
        chunk = logits[:, start : start + step]
        top, argmax = chunk.max(dim=-1)  # one pass: NaN and +Inf propagate into `top`; -Inf masking is legal
        preds.append(argmax)
        if check_finite:
            nonfinite.append(~torch.isfinite(top))
        if keep_logprob:
            logprobs.append(_label_logprob(chunk, safe_labels[:, start : start + step]))

    def joined(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts, dim=1).to(dtype) if parts else torch.zeros(labels.shape, dtype=dtype,
                                                                             device=labels.device)

    return (joined(preds, torch.int32), joined(logprobs, torch.float32) if keep_logprob else None,
            joined(nonfinite, torch.bool) if check_finite else None)


def _fused_kernel(logits: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The fused Triton reduction when it applies: CUDA logits it fits, triton importable, and not switched off
    with SPILLEVAL_FUSED_REDUCE=0."""
    if logits.device.type != "cuda" or os.environ.get(FUSED_SWITCH, "1") == "0":
        return None
    module = _fused_module()
    return module.fused_reduce if module is not None and module.fits(logits) else None


@functools.cache
def _fused_module():
    try:
        from . import fused_reduce
    except ImportError:  # no triton (it comes with torch's CUDA wheels on Linux): the reference path
        return None
    return fused_reduce


def _label_logprob(chunk: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) for one sequence chunk, in float32: bit for bit the value `cross_entropy` gives on float32
    logits (it is the same log-softmax), on every device.

    On CUDA, one fused log-softmax kernel beats logsumexp, whose max, subtract, exp, sum and log are separate
    passes: 9.6 -> 4.5 ms per batch of the 1B model in BENCHMARKS.md. On the CPU, `gather - logsumexp` differed
    from `cross_entropy` by one float32 ulp on ~23% of tokens, which moved `nll` and the loss percentiles.
    """
    logprobs = torch.log_softmax(chunk, dim=-1, dtype=torch.float32)
    return logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _logprob_temporary_bytes(logits: torch.Tensor) -> int:
    """Float32 temporaries per position that `_label_logprob` makes: the log-softmax output, and the float32 copy
    of a strided or lower-precision chunk."""
    return 2 * 4 * logits.shape[-1]


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


def _check_label_range(supervised: np.ndarray, vocab: int) -> None:
    if supervised.size == 0:
        return
    lo, hi = int(supervised.min()), int(supervised.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"label id out of range [0, {vocab}): found {lo if lo < 0 else hi}. Labels must be token ids or "
            f"{IGNORE_INDEX} (ignored); check the padding value of your collator."
        )


def _as_index_tensor(sample_index, batch_size: int) -> torch.Tensor:
    """The batch's dataset indices, kept on the host (where the spill and the checks need them)."""
    if sample_index is None:
        return torch.arange(batch_size, dtype=torch.int64)
    index = torch.as_tensor(np.asarray(sample_index) if isinstance(sample_index, list) else sample_index)
    index = index.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
    if index.numel() != batch_size:
        raise ValueError(f"sample_index has {index.numel()} entries for a batch of {batch_size}")
    return index


def _raise_if_nonfinite(bad_rows: np.ndarray, index: np.ndarray) -> None:
    if not bad_rows.any():
        return
    samples = index[bad_rows].tolist()
    shown = ", ".join(map(str, samples[:10])) + (" ..." if len(samples) > 10 else "")
    raise NonFiniteLogitsError(
        f"logits contain NaN/Inf at supervised positions of sample(s) {shown}. "
        "Check the model's numerics (e.g. fp16 overflow: evaluate in bf16 or fp32)."
    )
