"""Sample accounting: every dataset sample counts exactly once, or the evaluation says which ones did not.

The spill, the reader and the metrics key every row by its dataset index, so the numbers are exactly those of the
whole eval set only when the indices the loop passes are the dataset's. Two checks make a wrong loop an error
instead of a subset's numbers:

* at `update()`, each batch's `sample_index`: integers (a float index from a collator that stacked it with float
  features is an error, not a rounded guess), one per row, in `[0, dataset_length)` when the length is known;
* at `finalize()`, the unique samples committed against `dataset_length`: a dataloader that dropped its last batch,
  a sampler that skipped samples, or indices that restart at 0 in every batch leave samples missing. The spill is
  then kept as *partial* (readable with `allow_partial=True`, resumable) and `IncompleteEvaluationError` names the
  missing ranges; no metric is reported for a subset as if it were the whole.

(In a single process a repeated index is an error as soon as it is seen, see `spilleval.dedupe.FirstSeen`; in a
distributed run repeats are the sampler's padding and count once.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


class IncompleteEvaluationError(ValueError):
    """`finalize()` found fewer unique samples than `dataset_length`; the spill is kept as partial."""


def checked_sample_index(sample_index: Any, batch_size: int, dataset_length: int | None) -> np.ndarray:
    """The batch's dataset indices as int64 on the host, or a clear error naming what is wrong with them."""
    if hasattr(sample_index, "detach"):  # a torch tensor, maybe on a GPU
        sample_index = sample_index.detach().cpu().numpy()
    array = np.asarray(sample_index)
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"sample_index must hold integer dataset indices, got dtype {array.dtype}: keep the indices integer "
            "(e.g. collate them as torch.long, apart from float features)."
        )
    array = array.reshape(-1).astype(np.int64, copy=False)
    if len(array) != batch_size:
        raise ValueError(f"sample_index has {len(array)} entries for a batch of {batch_size} rows: pass one index "
                         "per row.")
    if len(array) and int(array.min()) < 0:
        raise ValueError(f"sample_index must hold dataset indices (>= 0), got {int(array.min())}.")
    if len(array) and dataset_length is not None and int(array.max()) >= dataset_length:
        raise ValueError(
            f"sample_index {int(array.max())} is outside the dataset: dataset_length={dataset_length} allows "
            f"0..{dataset_length - 1}. Pass each row's index in the dataset (not a running count over a bigger "
            "set), or the right dataset_length."
        )
    return array


def missing_ranges(held: np.ndarray, dataset_length: int) -> list[tuple[int, int]]:
    """Half-open ranges [start, stop) of the indices in [0, dataset_length) that `held` (a bool mask) lacks."""
    flags = np.zeros(dataset_length + 2, dtype=np.int8)
    present = np.zeros(dataset_length, dtype=bool)
    present[: min(len(held), dataset_length)] = held[:dataset_length]
    flags[1 : dataset_length + 1] = ~present
    edges = np.flatnonzero(np.diff(flags))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]


def format_ranges(ranges: list[tuple[int, int]], limit: int = 10) -> str:
    """`3, 7-9, 12 ...`: inclusive ranges, the first `limit` of them."""
    shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:limit])
    return shown + (" ..." if len(ranges) > limit else "")


def check_every_sample(held: np.ndarray, dataset_length: int | None, spill_dir: Any) -> None:
    """Raise `IncompleteEvaluationError` when the samples in `held` (bool mask over indices) miss some of
    [0, dataset_length)."""
    if dataset_length is None:
        return
    count = int(np.count_nonzero(held[:dataset_length]))
    if count == dataset_length:
        return
    missing = missing_ranges(held, dataset_length)
    raise IncompleteEvaluationError(
        f"the evaluation covered {count} of dataset_length={dataset_length} samples; missing: "
        f"{format_ranges(missing)} ({dataset_length - count} samples). Common causes: a DataLoader with "
        "drop_last=True, a sampler or Subset that skips samples, sample indices that restart at 0 in every batch. "
        f"No metric is reported for a subset. The spill {spill_dir} is kept as partial: evaluate the missing samples "
        "with resume=True, read what is there with `spilleval compute --allow-partial`, or pass the dataset_length "
        "that the loop really covers."
    )
