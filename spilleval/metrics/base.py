"""The two metric protocols.

`StreamingMetric` (after torchmetrics' `Metric`): states are declared with `add_state`, are small and fixed-size,
and merge by addition, so a metric can be updated batch by batch, split across processes and merged exactly.
`update(batch)` only adds sufficient statistics (sacrebleu-style); `compute()` turns them into the score.

`CorpusMetric`: needs the whole corpus (document frequencies, an open label set, exact percentiles). It gets the
`SpillReader` and makes as many bounded-memory passes over it as it needs.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar

import numpy as np
from pydantic import Field

from ..batch import SampleBatch
from . import exact_sum

if TYPE_CHECKING:
    from ..spill import SpillReader

State = dict[str, np.ndarray]

MAX_STATE_BYTES = 256 * 2**20  # one state array, e.g. the L x (L+1) confusion counts of L = 5,792 labels

# Bounds of size-like constructor parameters. `build_metric` validates parameters against the constructor's type
# hints (a spill's manifest may be hostile): a batch of 10^12 samples or 10^9 histogram bins is refused, not run.
BatchSize = Annotated[int, Field(ge=1, le=2**20)]
NgramOrder = Annotated[int, Field(ge=1, le=32)]


class MetricConfigError(ValueError):
    """The chosen metrics cannot run with what this evaluation provides."""


class UnknownMetricError(MetricConfigError, KeyError):
    """A metric name that is not registered."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class Metric(ABC):
    """Common part: a registry name, what the metric needs from a batch, and its constructor parameters."""

    name: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False  # decoded pred_text / label_text
    needs_logprob: ClassVar[bool] = False  # spilled label log-probabilities (keep_logprob=True)
    needs_sample_nll: ClassVar[bool] = False  # each sample's summed label log-probability (`SampleBatch.sample_nll`)
    needs_columns: ClassVar[tuple[str, ...]] = ()  # dataset columns stored next to the predictions
    needs_arrays: ClassVar[tuple[str, ...]] = ()  # fixed-shape per-sample arrays (zarr)
    needs_aligned_ids: ClassVar[bool] = False  # compares pred and label ids position by position (not generation)
    # What the results mean, for people (`spilleval metrics`, the scale column of `compute`): the result keys under
    # the default parameters when they are not just `name` (the CLI accepts them as names), and their scale.
    outputs: ClassVar[tuple[str, ...]] = ()
    scale: ClassVar[str] = ""  # e.g. "0–1", "0–100, lower is better"; "" when unknown (a custom metric)
    scales: ClassVar[dict[str, str]] = {}  # a result key whose scale differs from `scale`

    @classmethod
    def result_keys(cls) -> tuple[str, ...]:
        """The keys of `compute()`'s dict under the default parameters."""
        return cls.outputs or (cls.name,)

    @classmethod
    def scale_of(cls, key: str) -> str:
        return cls.scales.get(key, cls.scale)

    def params(self) -> dict[str, Any]:
        """JSON-able constructor arguments, stored in the manifest so `spilleval compute` rebuilds the metric."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class StreamingMetric(Metric):
    """Mergeable sufficient statistics. Subclasses declare states in `__init__` and implement update/compute.

    Confidence intervals (`spilleval.intervals`) need each sample's own contribution to the states
    (`sample_states`); outputs that are a plain mean over samples are named in `sample_mean_outputs` and get an
    analytic standard error, the others a bootstrap.
    """

    sample_mean_outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._defaults: dict[str, np.ndarray] = {}
        self._state: State = {}
        self._float_states: set[str] = set()

    def add_state(self, name: str, shape: tuple[int, ...] = (), dtype: Any = np.int64) -> None:
        """Declare a summed integer / array state. Float sums are declared with `add_float_state`."""
        size = math.prod(shape) * np.dtype(dtype).itemsize
        if size > MAX_STATE_BYTES:
            raise MetricConfigError(
                f"metric {self.name!r} would keep a state {name!r} of shape {tuple(shape)} ({size:,} bytes, more than "
                f"{MAX_STATE_BYTES:,}): its parameters (e.g. the size of the label set) are too large for it"
            )
        default = np.zeros(shape, dtype=dtype)
        self._defaults[name] = default
        self._state[name] = default.copy()

    def add_float_state(self, name: str) -> None:
        """An exact float sum (`exact_sum`: integer limbs), so it is independent of batching and merge order."""
        self.add_state(name, (exact_sum.STATE_SIZE,), np.int64)
        self._float_states.add(name)

    def reset(self) -> None:
        self._state = {k: v.copy() for k, v in self._defaults.items()}

    def state(self) -> State:
        return {k: v.copy() for k, v in self._state.items()}

    def merge(self, other: State) -> None:
        """Add another metric's state (another shard, another rank, another batch)."""
        for key, value in other.items():
            if key not in self._state:
                raise KeyError(f"{self.name}: unknown state {key!r}")
            if key in self._float_states:
                self._state[key] = exact_sum.merge(self._state[key], value)
            else:
                self._state[key] = self._state[key] + value

    def add(self, name: str, value: Any) -> None:
        """Add to an integer / array state."""
        self._state[name] = self._state[name] + value

    def add_float(self, name: str, values: Any) -> None:
        """Add float values to an exact float state (`add_float_state`)."""
        self._state[name] = exact_sum.add(self._state[name], values)

    def value(self, name: str) -> Any:
        state = self._state[name]
        if name in self._float_states:
            return exact_sum.value(state)
        return state

    @abstractmethod
    def update(self, batch: SampleBatch) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...

    def sample_states(self, batch: SampleBatch) -> State:
        """Each sample's own state, stacked on a leading axis of len(batch): the batch's state is their sum.

        This default updates a fresh copy once per sample; metrics whose update is vectorised override it.
        """
        scratch = copy.copy(self)
        rows = []
        for i in range(len(batch)):
            scratch.reset()
            scratch.update(batch.slice(i, i + 1))
            rows.append(scratch._state)
        return {name: np.stack([row[name] for row in rows]) if rows else np.zeros((0, *default.shape), np.int64)
                for name, default in self._defaults.items()}

    def compute_state(self, state: State) -> dict[str, float]:
        """`compute()` of another state (a sample's, a bootstrap replicate's), leaving this metric's own alone."""
        scratch = copy.copy(self)
        scratch._state = state
        return scratch.compute()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: default.shape for name, default in self._defaults.items()}

    def is_float_state(self, name: str) -> bool:
        return name in self._float_states


class CorpusMetric(Metric):
    """Computed from the whole spill in bounded-memory passes.

    `binary_mean_outputs` names the outputs that are a mean of 0/1 outcomes over a count the metric also reports
    (output -> count output): their confidence interval follows from the two numbers (`spilleval.intervals`).
    """

    binary_mean_outputs: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def compute(self, reader: "SpillReader") -> dict[str, float]: ...

    def bootstrap(self, reader: "SpillReader", weights: Callable[[np.ndarray], np.ndarray],
                  replicates: int) -> dict[str, np.ndarray] | None:
        """Each output in `replicates` resampled corpora, sample i counted `weights(index)[b, i]` times in replicate
        b ({output: (replicates,) float64}); None when the metric has no bootstrap (`spilleval.intervals`)."""
        return None

    def bootstrap_refusal(self, replicates: int) -> str | None:
        """Why `bootstrap` would not run with this many replicates (the memory it would take), or None."""
        return None


def safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0
