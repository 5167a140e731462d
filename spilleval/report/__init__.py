"""Stage 5 of the data path: read a spill back for people — per-sample scores, the worst samples, a diff of two
spills, streaming export, and a static HTML report. Everything reads the directory in bounded memory.
"""

from .diff import SpillDiff, SpillsDifferError, diff_spills
from .export import ExportError, export_spill
from .samples import SampleView, first_samples, sample_views, samples_by_index
from .scan import ScoreHistograms, WorstSamples, iter_scored, scan
from .scores import (
    SampleScore,
    ScoreError,
    available_scores,
    default_scores,
    per_sample,
    resolve_scores,
)

__all__ = [
    "ExportError",
    "SampleScore",
    "SampleView",
    "ScoreError",
    "ScoreHistograms",
    "SpillDiff",
    "SpillsDifferError",
    "WorstSamples",
    "available_scores",
    "default_scores",
    "diff_spills",
    "export_spill",
    "first_samples",
    "iter_scored",
    "per_sample",
    "resolve_scores",
    "sample_views",
    "samples_by_index",
    "scan",
]
