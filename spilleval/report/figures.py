"""Matplotlib figures of the report and the loggers: a score's histogram, and any figure as PNG bytes.

matplotlib is imported inside the functions (with the Agg backend): importing the report costs nothing until a
figure is drawn.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from .scan import ScoreHistogram
from .terminal import format_score

BAR_COLOUR = "#3b6ea8"
HISTOGRAM_BINS = 30


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def histogram_figure(histogram: ScoreHistogram) -> Any:
    """A matplotlib figure of one score's histogram (the caller closes it); also logged to W&B and TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = histogram.score
    values, counts = histogram.values(), histogram.counts
    # small in inches, high dpi: the labels stay readable when the browser scales the image to its grid cell
    fig, ax = plt.subplots(figsize=(3.6, 2.2), dpi=170, layout="constrained")
    try:
        if score.resolution >= score.upper:  # a yes/no score (0 or 1, or 0 or 100): two bars
            ax.bar(["0 (no)", f"{score.upper:g} (yes)"],
                   [counts[0] if len(counts) > 0 else 0, counts[1] if len(counts) > 1 else 0],
                   color=BAR_COLOUR, width=0.6)
        else:
            ax.hist(values, bins=_edges(histogram), weights=counts, color=BAR_COLOUR, edgecolor="white", linewidth=0.5)
        ax.set_xlabel(score.name)
        ax.set_ylabel("samples")
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def histogram_caption(histogram: ScoreHistogram) -> str:
    summary = histogram.summary()
    return f"mean {format_score(summary['mean'])} · median {format_score(summary['median'])} · " \
           f"{histogram.samples:,} samples"


def _edges(histogram: ScoreHistogram) -> np.ndarray:
    """Bin edges: 20 bins over [0, 1] for bounded scores, whole numbers for counts, else the observed range."""
    score = histogram.score
    if score.upper <= 1.0:
        return np.linspace(0.0, 1.0, 21)
    nonzero = np.flatnonzero(histogram.counts)
    lo, hi = histogram.values()[nonzero[[0, -1]]]
    if score.resolution >= 1.0:
        step = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BINS))
        return np.arange(lo - 0.5, hi + step + 0.5, step)
    if hi <= lo:
        return np.array([lo - score.resolution, hi + score.resolution])
    return np.linspace(lo, hi, HISTOGRAM_BINS + 1)
