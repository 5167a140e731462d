"""Resampling weights keyed by (seed, dataset index, replicate), so an interval is a property of the eval set.

A sample's weight in replicate b is a pure function of (seed, its dataset index, b): a counter-based hash
(splitmix64), never a stream of random numbers drawn in reading order. Every spill of the same eval therefore gives
the same replicates, whatever its chunking, sample order or world size, and two spills of one eval set (`diff`)
resample the same items together, which is what a paired test needs.

Bootstrap weights are Poisson(1) (the "Poisson bootstrap": each sample is drawn a Poisson number of times, which
approximates multinomial resampling of n items and needs no knowledge of n, so it streams). Approximate
randomization uses fair coin flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BOOTSTRAP_SALT = 0x5EED_B007
_RANDOMIZATION_SALT = 0x5EED_F11B
MAX_RESAMPLES = 1 << 20


def check_resamples(resamples: int) -> None:
    """0 (no intervals) up to MAX_RESAMPLES; checked where the number is given, before an evaluation starts."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 0 <= resamples <= MAX_RESAMPLES:
        raise ValueError(f"confidence_resamples must be an int in 0..{MAX_RESAMPLES:,} (0: no intervals), "
                         f"not {resamples!r}")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hashes(seed: int, salt: int, sample_index: np.ndarray, replicates: int, first: int = 0) -> np.ndarray:
    """(replicates, n) uint64: one independent-looking 64-bit value per (replicate, sample), for the replicates
    first, first + 1, ... (a replicate's values do not depend on which others are drawn with it)."""
    if not 0 < replicates <= MAX_RESAMPLES:
        raise ValueError(f"the number of resamples must be in 1..{MAX_RESAMPLES:,}, not {replicates}")
    key = np.uint64((int(seed) * 0x9E3779B1 + salt) % (1 << 64))
    with np.errstate(over="ignore"):
        per_sample = _mix(_mix(np.asarray(sample_index, dtype=np.int64).astype(np.uint64) + _GOLDEN) ^ key)
        counters = (np.arange(first + 1, first + replicates + 1, dtype=np.uint64) * _GOLDEN)[:, None]
        return _mix(per_sample[None, :] + counters)


def _poisson_one_cdf(max_k: int = 40) -> np.ndarray:
    """P(X <= k) for X ~ Poisson(1), k = 0..max_k (the tail above 40 is below 2^-53)."""
    terms = [math.exp(-1) / math.factorial(k) for k in range(max_k + 1)]
    return np.array([math.fsum(terms[: k + 1]) for k in range(max_k + 1)])


_POISSON_CDF = _poisson_one_cdf()
_TOP_BITS = 16


def _draws_by_top_bits() -> tuple[np.ndarray, np.ndarray]:
    """For each value of a hash's top 16 bits (the uniforms in [j, j + 1) / 2^16): the draw they all give, and
    whether a CDF value falls in that interval, where the draw depends on the lower bits too (8 of 65,536)."""
    top = np.arange(1 << _TOP_BITS, dtype=np.float64)
    low = np.searchsorted(_POISSON_CDF, top * 2.0**-_TOP_BITS, side="right")
    high = np.searchsorted(_POISSON_CDF, (top + 1) * 2.0**-_TOP_BITS, side="right")
    return low.astype(np.uint8), low != high


_DRAW_BY_TOP, _STEP_IN_TOP = _draws_by_top_bits()


def poisson_weights(seed: int, sample_index: np.ndarray, resamples: int, first: int = 0) -> np.ndarray:
    """(resamples, n) uint8: how many times each sample is drawn in each bootstrap replicate (Poisson(1)), for the
    replicates first, first + 1, ...: the number of CDF values at most the uniform (hash >> 11) / 2^53. It is read
    from a table of the hash's top 16 bits, and searched in the CDF only where the table cannot tell (a uniform
    in one of the 8 intervals that hold a CDF value): 6 instead of 16-19 ns a weight (the score bootstraps of
    20,000 samples: 7.8 -> 6.6 s in one process), and the same draws (`tests/test_intervals.py`)."""
    hashes = _hashes(seed, _BOOTSTRAP_SALT, sample_index, resamples, first)
    top = (hashes >> np.uint64(64 - _TOP_BITS)).astype(np.intp)
    drawn = _DRAW_BY_TOP[top]
    undecided = np.flatnonzero(_STEP_IN_TOP[top])
    if len(undecided):
        uniform = (hashes.reshape(-1)[undecided] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        drawn.reshape(-1)[undecided] = np.searchsorted(_POISSON_CDF, uniform, side="right")
    return drawn


def coin_flips(seed: int, sample_index: np.ndarray, trials: int, first: int = 0) -> np.ndarray:
    """(trials, n) bool: in each approximate-randomization trial (first, first + 1, ...), whether a sample's two
    systems swap outputs."""
    return (_hashes(seed, _RANDOMIZATION_SALT, sample_index, trials, first) >> np.uint64(63)).astype(bool)


DRAWS = {"poisson": poisson_weights, "coin": coin_flips}


@dataclass(frozen=True)
class DrawnWeights:
    """index (n,) -> (rows, n) uint8 weights of `trials` replicates: Poisson(1) draws (the bootstrap) or coin flips
    (approximate randomization), keyed by (seed, dataset index); `observed_row`: a first row of ones, every sample
    once (the observed system, which the paired tests compare with). A value, not a closure: the workers of a
    parallel pass draw the weights of their own samples. `first`: the index of its first draw, in a block of the
    rows of a larger set (`blocks`)."""

    draw: str
    seed: int
    trials: int
    observed_row: bool = False
    first: int = 0

    def __post_init__(self) -> None:
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {', '.join(DRAWS)}, not {self.draw!r}")

    @property
    def rows(self) -> int:
        return self.trials + int(self.observed_row)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        drawn = (DRAWS[self.draw](self.seed, index, self.trials, self.first).astype(np.uint8) if self.trials
                 else np.zeros((0, len(index)), np.uint8))
        return np.vstack([np.ones((1, len(index)), np.uint8), drawn]) if self.observed_row else drawn

    def blocks(self, count: int) -> list["DrawnWeights"]:
        """These rows cut into up to `count` contiguous blocks of near-equal size, in order: stacked, the blocks'
        weights are these weights (a draw depends only on its index)."""
        bounds = [self.rows * k // count for k in range(count + 1)]
        return [self._rows(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]

    def _rows(self, start: int, stop: int) -> "DrawnWeights":
        observed = int(self.observed_row)
        first_draw = max(start - observed, 0)
        return DrawnWeights(self.draw, self.seed, stop - observed - first_draw,
                            observed_row=self.observed_row and start == 0, first=self.first + first_draw)
