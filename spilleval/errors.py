"""The bad-input errors the `spilleval` command can meet; it prints them as one line, not a traceback, and exits
with code 2 (like a usage error). Any other exception is unexpected: exit code 1 (`spilleval.crash`).

Evaluation-time errors (empty dataset, NaN logits, label capture) cannot reach the CLI, which only reads spills,
and importing their modules would pull torch into every command's start-up.
"""

from .decode import TokenizerMismatchError
from .metrics.parallel import WorkerLostError
from .metrics.runner import MetricConfigError
from .plugins import PluginError
from .report import ExportError, ScoreError, SpillsDifferError
from .spill import SpillExistsError, SpillFormatError, SpillLockedError, SpillWriteError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ExportError,
    MetricConfigError,
    PluginError,
    ScoreError,
    SpillExistsError,
    SpillFormatError,
    SpillLockedError,
    SpillWriteError,
    SpillsDifferError,
    TokenizerMismatchError,
    WorkerLostError,
    KeyError,
    FileNotFoundError,
)
