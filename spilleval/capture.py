"""Stage 1 of the data path: find the labels that line up with the logits, as the model's own loss saw them.

Multimodal models rewrite `labels` inside `forward` (an image placeholder becomes a variable number of feature
positions labelled -100, and the batch is re-padded), so the batch's raw labels no longer line up with the logits.
The labels to evaluate are the ones the loss saw. `resolve_labels` takes the first source that applies:

1. `outputs.labels`, when the model returns them;
2. the `labels` (or pre-shifted `shift_labels`) that `forward` passed to the instance's `loss_function`, recorded
   by `LossCapture` (transformers >= 4.46 routes the causal-LM loss through it);
3. the user's `label_fn(inputs, outputs)`;
4. the batch's labels, when `Trainer.compute_loss` took them for its own loss (`label_smoothing_factor > 0` or
   `compute_loss_func=`): the model never saw them, the trainer's loss did, position by position;
5. the batch's raw labels, when their shape matches the logits **and** they reproduce the model's own
   `outputs.loss` (its mean, sum, or sum / `num_items_in_batch` of the per-token cross-entropy, to the precision of
   the loss's dtype) — or when the user says they line up (`trust_batch_labels=True`).

Anything else raises `LabelCaptureError`, naming the shapes and the fix: misaligned labels are never evaluated.
A shape match alone proves nothing: a model that shifts or re-pads its labels inside `forward` and computes its
loss by hand returns logits of the raw labels' shape. (`label_fn` is tried before raw labels: a user who wrote one
knows the raw labels are wrong even when their shape happens to match.)

The check of source 5 needs the per-token log-probabilities, computed in the same chunked pass as the argmax
(`reduce_aligned`), and is evaluated on the batch's host copy (`spilleval.reduce.DeferredCheck`): on a GPU the loop
does not wait for it, and its error comes from the next batch or from `finalize`, before the batch is spilled.

While it is installed, `LossCapture` also computes the causal-LM loss itself: in sequence chunks, from the logits in
their own dtype, with the argmax and the per-token reduction of the same pass (`reduce_logits`). The model's own
loss, which makes a float32 copy of the whole B x T x V logits, does not run at all; the loss value is the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .batch import IGNORE_INDEX
from .reduce import DEFAULT_CHUNK_BYTES, DeferredCheck, ReducedBatch, reduce_logits

LabelFn = Callable[[Mapping[str, Any], Any], torch.Tensor]


class LabelCaptureError(ValueError):
    """No labels aligned with the logits could be found for a batch."""


@dataclass
class AlignedLabels:
    """Labels that line up with the logits. `shift`: causal convention (`logits[:, t]` predicts `labels[:, t+1]`)."""

    labels: torch.Tensor  # [B, T]
    shift: bool
    source: str  # "outputs.labels" | "loss_function" | "label_fn" | "trainer loss" | "batch labels"
    preshifted: bool = False  # causal-LM `shift_labels`: `logits[:, t]` predicts `labels[:, t]`
    verify_with: torch.Tensor | None = None  # raw labels: the model's own loss they must reproduce

    def unshifted(self) -> torch.Tensor:
        """Labels in the model-input convention, which `compute_metrics` closures shift themselves.

        Pre-shifted labels move right by one position; a target at the very last position is dropped then.
        """
        if not self.preshifted:
            return self.labels
        pad = torch.full_like(self.labels[:, :1], IGNORE_INDEX)
        return torch.cat([pad, self.labels[:, :-1]], dim=1)


@dataclass
class LossCall:
    """What one call of `loss_function` received (and, when fused, the reduction computed there)."""

    labels: torch.Tensor
    shift: bool
    preshifted: bool
    reduced: ReducedBatch | None = None
    replica: int | None = None  # the CUDA device of the logits: under nn.DataParallel, one call per replica

    def aligned(self) -> AlignedLabels:
        return AlignedLabels(self.labels, self.shift, "loss_function", preshifted=self.preshifted)


@dataclass
class _BatchRecord:
    sample_index: torch.Tensor | None = None
    calls: list[LossCall] = field(default_factory=list)


class LossCapture:
    """Wrap the `loss_function` of every `PreTrainedModel` inside `model` while the context is open.

    Per batch: `start_batch(sample_index)`, run the forward, then read `batch_call()`. With `fuse=True` a standard
    causal-LM loss is computed here (chunked, see the module docstring) and its `ReducedBatch` is kept on the call.

    Under `nn.DataParallel` every replica (a copy of the module sharing its `loss_function`) calls the loss on its
    own device with its share of the batch, in a thread of its own: `batch_call(replicas)` puts those calls back
    together in scatter order.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        shift: bool = True,
        fuse: bool = True,
        keep_logprob: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.model = model
        self.shift = shift
        self.fuse = fuse
        self.keep_logprob = keep_logprob
        self.chunk_bytes = chunk_bytes
        self._record = _BatchRecord()
        self._restore: list[Callable[[], None]] = []

    # ------------------------------------------------------------------------------------------- per batch
    def start_batch(self, sample_index: torch.Tensor | None = None) -> None:
        self._record = _BatchRecord(sample_index=sample_index)

    def batch_call(self, replicas: Sequence[int] | None = None) -> LossCall | None:
        """The batch's loss call: the only one, or, under nn.DataParallel (`replicas`: its `device_ids`), one call
        per replica put back together. Anything else is ambiguous (a model calling its loss several times): None."""
        calls = list(self._record.calls)
        if len(calls) == 1:
            return calls[0]
        if replicas and len(calls) > 1:
            return merge_replica_calls(calls, replicas, self._record.sample_index)
        return None

    @property
    def num_calls(self) -> int:
        return len(self._record.calls)

    # ------------------------------------------------------------------------------------------- install
    def __enter__(self) -> "LossCapture":
        for module in self.model.modules():
            if _has_loss_function(module):
                self._restore.append(_install(module, self._wrap))
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._restore:
            self._restore.pop()()

    def _wrap(self, get_original: Callable[[], Callable[..., torch.Tensor]]) -> Callable[..., torch.Tensor]:
        """The wrapper; the wrapped function is looked up at the first call (most modules never compute a loss)."""
        resolved: dict[str, Any] = {}

        def loss_function(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not resolved:
                original = get_original()
                causal = original is _causal_lm_loss()
                resolved.update(original=original, signature=_signature(original), fusable=self.fuse and causal,
                                shifts=causal or (self.shift and not _is_library_loss(original)))
            original, shifts, fusable = resolved["original"], resolved["shifts"], resolved["fusable"]
            bound = _bind(resolved["signature"], args, kwargs)
            logits, labels, shift_labels = bound.get("logits"), bound.get("labels"), bound.get("shift_labels")
            target = shift_labels if shift_labels is not None else labels
            if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
                return original(*args, **kwargs)
            call = LossCall(target.detach(), shift=shifts and shift_labels is None, preshifted=shift_labels is not None,
                            replica=logits.device.index if logits.is_cuda else None)
            self._record.calls.append(call)  # list.append is atomic: DataParallel's replicas call from threads
            if fusable and _can_fuse(logits, bound):
                call.reduced = self._reduce(logits, call)
                return _loss_from(call.reduced, bound.get("num_items_in_batch"))
            return original(*args, **kwargs)

        return loss_function

    def _reduce(self, logits: torch.Tensor, call: LossCall) -> ReducedBatch:
        index = self._record.sample_index
        if index is not None and len(index) != logits.shape[0]:
            index = None  # a DataParallel replica's share: `merge_replica_calls` indexes the merged batch
        reduced = reduce_logits(
            logits.detach(),
            call.labels,
            shift=call.shift,
            sample_index=index,
            keep_logprob=True,  # the loss needs them; dropped before spilling unless asked for
            chunk_bytes=self.chunk_bytes,
        )
        if not self.keep_logprob:
            reduced.label_logprob = None
        return reduced


def merge_replica_calls(calls: Sequence[LossCall], replicas: Sequence[int],
                        sample_index: torch.Tensor | None) -> LossCall | None:
    """One call from the calls of nn.DataParallel's replicas: ordered as `replicas` (the `device_ids` the batch was
    scattered over, in order), labels and reductions concatenated on the first replica's device (DataParallel's
    output device, where the gathered logits are). None when the calls are not one per replica of one batch."""
    position = {device: i for i, device in enumerate(replicas)}
    if any(c.replica not in position for c in calls) or len({c.replica for c in calls}) != len(calls):
        return None
    calls = sorted(calls, key=lambda c: position[c.replica])
    first = calls[0]
    same_kind = all((c.shift, c.preshifted) == (first.shift, first.preshifted) for c in calls)
    rows = sum(len(c.labels) for c in calls)
    if not same_kind or any(c.labels.shape[1:] != first.labels.shape[1:] for c in calls) or (
        sample_index is not None and rows != len(sample_index)
    ):
        return None
    device = first.labels.device
    labels = torch.cat([c.labels.to(device, non_blocking=True) for c in calls])
    reduced = None
    if all(c.reduced is not None for c in calls):
        reduced = ReducedBatch.concat([c.reduced for c in calls], device=device)  # type: ignore[misc]
        if sample_index is not None:
            reduced.sample_index = sample_index
    return LossCall(labels, first.shift, first.preshifted, reduced, replica=first.replica)


def resolve_labels(
    outputs: Any,
    logits: torch.Tensor,
    inputs: Mapping[str, Any],
    *,
    loss_call: LossCall | None,
    label_fn: LabelFn | None = None,
    shift: bool = True,
    label_name: str = "labels",
    loss_calls: int = 0,
    trainer_loss_took_labels: bool = False,
    trust_batch_labels: bool = False,
) -> AlignedLabels:
    """The first label source that applies (see the module docstring), checked against the logits' shape.

    Raw batch labels come back with `verify_with` set (the model's loss) unless trusted: reduce them with
    `reduce_aligned`, which attaches the check.
    """
    returned = _get(outputs, "labels")
    if isinstance(returned, torch.Tensor):
        return _checked(AlignedLabels(returned, shift, "outputs.labels"), logits)
    if loss_call is not None:
        return _checked(loss_call.aligned(), logits)
    if label_fn is not None:
        return _checked(AlignedLabels(torch.as_tensor(label_fn(inputs, outputs)), shift, "label_fn"), logits)
    raw = inputs.get(label_name)
    if trainer_loss_took_labels and isinstance(raw, torch.Tensor):
        return _checked(AlignedLabels(raw, shift, "trainer loss"), logits)
    if not isinstance(raw, torch.Tensor) or tuple(raw.shape) != tuple(logits.shape[:2]):
        raise LabelCaptureError(_unrecoverable_message(logits, raw, label_name, loss_calls))
    if trust_batch_labels:
        return AlignedLabels(raw, shift, "batch labels")
    model_loss = _get(outputs, "loss")
    if not isinstance(model_loss, torch.Tensor) or not model_loss.is_floating_point():
        raise LabelCaptureError(_unverifiable_message(logits, label_name))
    return AlignedLabels(raw, shift, "batch labels", verify_with=model_loss.detach())


def reduce_aligned(
    logits: torch.Tensor,
    aligned: AlignedLabels,
    *,
    sample_index: torch.Tensor,
    keep_logprob: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    num_items_in_batch: Any = None,
) -> ReducedBatch:
    """`reduce_logits` on resolved labels; raw labels also get the check that they reproduce the model's loss."""
    verify = aligned.verify_with is not None
    reduced = reduce_logits(
        logits.detach(), aligned.labels, shift=aligned.shift, sample_index=sample_index,
        keep_logprob=keep_logprob or verify, chunk_bytes=chunk_bytes,
    )
    if verify:
        reduced.checks.append(_loss_check(reduced, aligned.verify_with, num_items_in_batch))
        if not keep_logprob:
            reduced.label_logprob = None
    return reduced


def _loss_check(reduced: ReducedBatch, model_loss: torch.Tensor, num_items_in_batch: Any) -> DeferredCheck:
    """On the device: the model's loss, then what the raw labels give as mean, sum and sum / num_items_in_batch."""
    total, count = reduced.loss_sum, reduced.token_count.to(torch.float64)
    items = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=total.device)
    values = torch.stack([
        model_loss.to(total.device, torch.float64).mean(), count, total / count, total, total / items.double(),
    ])
    rtol = max(1e-4, 2 * torch.finfo(model_loss.dtype).eps)  # float32: 1e-4; bf16: 1.6%; fp16: 0.2%
    return DeferredCheck(values, lambda host: _raise_if_loss_differs(host, rtol))


