"""The bad-input errors the `spilleval` command can meet; it prints them as one line, not a traceback.

Evaluation-time errors (empty dataset, NaN logits, label capture) cannot reach the CLI, which only reads spills,
and importing their modules would pull torch into every command's start-up.
"""

from .decode import TokenizerMismatchError
from .metrics.runner import MetricConfigError
from .report import ExportError, ScoreError, SpillsDifferError
from .spill import SpillExistsError, SpillFormatError, SpillLockedError, SpillWriteError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ExportError,
    MetricConfigError,
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
