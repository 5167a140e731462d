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

from .sampleset import SampleSet

MISSING_RANGES_SHOWN = 10


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


def format_ranges(ranges: list[tuple[int, int]], limit: int = MISSING_RANGES_SHOWN) -> str:
    """`3, 7-9, 12 ...`: inclusive ranges, the first `limit` of them."""
    shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:limit])
    return shown + (" ..." if len(ranges) > limit else "")


def check_every_sample(held: SampleSet, dataset_length: int | None, spill_dir: Any) -> None:
    """Raise `IncompleteEvaluationError` when the samples `held` miss some of [0, dataset_length)."""
    if dataset_length is None:
        return
    count = held.count_range(0, dataset_length)
    if count == dataset_length:
        return
    missing = held.missing_ranges(dataset_length, limit=MISSING_RANGES_SHOWN + 1)
    raise IncompleteEvaluationError(
        f"the evaluation covered {count} of dataset_length={dataset_length} samples; missing: "
        f"{format_ranges(missing, MISSING_RANGES_SHOWN)} ({dataset_length - count} samples). Common causes: a "
        "DataLoader with drop_last=True, a sampler or Subset that skips samples, sample indices that restart at 0 in "
        f"every batch. No metric is reported for a subset. The spill {spill_dir} is kept as partial: evaluate the "
        "missing samples with resume=True, read what is there with `spilleval compute --allow-partial`, or pass the "
        "dataset_length that the loop really covers."
    )