def _raise_if_loss_differs(values: np.ndarray, rtol: float) -> None:
    model_loss, count, mean, total, per_item = (float(v) for v in values)
    if count == 0:
        return  # no supervised token: nothing of this batch is evaluated
    if any(np.isclose(model_loss, candidate, rtol=rtol, atol=1e-6) for candidate in (mean, total, per_item)):
        return
    raise LabelCaptureError(
        "the batch's raw labels have the logits' shape but do not reproduce the model's own loss: outputs.loss is "
        f"{model_loss:.6g}, the raw labels give a cross-entropy of {mean:.6g} (mean over {int(count)} supervised "
        "tokens; neither its sum nor sum / num_items_in_batch matches either). The model must rewrite its labels "
        "inside forward (shifted, re-padded, image positions inserted), so evaluating the raw labels would be "
        "silently misaligned. Fix: return the processed labels as outputs.labels, compute the loss with "
        "self.loss_function(logits=..., labels=...), or pass label_fn=lambda inputs, outputs: <the labels the loss "
        "used>. If the raw labels do line up and the model's loss is simply another function (label smoothing, "
        "weighting), pass trust_batch_labels=True."
    )


def _checked(aligned: AlignedLabels, logits: torch.Tensor) -> AlignedLabels:
    if tuple(aligned.labels.shape) != tuple(logits.shape[:2]):
        raise LabelCaptureError(
            f"labels from {aligned.source} have shape {tuple(aligned.labels.shape)} but the logits have shape "
            f"{tuple(logits.shape)}: expected labels of shape {tuple(logits.shape[:2])}. Return the labels that "
            "line up with outputs.logits, or pass label_fn=lambda inputs, outputs: <labels of that shape>."
        )
    return aligned


