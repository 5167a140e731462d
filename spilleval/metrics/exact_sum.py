"""Exact float sums in a small fixed-size integer state, so float metrics are independent of batching and order.

Every finite float64 is an integer multiple of 2^-1074, so a sum of floats is an integer in that unit. The state
keeps that integer in 32-bit limbs held in int64 (a "superaccumulator", ~0.5 KiB), plus counters for NaN and the
infinities. Adding values and merging states are integer additions, exact and associative: the result does not
depend on how the data was batched, chunked, ordered or split across ranks, and `value()` rounds the exact sum
once, so it equals `math.fsum` over all the values. Compensated (double-double) sums only get close to this.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LIMB_BITS = 32
_MASK = (1 << LIMB_BITS) - 1
_UNIT_EXP = 1074  # 2^-1074, the smallest subnormal: every finite double is an integer multiple of it
_MANT_BITS = 53
_HEADROOM_BITS = 64  # carries of up to 2^64 additions above the largest double
NUM_LIMBS = -(-(_UNIT_EXP + 1024 + _HEADROOM_BITS) // LIMB_BITS)
_NAN, _POS_INF, _NEG_INF = NUM_LIMBS, NUM_LIMBS + 1, NUM_LIMBS + 2
STATE_SIZE = NUM_LIMBS + 3
_SLICE = 1 << 20


def zeros() -> np.ndarray:
    return np.zeros(STATE_SIZE, dtype=np.int64)


def add(state: np.ndarray, values: Any) -> np.ndarray:
    """`state` plus every value of `values` (any float array), exactly. Returns a new, normalised state."""
    x = np.asarray(values, dtype=np.float64).ravel()
    out = state.copy()
    finite = np.isfinite(x)
    if not finite.all():
        out[_NAN] += int(np.isnan(x).sum())
        out[_POS_INF] += int(np.isposinf(x).sum())
        out[_NEG_INF] += int(np.isneginf(x).sum())
        x = x[finite]
    x = x[x != 0]
    if len(x):
        _accumulate(out, x)
    return _normalise(out)


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The state of both sums: plain integer addition (also what an all_reduce(SUM) of normalised states gives)."""
    return _normalise(np.asarray(a, dtype=np.int64) + np.asarray(b, dtype=np.int64))


def value(state: np.ndarray) -> float:
    """The exact sum rounded once to the nearest float (NaN/inf as IEEE addition would give them)."""
    nan, pos_inf, neg_inf = (int(state[i]) for i in (_NAN, _POS_INF, _NEG_INF))
    if nan or (pos_inf and neg_inf):
        return float("nan")
    if pos_inf or neg_inf:
        return float("inf") if pos_inf else float("-inf")
    total = sum(int(limb) << (LIMB_BITS * i) for i, limb in enumerate(state[:NUM_LIMBS].tolist()))
    try:
        return total / (1 << _UNIT_EXP)  # int / int is correctly rounded in Python
    except OverflowError:
        return float("inf") if total > 0 else float("-inf")


def _accumulate(out: np.ndarray, x: np.ndarray) -> None:
    """Add finite non-zero doubles: x = m * 2^e -> integer mantissa at bit position e - 53 + 1074."""
    fraction, exponent = np.frexp(np.abs(x))
    mantissa = (fraction * 2.0**_MANT_BITS).astype(np.uint64)  # exact: 53-bit integer
    position = exponent.astype(np.int64) - _MANT_BITS + _UNIT_EXP
    underflow = np.maximum(-position, 0)  # subnormals: the bits below 2^-1074 are zero, shift them out
    mantissa >>= underflow.astype(np.uint64)
    position += underflow
    limb = position // LIMB_BITS
    shift = (position % LIMB_BITS).astype(np.uint64)
    sign = np.where(x < 0, -1.0, 1.0)
    low = (mantissa & np.uint64(_MASK)) << shift  # < 2^64
    high = (mantissa >> np.uint64(LIMB_BITS)) << shift  # < 2^53
    pieces = (
        (limb, low & np.uint64(_MASK)),
        (limb + 1, (low >> np.uint64(LIMB_BITS)) + (high & np.uint64(_MASK))),
        (limb + 2, high >> np.uint64(LIMB_BITS)),
    )
    # each piece < 2^33: a float64 bincount of 2^20 of them is still an exact integer (< 2^53)
    for start in range(0, len(x), _SLICE):
        part = slice(start, start + _SLICE)
        for index, piece in pieces:
            sums = np.bincount(index[part], weights=sign[part] * piece[part].astype(np.float64), minlength=NUM_LIMBS)
            out[:NUM_LIMBS] += sums[:NUM_LIMBS].astype(np.int64)
        _normalise_inplace(out)


def _normalise(state: np.ndarray) -> np.ndarray:
    out = np.array(state, dtype=np.int64, copy=True)
    _normalise_inplace(out)
    return out


def _normalise_inplace(state: np.ndarray) -> None:
    """Propagate carries so every limb but the top one is in [0, 2^32); the top one carries the sign."""
    limbs = state[:NUM_LIMBS].tolist()
    carry = 0
    for i in range(NUM_LIMBS - 1):
        v = limbs[i] + carry
        limbs[i], carry = v & _MASK, v >> LIMB_BITS
    limbs[-1] += carry
    state[:NUM_LIMBS] = limbs
