"""`spilleval history`: how a run's metrics moved over training, from every spill its evaluations wrote.

`SpillingTrainer` writes one spill per evaluation, `<output_dir>/spill-<prefix>-step-<step>` (a repeated evaluation
at one step gets `-1`, `-2`...; with generation, the parts `teacher_forced/` and `generation/` are spills of their
own). Each spill's `results.json` holds the metrics as the trainer logged them, their confidence intervals when
computed, and the global step in its provenance. Reading those files (and the manifests) is enough: memory stays
flat whatever the eval set, and no chunk is opened unless the metrics are recomputed.

A series is one prefix and part (`eval`, `eval/generation`): its points are ordered by global step, then by the
evaluation's number at that step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spill import SpillFormatError, SpillReader
from ..spill.manifest import MANIFEST_NAME
from ..spill.results import prefixed

SPILL_NAME = re.compile(r"^spill-(?P<prefix>.+)-step-(?P<step>\d+)(?:-(?P<repeat>\d+))?$")
PARTS = ("teacher_forced", "generation")  # `spilleval.generation`'s part directories (not imported: it pulls torch)


class HistoryError(FileNotFoundError):
    """A directory that holds no spills of a run, or spills without metrics to plot."""


@dataclass(frozen=True)
class Interval:
    """A confidence interval as results.json stores it."""

    low: float
    high: float
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @classmethod
    def parse(cls, entry: Any) -> Interval | None:
        """The interval of a results.json entry, or None when it is not a well-formed one (the file is untrusted)."""
        if not isinstance(entry, dict):
            return None
        low, high, level = entry.get("low"), entry.get("high"), entry.get("level", 0.95)
        if not all(_is_number(v) and math.isfinite(v) for v in (low, high, level)) or low > high:
            return None
        method = entry.get("method")
        return cls(float(low), float(high), float(level), method if isinstance(method, str) else "?")


@dataclass
class HistoryPoint:
    """One evaluation: where it spilled, at which step, what it measured."""

    step: int
    repeat: int  # the `-N` suffix of the directory: 0 for the step's first evaluation
    spill: Path
    metrics: dict[str, Any] = field(default_factory=dict)  # keyed as the trainer logged them (`eval_loss`)
    intervals: dict[str, Interval] = field(default_factory=dict)
    loaded_checkpoint: str | None = None  # the checkpoint whose weights were evaluated (load_best_model_at_end)
    key_prefix: str | None = None  # the metric keys' prefix (`eval`, `eval_gen`), from the manifest
    source: str = "results.json"  # or "recomputed", or "none"
    note: str | None = None  # why there are no metrics, when there are none

    def numeric(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics.items() if _is_number(v)}

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "repeat": self.repeat,
            "spill": str(self.spill),
            "loaded_checkpoint": self.loaded_checkpoint,
            "source": self.source,
            "note": self.note,
            "metrics": self.metrics,
            "intervals": {k: {"low": i.low, "high": i.high, "level": i.level, "method": i.method}
                          for k, i in self.intervals.items()},
        }


@dataclass
class Series:
    """The evaluations of one eval set and part, in step order."""

    name: str  # "eval", "eval/generation"
    points: list[HistoryPoint]

    def metric_keys(self) -> list[str]:
        """Numeric metric keys in first-seen order."""
        return list(dict.fromkeys(k for p in self.points for k in p.numeric()))

    @property
    def key_prefix(self) -> str | None:
        return next((p.key_prefix for p in self.points if p.key_prefix), None)

    def short_name(self, key: str) -> str:
        """`bleu` for `eval_gen_bleu` in the series whose keys are prefixed `eval_gen` (table headers)."""
        prefix = self.key_prefix
        return key[len(prefix) + 1:] if prefix and key.startswith(f"{prefix}_") else key

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "points": [p.to_json() for p in self.points]}


@dataclass
class RunHistory:
    run_dir: Path
    series: list[Series]

    @property
    def steps(self) -> list[int]:
        return sorted({p.step for s in self.series for p in s.points})

    def metric_keys(self) -> list[str]:
        return list(dict.fromkeys(k for s in self.series for k in s.metric_keys()))

    def to_json(self) -> dict[str, Any]:
        return {"run": str(self.run_dir), "steps": self.steps, "series": [s.to_json() for s in self.series]}


# ----------------------------------------------------------------------------------------------- reading
def run_history(run_dir: str | Path, *, recompute: bool = False, progress_bar: bool = False) -> RunHistory:
    """Every spill of the run in `run_dir` (a trainer's output_dir), as series of metric-vs-step points."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST_NAME).exists() or _spill_parts(run_dir):
        raise HistoryError(f"{run_dir} is one spill; `history` reads the directory that holds a run's spills "
                           f"(here probably {_run_dir_of(run_dir) or run_dir.parent})")
    found: dict[str, list[HistoryPoint]] = {}
    for name, point in _discover(run_dir):
        found.setdefault(name, []).append(point)
    if not found:
        raise HistoryError(f"{run_dir} holds no spill directories named spill-<prefix>-step-<step>: pass the "
                           "trainer's output_dir (TrainingArguments.output_dir), where SpillingTrainer writes them")
    series = []
    for name in sorted(found):
        points = found[name]
        for point in points:
            _read_point(point, recompute=recompute, progress_bar=progress_bar)
        points.sort(key=lambda p: (p.step, p.repeat))
        series.append(Series(name, points))
    return RunHistory(run_dir, series)


def history_of_spill(spill: str | Path) -> RunHistory | None:
    """The history of the run a spill belongs to (`report` shows it), or None when the spill is not part of a
    run's output directory."""
    run_dir = _run_dir_of(Path(spill))
    if run_dir is None:
        return None
    try:
        return run_history(run_dir)
    except HistoryError:
        return None


def _run_dir_of(spill: Path) -> Path | None:
    """`<run>` for `<run>/spill-eval-step-4` and `<run>/spill-eval-step-4/generation`."""
    spill = spill.resolve()
    if spill.name in PARTS and SPILL_NAME.match(spill.parent.name):
        spill = spill.parent
    return spill.parent if SPILL_NAME.match(spill.name) else None


def _spill_parts(directory: Path) -> list[str]:
    return [part for part in PARTS if (directory / part / MANIFEST_NAME).exists()]


def _discover(run_dir: Path) -> list[tuple[str, HistoryPoint]]:
    """(series name, point with the step its directory name gives) for every spill under `run_dir`."""
    out = []
    for entry in sorted(run_dir.iterdir()):
        match = SPILL_NAME.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        step, repeat = int(match["step"]), int(match["repeat"] or 0)
        if (entry / MANIFEST_NAME).exists():
            out.append((match["prefix"], HistoryPoint(step, repeat, entry)))
        for part in _spill_parts(entry):
            out.append((f"{match['prefix']}/{part}", HistoryPoint(step, repeat, entry / part)))
    return out


def _read_point(point: HistoryPoint, *, recompute: bool, progress_bar: bool) -> None:
    """Fill in the point's metrics, intervals and step from its results.json (or recompute the metrics)."""
    try:
        reader = SpillReader(point.spill, allow_partial=True)  # reads the manifest and chunk records, not chunks
    except (SpillFormatError, OSError) as e:
        point.source, point.note = "none", _first_line(e)
        return
    prefix = reader.manifest.extra.get("metric_key_prefix")
    point.key_prefix = prefix if isinstance(prefix, str) and prefix else None
    try:
        record = reader.results_record()
    except (SpillFormatError, OSError) as e:  # IntegrityError is a SpillFormatError
        point.source, point.note = "none", _first_line(e)
        record = None
    if record is not None:
        provenance = record.get("provenance") or {}
        checkpoint = provenance.get("checkpoint") if isinstance(provenance.get("checkpoint"), dict) else {}
        point.step = _int_or(checkpoint.get("global_step"), point.step)
        loaded = checkpoint.get("loaded_checkpoint")
        point.loaded_checkpoint = loaded if isinstance(loaded, str) else None
        point.metrics = dict(record["metrics"])
        point.intervals = {k: i for k, v in (record.get("intervals") or {}).items()
                           if (i := Interval.parse(v)) is not None}
    else:
        point.step = _int_or(reader.manifest.extra.get("global_step"), point.step)
        point.source = "none"
        point.note = point.note or (("no results: " + reader.incomplete_reason()) if not reader.is_complete else
                                    "no results.json (recompute with --recompute)")
    if recompute:
        _recompute(point, reader, progress_bar=progress_bar)


def _recompute(point: HistoryPoint, reader: SpillReader, *, progress_bar: bool) -> None:
    if not reader.is_complete:
        point.note = f"not recomputed: a partial spill ({reader.incomplete_reason()})"
        return
    from ..metrics import compute_from_spill

    results = compute_from_spill(reader.path, progress=progress_bar)
    point.metrics = prefixed(results, point.key_prefix)
    point.intervals, point.source, point.note = {}, "recomputed", None


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


# ----------------------------------------------------------------------------------------------- showing
def format_value(value: Any, interval: Interval | None = None) -> str:
    """`0.593750 ± 0.012000` (the half-width of the interval), or the value alone."""
    if not _is_number(value):
        return "-" if value is None else str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    text = f"{value:.6f}" if isinstance(value, float) else str(value)
    return f"{text} ± {interval.half_width:.6f}" if interval is not None else text


def point_label(point: HistoryPoint) -> str:
    """`16`, or `16 (-1)` for a repeated evaluation at step 16."""
    return f"{point.step}" + (f" (-{point.repeat})" if point.repeat else "")


def history_tables(history: RunHistory) -> list[Any]:
    """One rich table per series: a row per evaluation, a column per metric (with ± the CI's half-width)."""
    from rich.markup import escape
    from rich.table import Column, Table

    tables = []
    for series in history.series:
        keys = series.metric_keys()
        weights = any(p.loaded_checkpoint for p in series.points)
        notes = any(p.note for p in series.points)
        levels = {i.level for p in series.points for i in p.intervals.values()}
        caption = f"± half-width of the {', '.join(f'{lv:.0%}' for lv in sorted(levels))} CI" if levels else None
        prefix = f" (keys {series.key_prefix}_...)" if series.key_prefix else ""
        headers = ["step", *[series.short_name(k) for k in keys], *(["weights"] if weights else []),
                   *(["note"] if notes else [])]
        table = Table(*[Column(escape(h), overflow="fold") for h in headers], caption=caption,
                      title=escape(f"{series.name}{prefix} · {history.run_dir}"))
        for p in series.points:
            cells = [format_value(p.metrics.get(k), p.intervals.get(k)) for k in keys]
            table.add_row(point_label(p), *map(escape, cells),
                          *([escape(Path(p.loaded_checkpoint).name) if p.loaded_checkpoint else ""] if weights else []),
                          *([escape(p.note or "")] if notes else []))
        tables.append(table)
    return tables