def _unrecoverable_message(logits: torch.Tensor, raw: Any, label_name: str, loss_calls: int) -> str:
    raw_shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else None
    seen = (
        f"the batch's {label_name!r} have shape {raw_shape}, which does not match"
        if raw_shape is not None
        else f"the batch has no {label_name!r} tensor to compare with"
    )
    calls = (
        f"called loss_function {loss_calls} times (ambiguous)" if loss_calls > 1 else "did not call loss_function"
    )
    return (
        f"cannot find labels aligned with the logits {tuple(logits.shape)}: {seen} {tuple(logits.shape[:2])}, "
        f"the model returned no outputs.labels and {calls} with labels. Evaluating the raw labels would be "
        "silently misaligned. Fix: compute the loss with self.loss_function(logits=..., labels=...) in forward, "
        "return the processed labels as outputs.labels, or pass label_fn=lambda inputs, outputs: labels "
        f"(shape {tuple(logits.shape[:2])}) to SpillingTrainer."
    )


def _unverifiable_message(logits: torch.Tensor, label_name: str) -> str:
    return (
        f"the batch's {label_name!r} have the logits' shape {tuple(logits.shape[:2])}, but nothing shows that they "
        "line up with the logits: the model returned no outputs.labels, did not call self.loss_function with "
        "labels, and returned no loss to check them against. A model that shifts or re-pads its labels inside "
        "forward gives logits of the same shape. Fix: return the processed labels as outputs.labels, pass "
        "label_fn=lambda inputs, outputs: <labels aligned with outputs.logits>, or, if the batch's labels do line "
        "up, pass trust_batch_labels=True."
    )


