"""The errors spilleval raises for bad input; the CLI prints these as one line, not a traceback."""

from .decode import TokenizerMismatchError
from .evaluator import EmptyEvaluationError
from .metrics.runner import MetricConfigError
from .reduce import NonFiniteLogitsError
from .spill import SpillExistsError, SpillFormatError, SpillLockedError, SpillWriteError

USER_ERRORS: tuple[type[BaseException], ...] = (
    EmptyEvaluationError,
    MetricConfigError,
    NonFiniteLogitsError,
    SpillExistsError,
    SpillFormatError,
    SpillLockedError,
    SpillWriteError,
    TokenizerMismatchError,
    KeyError,
    FileNotFoundError,
)
