"""`results.json`: the metrics of a finished evaluation under the keys it reported them, and what produced them.

Schema 3 (`schema.ResultsRecord`): `{"metrics": {...}, "provenance": {...}, "intervals": {...}}`, the metrics keyed
as the caller reported them (`SpillingTrainer`: `eval_token_accuracy`, `eval_loss`), so the file reads like the
training logs; `metric_key_prefix` in the provenance gives the names back. Schemas 1 and 2 stored the metrics alone,
unprefixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import SpillFormatError
from .schema import LEGACY_RESULTS_SCHEMA, RESULTS_SCHEMA, parse


def prefixed(results: dict[str, Any], prefix: str | None) -> dict[str, Any]:
    """Metric keys as a trainer reports them (`token_accuracy` -> `eval_token_accuracy`)."""
    if not prefix:
        return dict(results)
    return {key if key.startswith(f"{prefix}_") else f"{prefix}_{key}": value for key, value in results.items()}


def read_results_record(path: Path, schema_version: int) -> dict[str, Any]:
    """`results.json` as a schema-3 record; the flat metrics of schema 1 and 2 become its `metrics`."""
    fix = "Recompute the metrics with `spilleval compute`."
    if schema_version <= 2:
        metrics = parse(path, LEGACY_RESULTS_SCHEMA, SpillFormatError, what="a valid results record", fix=fix)
        return {"metrics": metrics, "provenance": {}}
    return dict(parse(path, RESULTS_SCHEMA, SpillFormatError, what="a valid results record", fix=fix))


def metrics_by_name(record: dict[str, Any]) -> dict[str, Any]:
    """The record's metrics without the prefix they were reported with (`eval_token_accuracy` -> `token_accuracy`)."""
    return _unprefixed(record["metrics"], record["provenance"].get("metric_key_prefix"))


def intervals_by_name(record: dict[str, Any]) -> dict[str, Any]:
    """The record's confidence intervals (if any) keyed like `metrics_by_name`; malformed entries are dropped."""
    intervals = _unprefixed(record.get("intervals") or {}, record["provenance"].get("metric_key_prefix"))
    return {key: value for key, value in intervals.items() if _is_interval(value)}


def _unprefixed(values: dict[str, Any], prefix: Any) -> dict[str, Any]:
    if not isinstance(prefix, str) or not prefix:
        return dict(values)
    start = len(prefix) + 1
    return {key[start:] if key.startswith(f"{prefix}_") else key: value for key, value in values.items()}


def _is_interval(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in ("low", "high", "level"))
