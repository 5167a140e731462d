"""The corpus metrics of a spill, for `diff` and `report`: the run's own results, or recomputed."""

from __future__ import annotations

from typing import Any

from ..spill import IntegrityError, SpillReader


def metric_results(reader: SpillReader, *, recompute: bool, progress_bar: bool, workers: int | None = 1,
                   executor: Any = None) -> tuple[dict[str, Any], str]:
    """(metrics, source): results.json as the run wrote it, or recomputed from the spill when absent, asked, or
    when results.json fails its check against the spill's seal (the recomputed numbers are exactly the run's)."""
    source = "recomputed"
    try:
        stored = None if recompute else reader.results()
    except IntegrityError:
        stored, source = None, "recomputed (results.json failed its integrity check)"
    if stored is not None:
        from ..metrics.names import in_spec_order

        return in_spec_order(stored, [spec["name"] for spec in reader.manifest.metrics]), "results.json"
    from ..metrics import compute_from_spill

    return compute_from_spill(reader.path, allow_partial=reader.allow_partial, progress=progress_bar,
                              workers=workers, executor=executor), source
