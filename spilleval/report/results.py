"""The corpus metrics of a spill, for `diff` and `report`: the run's own results, or recomputed."""

from __future__ import annotations

from typing import Any

from ..spill import SpillReader


def metric_results(reader: SpillReader, *, recompute: bool, progress_bar: bool) -> tuple[dict[str, Any], str]:
    """(metrics, source): results.json as the run wrote it, or recomputed from the spill when absent or asked."""
    stored = None if recompute else reader.results()
    if stored is not None:
        return stored, "results.json"
    from ..metrics import compute_from_spill

    return compute_from_spill(reader.path, allow_partial=reader.allow_partial, progress=progress_bar), "recomputed"
