"""`spilleval report`: one self-contained static HTML page about a spill (no network needed to view it).

One bounded pass over the spill gathers the per-sample score histograms and the worst samples; the metrics come
from results.json (or are recomputed). Plots are matplotlib PNGs inlined as base64, the CSS is inline, and the
page is rendered from a Jinja2 template with autoescaping (decoded model output is untrusted text).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .. import __version__
from ..spill import SpillReader
from .history import RunHistory, format_value, history_of_spill, point_label
from .results import metric_results
from .samples import DEFAULT_MAX_TOKENS, SampleView, ranked_views, view_options
from .scan import ScoreHistogram, ScoreHistograms, WorstSamples, scan
from .scores import SampleScore
from .spill_scores import scores_of
from .figures import figure_png, histogram_caption, histogram_figure
from .terminal import format_score, interval_text, visible



@dataclass
class Plot:
    title: str
    caption: str
    png_base64: str


@dataclass
class HistorySection:
    """The run the spill belongs to: its metrics against the global step (`spilleval history`)."""

    history: RunHistory
    png_base64: str
    current: str  # the reported spill, highlighted among the run's


@dataclass
class ReportData:
    spill: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    metrics_source: str
    intervals: dict[str, Any]  # 95% confidence intervals by metric name (results.json's), may be empty
    overview: list[tuple[str, str]]
    score_summaries: list[dict[str, Any]]
    plots: list[Plot]
    worst_by: SampleScore
    worst: list[SampleView]
    generated: str
    history: HistorySection | None = None


def build_report(
    reader: SpillReader,
    *,
    by: str | None = None,
    n: int = 20,
    recompute: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress_bar: bool = False,
) -> ReportData:
    """Everything the page shows, from one pass over the spill (plus a metrics recompute if asked)."""
    worst_score, scores = scores_of(reader).with_defaults(by)  # `by` None: the spill's default ranking
    histograms = ScoreHistograms(scores)
    worst = WorstSamples(worst_score, n)
    scan(reader, scores, [histograms, worst], progress_bar=progress_bar, desc="report")
    metrics, source = metric_results(reader, recompute=recompute, progress_bar=progress_bar)
    return ReportData(
        spill=str(reader.path.resolve()),
        manifest=reader.manifest.to_json(),
        metrics=metrics,
        metrics_source=source,
        intervals=reader.intervals() if source == "results.json" else {},
        overview=_overview(reader, histograms.by_name["length"]),
        score_summaries=[{"name": h.score.name, "description": h.score.description, **h.summary()}
                         for h in histograms.by_name.values()],
        plots=[_plot(h) for h in histograms.by_name.values() if h.samples],
        worst_by=worst_score,
        worst=ranked_views(worst.result(), reader.display_tokenizer, max_tokens=max_tokens,
                           **view_options(reader)),
        generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        history=_history_section(reader),
    )


def render_html(data: ReportData) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("spilleval.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["score"] = format_score
    env.filters["metric"] = _format_metric
    env.filters["interval"] = interval_text
    env.globals["format_value"] = format_value
    env.globals["point_label"] = point_label
    env.globals["visible"] = visible
    return env.get_template("report.html.j2").render(
        data=data, manifest_json=json.dumps(data.manifest, indent=2, sort_keys=True), version=__version__
    )


def write_report(data: ReportData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def _history_section(reader: SpillReader) -> HistorySection | None:
    """The history of the spill's run when the run evaluated at several steps (reads results.json files only)."""
    from .history_plot import history_png

    history = history_of_spill(reader.path)
    if history is None or len(history.steps) < 2 or not history.metric_keys():
        return None
    return HistorySection(history, base64.b64encode(history_png(history)).decode("ascii"),
                          current=str(reader.path.resolve()))


def _overview(reader: SpillReader, lengths: ScoreHistogram) -> list[tuple[str, str]]:
    m = reader.manifest
    expected = m.dataset_length
    samples = f"{lengths.samples:,}" + (f" of {expected:,}" if expected else "")
    return [
        ("status", "complete" if reader.is_complete else "PARTIAL"),
        ("task", m.task),
        ("samples", samples),
        ("supervised tokens", f"{int(lengths.total):,}"),
        ("tokens per sample", f"{lengths.mean:.1f} mean, {lengths.quantile(0.5):.0f} median" if lengths.samples
         else "-"),
        ("vocabulary", f"{m.vocab_size:,} ({m.id_dtype})"),
        ("label log-probs", "yes" if m.has_logprob else "no"),
        ("bytes on disk", f"{reader.bytes_on_disk:,}"),
    ]


def _plot(histogram: ScoreHistogram) -> Plot:
    return Plot(title=histogram.score.name, caption=histogram_caption(histogram),
                png_base64=base64.b64encode(figure_png(histogram_figure(histogram))).decode("ascii"))
