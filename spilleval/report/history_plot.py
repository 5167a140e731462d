"""The history of a run as a matplotlib figure: one subplot per metric, the metric against the global step, with
the confidence intervals as error bars when results.json has them.

Each series (eval set and part) is a line through the first evaluation of every step; a repeated evaluation at a
step (`spill-eval-step-32-1`, e.g. the `evaluate()` after training, maybe of the best checkpoint's weights) is an
open marker off the line, so the line stays the training curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .figures import figure_png
from .history import HistoryError, HistoryPoint, RunHistory

COLUMNS = 3


def history_figure(history: RunHistory, keys: list[str] | None = None) -> Any:
    """A figure with one subplot per metric key (default: every numeric metric of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys if keys is not None else history.metric_keys()
    if not keys:
        raise HistoryError(f"no metrics to plot in {history.run_dir}: no spill has a results.json that verifies "
                           "(pass --recompute to recompute them from the spills)")
    columns = min(COLUMNS, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), dpi=120, squeeze=False,
                             layout="constrained")
    for ax, key in zip(axes.flat, keys):
        _plot_metric(ax, history, key)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return fig


def write_history_plot(history: RunHistory, path: str | Path) -> Path:
    """The figure as an image file (the format follows the suffix: .png, .svg, .pdf)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = history_figure(history)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def history_png(history: RunHistory) -> bytes:
    return figure_png(history_figure(history))


def _plot_metric(ax: Any, history: RunHistory, key: str) -> None:
    for colour, series in zip(_colours(), history.series):
        points = [p for p in series.points if key in p.numeric()]
        if not points:
            continue
        first = [p for p in points if p.repeat == 0]
        repeats = [p for p in points if p.repeat > 0]
        if first:
            ax.errorbar(*_xy_err(first, key), marker="o", markersize=4, capsize=3, color=colour, label=series.name)
        if repeats:
            ax.errorbar(*_xy_err(repeats, key), marker="D", markersize=5, capsize=3, linestyle="none", color=colour,
                        markerfacecolor="white", label=f"{series.name} (re-evaluated)")
    from matplotlib.ticker import MaxNLocator

    ax.set_title(key, fontsize=10)
    ax.set_xlabel("global step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7)


def _xy_err(points: list[HistoryPoint], key: str) -> tuple[list[int], list[float], Any]:
    """Steps, values and asymmetric error bars ([below, above]; 0 where a point has no interval)."""
    xs = [p.step for p in points]
    ys = [p.numeric()[key] for p in points]
    below, above = [], []
    for p, y in zip(points, ys):
        interval = p.intervals.get(key)
        below.append(max(y - interval.low, 0.0) if interval else 0.0)
        above.append(max(interval.high - y, 0.0) if interval else 0.0)
    has_error = any(below) or any(above)
    return xs, ys, ([below, above] if has_error else None)


def _colours() -> list[str]:
    import matplotlib.pyplot as plt

    return plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
