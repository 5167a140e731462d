"""A classic `compute_metrics(eval_pred)` written for plain `Trainer`, fed from the spill.

Plain `Trainer` keeps, for every eval batch, what `preprocess_logits_for_metrics(logits, labels)` returned (the
logits themselves without it), the labels, and optionally the inputs and losses, then concatenates them (padding the
sequence dimension with -100) into one `EvalPrediction`. A closure written for it therefore expects that layout:
unshifted for causal LMs (`predictions[:, t]` comes from `logits[:, t]`, which predicts `labels[:, t + 1]`), padded
as `Trainer` pads, in dataloader order.

`SpillingTrainer` gives the closure exactly that, without holding anything in memory during the loop:

* per batch, `batch_columns` runs the user's `preprocess_logits_for_metrics` on the device (plain `Trainer` would
  keep the logits; without it, the argmax over the vocabulary stands in for them — nothing of vocabulary size is
  ever kept) and turns its output, the labels (the aligned ones when the model rewrites its labels), and the inputs
  and losses when `include_for_metrics` asks for them, into per-sample columns of the spill;
* at the end, `eval_prediction` reads those columns back, puts each step's rows together as `Trainer` gathered
  them, and concatenates the steps as `Trainer`'s `nested_concat` does (the sequence dimension padded with -100 to
  the widest batch): the arrays are the ones plain `Trainer` builds, to the padding.

When the closure fails on what it got (typically `np.argmax(predictions, -1)` on ids), `call_compute_metrics`
raises `ComputeMetricsError` saying what it received and how to change the closure.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

PREFIX = "compute_metrics"
PREDICTIONS = f"{PREFIX}.predictions"
LABELS = f"{PREFIX}.label_ids"
INPUTS = f"{PREFIX}.inputs"
POSITION = f"{PREFIX}.position"  # {step, rank, row, loss}: where the row was in the eval loop


class ComputeMetricsError(RuntimeError):
    """A classic `compute_metrics` failed on what `SpillingTrainer` can give it (ids, never logits)."""


# ----------------------------------------------------------------------------------------------- per batch
def batch_columns(
    predictions: Any,
    labels: torch.Tensor | None,
    *,
    step: int,
    rank: int,
    loss: torch.Tensor | None,
    inputs: torch.Tensor | None,
) -> dict[str, list[Any]]:
    """Per-sample spill columns of one batch: each prediction / label / input row with its shape, and its position
    in the eval loop (step, rank, row) with the batch's loss."""
    leaves = _leaves(predictions)
    batch_size = int(leaves[0][1].shape[0])
    columns: dict[str, list[Any]] = {name: _rows(value, batch_size, name) for name, value in leaves}
    if labels is not None:
        columns[LABELS] = _rows(labels, batch_size, "labels")
    if inputs is not None:
        columns[INPUTS] = _rows(inputs, batch_size, "inputs")
    batch_loss = None if loss is None else float(loss.detach().float().mean())
    columns[POSITION] = [{"step": step, "rank": rank, "row": row, "loss": batch_loss} for row in range(batch_size)]
    return columns


def _leaves(predictions: Any) -> list[tuple[str, torch.Tensor]]:
    """(column name, tensor) of a tensor or a tuple/list of tensors, as preprocess_logits_for_metrics returns."""
    if isinstance(predictions, torch.Tensor):
        return [(PREDICTIONS, predictions)]
    if isinstance(predictions, (tuple, list)) and predictions and all(
        isinstance(p, torch.Tensor) for p in predictions
    ):
        return [(f"{PREDICTIONS}[{i}]", p) for i, p in enumerate(predictions)]
    raise ComputeMetricsError(
        f"preprocess_logits_for_metrics returned {_describe(predictions)}; SpillingTrainer stores a tensor or a "
        "tuple of tensors per batch (first dimension: the batch). Return the reduced logits as a tensor."
    )


def _rows(value: torch.Tensor, batch_size: int, what: str) -> list[np.ndarray]:
    """One array per sample (the spill stores numpy values with their shape and dtype)."""
    if value.dim() == 0 or value.shape[0] != batch_size:
        raise ComputeMetricsError(
            f"{what} has shape {tuple(value.shape)}, but the batch has {batch_size} samples: SpillingTrainer "
            "stores it per sample, so its first dimension must be the batch."
        )
    return list(_numpy(value))


def _numpy(value: torch.Tensor) -> np.ndarray:
    """As transformers' `nested_numpify`: bfloat16 becomes float32, which numpy has."""
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


