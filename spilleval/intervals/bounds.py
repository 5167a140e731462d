"""From replicate values or per-sample sums to an interval: the percentile bootstrap and the normal interval."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval of one metric output, as stored in results.json's `intervals`."""

    low: float
    high: float
    level: float
    method: str  # "analytic" (normal, from the standard error) or "bootstrap" (percentile, Poisson weights)
    resamples: int | None = None
    seed: int | None = None
    standard_error: float | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"low": self.low, "high": self.high, "level": self.level, "method": self.method}
        for key in ("resamples", "seed", "standard_error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def percentile_interval(replicates: np.ndarray, level: float, *, resamples: int, seed: int) -> Interval | None:
    """The percentile bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of the replicate values
    (numpy's default linear interpolation). None when no replicate value is finite."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(low), float(high), level, "bootstrap", resamples=resamples, seed=seed)


def mean_interval(total: Fraction, total_squares: Fraction, n: int, level: float) -> Interval | None:
    """mean ± z * s / sqrt(n), s the sample standard deviation (n - 1), as lm-evaluation-harness's stderr of a
    mean. The sums are exact (Fractions), so the variance does not suffer cancellation. None for n < 2."""
    if n < 2:
        return None
    mean = total / n
    variance = max((total_squares - total * mean) / (n - 1), Fraction(0))
    standard_error = math.sqrt(variance / n)
    z = NormalDist().inv_cdf((1 + level) / 2)
    centre = float(mean)
    return Interval(centre - z * standard_error, centre + z * standard_error, level, "analytic",
                    standard_error=standard_error)
