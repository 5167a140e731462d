"""Exact float sums in a small fixed-size integer state, so float metrics are independent of batching and order.

Every finite float64 is an integer multiple of 2^-1074, so a sum of floats is an integer in that unit. The state
keeps that integer in 32-bit limbs held in int64 (a "superaccumulator", ~0.5 KiB), plus counters for NaN and the
infinities. Adding values and merging states are integer additions, exact and associative: the result does not
depend on how the data was batched, chunked, ordered or split across ranks, and `value()` rounds the exact sum
once, so it equals `math.fsum` over all the values. Compensated (double-double) sums only get close to this.
"""

from __future__ import annotations

from fractions import Fraction
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
    total = _integer(state)
    try:
        return total / (1 << _UNIT_EXP)  # int / int is correctly rounded in Python
    except OverflowError:
        return float("inf") if total > 0 else float("-inf")


def per_value(values: Any) -> np.ndarray:
    """One state per value, stacked (n x STATE_SIZE): row i is `add(zeros(), [values[i]])`.

    Weighted sums of states (a bootstrap replicate is `weights @ per_value(x)`) stay exact: limbs are below 2^32,
    so integer weights below 2^8 over 2^12 rows sum below 2^52, exact even in a float64 matrix product.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    out = np.zeros((len(x), STATE_SIZE), dtype=np.int64)
    out[:, _NAN] = np.isnan(x)
    out[:, _POS_INF] = np.isposinf(x)
    out[:, _NEG_INF] = np.isneginf(x)
    rows = np.flatnonzero(np.isfinite(x) & (x != 0))
    for limb, piece in _pieces(x[rows]):
        out[rows, limb] += piece
    return normalise_rows(out)


def add_rows(states: np.ndarray, values: Any) -> np.ndarray:
    """Row r of `states` (rows x STATE_SIZE) plus every value of row r of `values` (rows x n), exactly: `add` of
    each row, in a few numpy calls over all the rows (a bootstrap's replicates of a sum of floats)."""
    x = np.asarray(values, dtype=np.float64).reshape(len(states), -1)
    out = np.array(states, dtype=np.int64, copy=True)
    out[:, _NAN] += np.isnan(x).sum(axis=1)
    out[:, _POS_INF] += np.isposinf(x).sum(axis=1)
    out[:, _NEG_INF] += np.isneginf(x).sum(axis=1)
    row, column = np.nonzero(np.isfinite(x) & (x != 0))
    finite = x[row, column]
    # a slot (row, limb) gets at most _SLICE pieces < 2^33 per bincount: exact in float64, as in `_accumulate`
    for start in range(0, len(finite), _SLICE):
        part = slice(start, start + _SLICE)
        for limb, piece in _pieces(finite[part]):
            slot = row[part] * NUM_LIMBS + limb
            sums = np.bincount(slot, weights=piece.astype(np.float64), minlength=len(out) * NUM_LIMBS)
            out[:, :NUM_LIMBS] += sums.reshape(len(out), NUM_LIMBS).astype(np.int64)
        out = normalise_rows(out)
    return out


def normalise_rows(states: np.ndarray) -> np.ndarray:
    """`_normalise` of every row of a 2-D array of states (carries propagated column by column, vectorised)."""
    out = np.array(states, dtype=np.int64, copy=True)
    for i in range(NUM_LIMBS - 1):
        carry = out[:, i] >> LIMB_BITS  # arithmetic shift: floor division, also for negative limbs
        out[:, i] &= _MASK
        out[:, i + 1] += carry
    return out


def _pieces(x: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Finite non-zero doubles as signed integer pieces (< 2^33) at limb positions: x = sum of piece * 2^(32 limb)
    in units of 2^-1074."""
    fraction, exponent = np.frexp(np.abs(x))
    mantissa = (fraction * 2.0**_MANT_BITS).astype(np.uint64)  # exact: 53-bit integer
    position = exponent.astype(np.int64) - _MANT_BITS + _UNIT_EXP
    underflow = np.maximum(-position, 0)  # subnormals: the bits below 2^-1074 are zero, shift them out
    mantissa >>= underflow.astype(np.uint64)
    position += underflow
    limb = position // LIMB_BITS
    shift = (position % LIMB_BITS).astype(np.uint64)
    sign = np.where(x < 0, -1, 1)
    low = (mantissa & np.uint64(_MASK)) << shift  # < 2^64
    high = (mantissa >> np.uint64(LIMB_BITS)) << shift  # < 2^53
    return (
        (limb, sign * (low & np.uint64(_MASK)).astype(np.int64)),
        (limb + 1, sign * ((low >> np.uint64(LIMB_BITS)) + (high & np.uint64(_MASK))).astype(np.int64)),
        (limb + 2, sign * (high >> np.uint64(LIMB_BITS)).astype(np.int64)),
    )


def fraction(state: np.ndarray) -> Fraction | None:
    """The exact sum as a Fraction (None when NaN or an infinity was added)."""
    if state[_NAN] or state[_POS_INF] or state[_NEG_INF]:
        return None
    return Fraction(_integer(state), 1 << _UNIT_EXP)


def _integer(state: np.ndarray) -> int:
    return sum(int(limb) << (LIMB_BITS * i) for i, limb in enumerate(state[:NUM_LIMBS].tolist()))


def _accumulate(out: np.ndarray, x: np.ndarray) -> None:
    """Add finite non-zero doubles: x = m * 2^e -> integer mantissa at bit position e - 53 + 1074."""
    pieces = _pieces(x)
    # each piece < 2^33: a float64 bincount of 2^20 of them is still an exact integer (< 2^53)
    for start in range(0, len(x), _SLICE):
        part = slice(start, start + _SLICE)
        for index, piece in pieces:
            sums = np.bincount(index[part], weights=piece[part].astype(np.float64), minlength=NUM_LIMBS)
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
