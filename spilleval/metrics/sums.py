"""A float accumulator for corpus metrics, with the same exact arithmetic as streaming float states."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from . import exact_sum


class CompensatedSum:
    """Sum of floats kept exactly (`exact_sum`: integer limbs) and rounded once, so the result does not depend on
    how the terms were grouped into batches or ordered."""

    def __init__(self) -> None:
        self._state = exact_sum.zeros()

    def add(self, values: Iterable[float] | np.ndarray) -> None:
        self._state = exact_sum.add(self._state, np.asarray(values, dtype=np.float64))

    @property
    def value(self) -> float:
        return exact_sum.value(self._state)