# ----------------------------------------------------------------------------------------------- at the end
def eval_prediction(
    reader: Any, columns: Sequence[str], *, concat_batches: bool = True, include: Sequence[str] = ()
) -> Any:
    """The `EvalPrediction` plain `Trainer` would have built, from the spill's per-sample `columns` (those
    `batch_columns` made)."""
    from transformers.trainer_utils import EvalPrediction

    fields: dict[str, list[Any]] = {"predictions": [], "label_ids": [], "inputs": [], "losses": []}
    for step in _steps(reader, columns):
        fields["predictions"].append(_step_predictions(step))
        if LABELS in step:
            fields["label_ids"].append(_stack(step[LABELS]))
        if INPUTS in step:
            fields["inputs"].append(_stack(step[INPUTS]))
        fields["losses"].append(np.asarray([p["loss"] for p in step[POSITION]], dtype=np.float32))
    join = _concatenated if concat_batches else (lambda steps: steps or None)
    return EvalPrediction(
        predictions=join(fields["predictions"]),
        label_ids=join(fields["label_ids"]),
        inputs=join(fields["inputs"]) if "inputs" in include else None,
        losses=join(fields["losses"]) if "loss" in include else None,
    )


def _concatenated(steps: list[Any]) -> Any:
    """The steps' arrays joined as `Trainer`'s `nested_concat` joins them batch after batch (dimension 1 padded
    with -100 to the widest), in one pass instead of one copy of everything so far per batch."""
    if not steps:
        return None
    if isinstance(steps[0], tuple):
        return tuple(_concatenated([step[i] for step in steps]) for i in range(len(steps[0])))
    if steps[0].ndim == 1 or all(a.shape[1] == steps[0].shape[1] for a in steps):
        return np.concatenate(steps)
    width = max(a.shape[1] for a in steps)
    out = np.full((sum(len(a) for a in steps), width, *steps[0].shape[2:]), -100, dtype=steps[0].dtype)
    start = 0
    for a in steps:
        out[start : start + len(a), : a.shape[1]] = a
        start += len(a)
    return out


def _steps(reader: Any, columns: Sequence[str]) -> Iterator[dict[str, list[Any]]]:
    """Every eval step's rows (each column a list, rows in rank then batch order), steps in loop order.

    Holds the rows of the whole spill (what the closure gets anyway), read one chunk at a time.
    """
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for batch in reader.iter_chunks(columns=list(columns), with_arrays=False, with_logprob=False):
        for i, position in enumerate(batch.columns[POSITION]):
            key = (position["step"], position["rank"], position["row"])
            rows[key] = {name: batch.columns[name][i] for name in columns}
    steps: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for (step, _, _), row in sorted(rows.items()):
        for name, value in row.items():
            steps[step][name].append(value)
    yield from (steps[s] for s in sorted(steps))


def _step_predictions(step: dict[str, list[Any]]) -> np.ndarray | tuple[np.ndarray, ...]:
    if PREDICTIONS in step:
        return _stack(step[PREDICTIONS])
    count = sum(1 for name in step if name.startswith(f"{PREDICTIONS}["))
    return tuple(_stack(step[f"{PREDICTIONS}[{i}]"]) for i in range(count))


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One step's rows back into its [B, ...] array; rows of different ranks are padded with -100 along the
    sequence dimension first, as `pad_across_processes` does before the gather."""
    if arrays[0].ndim == 0 or all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    width = max(a.shape[0] for a in arrays)
    out = np.full((len(arrays), width, *arrays[0].shape[1:]), -100, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


# ----------------------------------------------------------------------------------------------- the call
def call_compute_metrics(compute_metrics: Callable[..., Any], prediction: Any, *, substituted_argmax: bool) -> Any:
    """Call the closure; if it fails, say what it received and how to adapt it."""
    try:
        return compute_metrics(prediction)
    except Exception as error:  # noqa: BLE001 - re-raised with what the closure got
        got = f"predictions {_describe(prediction.predictions)} and label_ids {_describe(prediction.label_ids)}"
        if substituted_argmax:
            advice = (
                "SpillingTrainer never keeps logits: without preprocess_logits_for_metrics the predictions are the "
                "argmax token ids at every position, unshifted (predictions[i, t] = argmax of logits[i, t], which "
                "predicts label_ids[i, t + 1] for a causal LM), padded with -100. Drop the np.argmax (and any "
                "predictions[0] for a tuple of logits and hidden states) from compute_metrics, or reduce the logits "
                "yourself with preprocess_logits_for_metrics=lambda logits, labels: ... (it runs per batch on the "
                "device)."
            )
        else:
            advice = (
                "The predictions are what your preprocess_logits_for_metrics returned for each batch, concatenated "
                "and padded with -100 as Trainer does."
            )
        raise ComputeMetricsError(
            f"compute_metrics raised {type(error).__name__}: {error}. It received {got}. {advice}"
        ) from error


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} {str(value.dtype).replace('torch.', '')} {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value[:3])}" + (
            ", ...)" if len(value) > 3 else ")")
    return type(value).__name__
