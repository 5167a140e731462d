"""Progress bars for passes over a spill: samples done of the spill's total, with a rate and an ETA (tqdm).

One bar per pass: a corpus metric that reads the spill twice shows two bars. Callers decide whether bars are
wanted (a person watching: not `--quiet`, not `--json`, stderr a terminal); when not, nothing is imported or drawn.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def wanted(quiet: bool = False) -> bool:
    """Bars only for a person watching: not with --quiet, not when stderr is a pipe or a file."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def sample_bar(total: int | None, desc: str, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """`advance(n)` for n more samples done; the bar ends full (duplicate rows of a multi-GPU spill are skipped
    without being counted)."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=" samples", leave=False, dynamic_ncols=True) as bar:
        yield bar.update
        if total is not None and bar.n < total:
            bar.update(total - bar.n)


class PassProgress:
    """Attached to a `SpillReader` (`reader.progress`): each `iter_batches` pass gets a bar named after the metric
    that runs it (`label`), numbered when the metric reads the spill more than once."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.label = "reading"
        self._passes: Counter[str] = Counter()

    def track(self, batches: Iterator[T]) -> Iterator[T]:
        self._passes[self.label] += 1
        count = self._passes[self.label]
        desc = self.label if count == 1 else f"{self.label} (pass {count})"
        with sample_bar(self.total, desc, enabled=True) as advance:
            for batch in batches:
                yield batch
                advance(len(batch))  # type: ignore[arg-type]
