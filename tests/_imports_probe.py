"""Run in a pool worker by `test_parallel`: which modules the worker holds before its first task. Imports nothing
itself, so unpickling this function loads nothing else into the worker."""

import sys


def imported(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if name in sys.modules]
