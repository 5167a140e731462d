"""What the `spilleval` command does with an error it did not expect: one line on the terminal, the traceback in a
file (for a bug report), exit code 1. Bad input and usage errors are exit code 2 (`spilleval.errors`)."""

from __future__ import annotations

import os
import tempfile
import traceback

EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2


def write_traceback(error: BaseException) -> str:
    """Write `error`'s full traceback to a new temporary file and return its path."""
    fd, path = tempfile.mkstemp(prefix="spilleval-error-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        traceback.print_exception(error, file=f)
    return path


def error_message(error: BaseException) -> str:
    """The error's text, without the quotes `str(KeyError(...))` adds."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__
