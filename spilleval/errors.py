"""The errors spilleval raises for bad input; the CLI prints these as one line, not a traceback."""

from .decode import TokenizerMismatchError
from .evaluator import EmptyEvaluationError
from .metrics.runner import MetricConfigError
from .reduce import NonFiniteLogitsError
from .report import ExportError, ScoreError, SpillsDifferError
from .spill import SpillExistsError, SpillFormatError, SpillLockedError, SpillWriteError

USER_ERRORS: tuple[type[BaseException], ...] = (
    EmptyEvaluationError,
    ExportError,
    MetricConfigError,
    NonFiniteLogitsError,
    ScoreError,
    SpillExistsError,
    SpillFormatError,
    SpillLockedError,
    SpillWriteError,
    SpillsDifferError,
    TokenizerMismatchError,
    KeyError,
    FileNotFoundError,
)
