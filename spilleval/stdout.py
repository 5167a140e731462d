"""stdout for rich's console that drops the spaces rich pads table cells with, when stdout is a pipe or a file."""

from __future__ import annotations

import io
import sys


class TrimmedStdout(io.TextIOBase):
    """Writes to whatever `sys.stdout` is at the time (so tests that swap it see the output); when it is not a
    terminal, each line loses its trailing spaces (rich pads every table cell to the column width)."""

    def __init__(self) -> None:
        self._pending = ""

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stdout, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if sys.stdout.isatty():
            return sys.stdout.write(text)
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        sys.stdout.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            sys.stdout.write(self._pending)
            self._pending = ""
        sys.stdout.flush()
