"""Compare two spills of the same eval set (e.g. two checkpoints): metric deltas and samples that flipped.

Memory: at most one byte per sample present per side, in sparse sets (`spilleval.sampleset`), whatever the
manifests declare. Each spill is read once, in its own stored order (shards are not globally sorted, so no merge by
sample index is needed): per sample, whether it was exactly right, and a 6-bit fingerprint of its labels (one set
per bit), which catches two spills that are not of the same eval set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..batch import SampleBatch
from ..intervals import DEFAULT_RESAMPLES, DEFAULT_SEED
from ..intervals.paired import paired_test
from ..metrics.pool import worker_pool
from ..sampleset import SampleSet
from ..spill import SpillReader
from .results import metric_results
from .scan import iter_scored

FINGERPRINT_BITS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


class SpillsDifferError(ValueError):
    """The two spills are not evaluations of the same data, so their samples cannot be compared."""


def label_fingerprint(batch: SampleBatch) -> np.ndarray:
    """6 bits per sample that depend on every label id and its position (uint64 arithmetic wraps on purpose)."""
    lengths = batch.label_lengths
    starts = batch.label_row_offsets[:-1] - batch.label_row_offsets[0]
    position = np.arange(len(batch.label_ids), dtype=np.uint64) - np.repeat(starts, lengths).astype(np.uint64)
    mixed = (batch.label_ids.astype(np.uint64) + np.uint64(1)) * ((position + np.uint64(1)) * _GOLDEN)
    sums = np.add.reduceat(np.append(mixed, np.uint64(0)), starts) if len(starts) else np.zeros(0, np.uint64)
    sums = np.where(lengths > 0, sums, np.uint64(0)) ^ (lengths.astype(np.uint64) * _MIX)
    return ((sums * _GOLDEN) >> np.uint64(58)).astype(np.uint8)


class SampleStatus:
    """Per sample of one spill: right or wrong (sequence exact match), and its label fingerprint, bit by bit."""

    def __init__(self) -> None:
        self.right, self.wrong = SampleSet(), SampleSet()
        self.fingerprint = [SampleSet() for _ in range(FINGERPRINT_BITS)]  # samples whose bit k is set

    def update(self, batch: SampleBatch, scores: dict[str, np.ndarray]) -> None:
        right = scores["exact_match"] == 1
        self.right.add(batch.sample_index[right])
        self.wrong.add(batch.sample_index[~right])
        prints = label_fingerprint(batch)
        for bit, members in enumerate(self.fingerprint):
            members.add(batch.sample_index[(prints >> bit) & 1 == 1])

    @property
    def present(self) -> SampleSet:
        return self.right | self.wrong


@dataclass
class SpillDiff:
    a: str
    b: str
    metrics: dict[str, dict[str, Any]]  # name -> {"a", "b", "delta"}
    metrics_source: dict[str, str]  # "a"/"b" -> "results.json" | "recomputed"
    compared: int
    only_in_a: int
    only_in_b: int
    right_in_a: int
    right_in_b: int
    right_to_wrong_count: int
    wrong_to_right_count: int
    right_to_wrong: list[int] = field(default_factory=list)  # the first `limit` sample indices of each
    wrong_to_right: list[int] = field(default_factory=list)
    significance: dict[str, dict[str, Any]] = field(default_factory=dict)  # output -> PairedResult.to_json()
    significance_note: str | None = None  # why some or all metrics have no paired test

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "metrics": self.metrics,
            "metrics_source": self.metrics_source,
            "samples": {
                "compared": self.compared,
                "only_in_a": self.only_in_a,
                "only_in_b": self.only_in_b,
                "exact_match_a": self.right_in_a,
                "exact_match_b": self.right_in_b,
                "right_to_wrong": self.right_to_wrong_count,
                "wrong_to_right": self.wrong_to_right_count,
            },
            "right_to_wrong": self.right_to_wrong,
            "wrong_to_right": self.wrong_to_right,
            "significance": self.significance,
            "significance_note": self.significance_note,
        }


def metric_deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(name), b.get(name)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        out[name] = {"a": va, "b": vb, "delta": (vb - va) if numeric else None}
    return out


def diff_spills(
    reader_a: SpillReader,
    reader_b: SpillReader,
    *,
    limit: int = 10,
    recompute: bool = False,
    progress_bar: bool = False,
    test: str | None = "bootstrap",
    trials: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    workers: int | None = 1,
) -> SpillDiff:
    from .scores import resolve_scores

    _check_same_kind(reader_a, reader_b)
    exact = resolve_scores(["exact_match"], has_logprob=False, has_tokenizer=False)
    statuses = []
    for name, reader in (("A", reader_a), ("B", reader_b)):
        status = SampleStatus()
        for batch, values in iter_scored(reader, exact, progress_bar=progress_bar, desc=f"reading {name}"):
            status.update(batch, values)
        statuses.append(status)
    sa, sb = statuses
    present_a, present_b = sa.present, sb.present
    both = present_a & present_b
    _check_same_labels(sa, sb, both)
    right_to_wrong = both & sa.right & sb.wrong
    wrong_to_right = both & sa.wrong & sb.right
    significance, note = {}, None
    with worker_pool(workers) as (pool, count):  # processes start at the first task: none when nothing is computed
        results_a, source_a = metric_results(reader_a, recompute=recompute, progress_bar=progress_bar,
                                             workers=count, executor=pool)
        results_b, source_b = metric_results(reader_b, recompute=recompute, progress_bar=progress_bar,
                                             workers=count, executor=pool)
        if test is not None and (len(present_a - present_b) or len(present_b - present_a)):
            note = "no paired test: the spills do not hold the same samples (a paired test compares the same items)"
        elif test is not None:
            report = paired_test(reader_a, reader_b, test=test, trials=trials, seed=seed, progress=progress_bar,
                                 workers=count, executor=pool)
            significance = {key: result.to_json() for key, result in report.results.items()}
            if report.skipped:
                note = "no paired test for " + "; ".join(f"{name}: {why}" for name, why in report.skipped.items())
    return SpillDiff(
        a=str(reader_a.path),
        b=str(reader_b.path),
        metrics=metric_deltas(results_a, results_b),
        metrics_source={"a": source_a, "b": source_b},
        compared=len(both),
        only_in_a=len(present_a - present_b),
        only_in_b=len(present_b - present_a),
        right_in_a=len(both & sa.right),
        right_in_b=len(both & sb.right),
        right_to_wrong_count=len(right_to_wrong),
        wrong_to_right_count=len(wrong_to_right),
        right_to_wrong=right_to_wrong.first(limit),
        wrong_to_right=wrong_to_right.first(limit),
        significance=significance,
        significance_note=note,
    )


def _check_same_kind(a: SpillReader, b: SpillReader) -> None:
    for key in ("task", "dataset_length"):
        va, vb = getattr(a.manifest, key), getattr(b.manifest, key)
        if va is not None and vb is not None and va != vb:
            raise SpillsDifferError(
                f"the spills differ in {key} ({va!r} in {a.path}, {vb!r} in {b.path}); diff compares two "
                "evaluations of the same eval set (e.g. two checkpoints)"
            )


def _check_same_labels(a: SampleStatus, b: SampleStatus, both: SampleSet) -> None:
    differ = SampleSet()
    for bit_a, bit_b in zip(a.fingerprint, b.fingerprint):
        differ = differ | ((bit_a ^ bit_b) & both)
    if len(differ):
        raise SpillsDifferError(
            f"the spills are not of the same eval set: {len(differ)} sample(s) have different reference labels "
            f"(first: sample {differ.first(1)[0]}). diff compares two evaluations of the same data (e.g. two "
            "checkpoints); check that both ran on the same dataset, order of indices and tokenizer"
        )