# ----------------------------------------------------------------------------------------------- the loss
def _can_fuse(logits: torch.Tensor, bound: dict[str, Any]) -> bool:
    """Only the plain causal-LM cross-entropy, in no-grad evaluation, is computed here."""
    return (
        logits.dim() == 3
        and logits.is_floating_point()
        and not torch.is_grad_enabled()
        and bound.get("ignore_index", IGNORE_INDEX) == IGNORE_INDEX
        and bound.get("vocab_size", logits.shape[-1]) == logits.shape[-1]
    )


def _loss_from(reduced: ReducedBatch, num_items_in_batch: Any) -> torch.Tensor:
    """What `ForCausalLMLoss` returns: mean over supervised tokens, or sum / num_items_in_batch when given."""
    total = reduced.loss_sum
    if num_items_in_batch is None:
        denominator = reduced.token_count.to(torch.float64)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device).to(torch.float64)
    return (total / denominator).to(torch.float32)


def _library_losses() -> dict[str, Callable[..., torch.Tensor]]:
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # transformers < 4.46: no loss_function
        return {}
    return LOSS_MAPPING


def _causal_lm_loss() -> Callable[..., torch.Tensor] | None:
    return _library_losses().get("ForCausalLM")


def _is_library_loss(fn: Callable[..., torch.Tensor]) -> bool:
    """A transformers loss of known convention (only ForCausalLM shifts); a user's own loss is not."""
    return any(fn is known for known in _library_losses().values())


