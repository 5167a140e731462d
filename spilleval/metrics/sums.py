"""An exact float accumulator for corpus metrics: the same integer superaccumulator as streaming float states."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from . import exact_sum


class ExactSum:
    """Sum of floats, exact until `value` rounds it once (= math.fsum of every value added), so a corpus metric's
    result does not depend on how its terms were grouped into batches."""

    def __init__(self) -> None:
        self._state = exact_sum.zeros()

    def add(self, values: Iterable[float] | np.ndarray) -> None:
        self._state = exact_sum.add(self._state, np.asarray(values, dtype=np.float64))

    @property
    def value(self) -> float:
        return exact_sum.value(self._state)
