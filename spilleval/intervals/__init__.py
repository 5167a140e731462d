"""Confidence intervals and paired significance tests computed from a spill (see `estimate` and `paired`)."""

from .bounds import DEFAULT_LEVEL, Interval
from .estimate import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    IntervalReport,
    compute_with_intervals,
    confidence_intervals,
)
from .weights import check_resamples

__all__ = ["DEFAULT_LEVEL", "DEFAULT_RESAMPLES", "DEFAULT_SEED", "Interval", "IntervalReport", "check_resamples",
           "compute_with_intervals", "confidence_intervals"]