# ----------------------------------------------------------------------------------------------- install
def _has_loss_function(module: torch.nn.Module) -> bool:
    return isinstance(inspect.getattr_static(type(module), "loss_function", None), property)


Wrapper = Callable[..., torch.Tensor]


def _install(module: torch.nn.Module, make_wrapper: Callable[[Callable[[], Wrapper]], Wrapper]) -> Callable[[], None]:
    """Make `module.loss_function` a wrapper of what it was; returns the function that undoes it.

    `make_wrapper(get_original)` builds the wrapper. The original is read only when the model calls its loss, so
    transformers' warning about an unset `loss_type` is not raised for sub-models that never compute one.
    """
    prop = inspect.getattr_static(type(module), "loss_function")
    if prop.fset is not None:  # transformers >= 4.49: an instance attribute behind a setter
        had_own = "_loss_function" in module.__dict__
        previous = module.__dict__.get("_loss_function")

        def class_default() -> Wrapper:
            wrapper = module.__dict__.pop("_loss_function")
            try:
                return module.loss_function
            finally:
                module.__dict__["_loss_function"] = wrapper

        module.loss_function = make_wrapper((lambda: previous) if had_own else class_default)

        def restore() -> None:
            if had_own:
                module.loss_function = previous
            else:
                del module.__dict__["_loss_function"]

        return restore
    # a read-only property: shadow it in a per-instance subclass, and put the class back afterwards
    original_class = type(module)
    wrapper = make_wrapper(lambda: prop.fget(module))
    module.__class__ = type(original_class.__name__, (original_class,), {"loss_function": property(lambda _: wrapper)})

    def restore_class() -> None:
        module.__class__ = original_class

    return restore_class


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bind(signature: inspect.Signature | None, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by name (keyword extras flattened in), whatever way the model passed them."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    named = {k: v for k, v in bound.items() if signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
    for k, v in bound.items():
        if signature.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(v)
    return named


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def find_logits(outputs: Any) -> torch.Tensor:
    """`outputs.logits` (a ModelOutput or dict), or the first 3-D float tensor of a tuple output."""
    logits = _get(outputs, "logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)):
        for value in outputs:
            if isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point():
                return value
    raise LabelCaptureError(
        f"the model output ({type(outputs).__name__}) has no `logits` [batch, seq, vocab]. Return a ModelOutput with "
        "`logits` (return_dict=True)."
    )
