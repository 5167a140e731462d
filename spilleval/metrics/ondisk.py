"""Scratch tables on disk for corpus metrics whose working set grows with the data.

Distinct n-grams, document frequencies, every (score, label) pair of an AUROC, every per-sample loss of a
percentile: held in memory these grow with the eval set. Here they live in SQLite tables in a temporary directory:
the B-tree keeps the keys sorted on disk and memory stays at SQLite's page cache (`cache_mib`). It is exact:
keys are stored as they are (text, or IEEE-754 doubles), never hashed, binned or sketched.

    with ScratchStore(reader.path) as store:
        table = store.counter("df", key="TEXT", counts=("n",))
        table.add([("a cat", 1), ("a dog", 1)])          # upsert: counts add up
        table.get(["a cat"])                             # {"a cat": (1,)}
        for block in table.scan(): ...                   # rows sorted by key, a block at a time

        rows = store.rows("choices", key=(("question", "TEXT"), ("sample", "INTEGER")), values=(("ll", "REAL"),))
        rows.add([("q1", 7, -1.5), ("q1", 3, -2.0)])     # one row per key
        for row in rows.scan_rows(): ...                 # ("q1", 3, -2.0), ("q1", 7, -1.5): sorted by key
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator, Sequence

SCRATCH_PREFIX = ".spilleval-scratch-"
DEFAULT_CACHE_MIB = 16
SCAN_BLOCK_ROWS = 8_192  # rows fetched at once as Python tuples (~150 B each): 65,536 held ~12 MB, a step in peak RSS
LOOKUP_BLOCK_KEYS = 900  # stays below SQLite's limit on bound parameters in any build
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPES = ("TEXT", "REAL", "INTEGER")


class ScratchStore:
    """A temporary SQLite database, deleted on close.

    It is created inside `near` (the spill directory: a disk that had room for the spill) when that is writable,
    otherwise in the system temporary directory (`TMPDIR`).
    """

    def __init__(self, near: str | os.PathLike | None = None, *, cache_mib: int | None = None) -> None:
        cache_kib = (cache_mib or DEFAULT_CACHE_MIB) * 1024
        self._dir = tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=_writable_or_none(near))
        self.db = sqlite3.connect(Path(self._dir.name) / "scratch.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{cache_kib}"):
            self.db.execute(f"PRAGMA {pragma}")

    def counter(self, name: str, *, key: str = "TEXT", counts: Sequence[str] = ("n",)) -> "CountTable":
        return CountTable(self.db, name, key=key, counts=counts)

    def rows(self, name: str, *, key: Sequence[tuple[str, str]], values: Sequence[tuple[str, str]]) -> "RowTable":
        return RowTable(self.db, name, key=key, values=values)

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()

    def __enter__(self) -> "ScratchStore":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class CountTable:
    """key -> integer counts that add up on insert (an on-disk `Counter` with one or more count columns)."""

    def __init__(self, db: sqlite3.Connection, name: str, *, key: str, counts: Sequence[str]) -> None:
        if not _NAME.match(name) or not all(_NAME.match(c) for c in counts) or key not in _TYPES:
            raise ValueError(f"invalid scratch table definition: {name}({key}, {counts})")
        self.db, self.name, self.counts = db, name, tuple(counts)
        columns = ", ".join(f"{c} INTEGER NOT NULL" for c in self.counts)
        db.execute(f"CREATE TABLE {name} (key {key} PRIMARY KEY NOT NULL, {columns}) WITHOUT ROWID")
        updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in self.counts)
        marks = ", ".join("?" * (1 + len(self.counts)))
        self._upsert = f"INSERT INTO {name} VALUES ({marks}) ON CONFLICT(key) DO UPDATE SET {updates}"

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Add (key, count, ...) rows in one transaction; keys already present get their counts summed."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany(self._upsert, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get(self, keys: Iterable[Any]) -> dict[Any, tuple[int, ...]]:
        """Counts of the given keys that are present (absent keys are left out)."""
        keys = list(keys)
        found: dict[Any, tuple[int, ...]] = {}
        columns = ", ".join(self.counts)
        for start in range(0, len(keys), LOOKUP_BLOCK_KEYS):
            part = keys[start : start + LOOKUP_BLOCK_KEYS]
            marks = ", ".join("?" * len(part))
            query = f"SELECT key, {columns} FROM {self.name} WHERE key IN ({marks})"
            for row in self.db.execute(query, part):
                found[row[0]] = row[1:]
        return found

    def __len__(self) -> int:
        return int(self.db.execute(f"SELECT count(*) FROM {self.name}").fetchone()[0])

    def scan(self, *, descending: bool = False, block_rows: int = SCAN_BLOCK_ROWS) -> Iterator[list[tuple]]:
        """Every row, sorted by key, in blocks of at most `block_rows` rows."""
        order = "DESC" if descending else "ASC"
        cursor = self.db.execute(f"SELECT key, {', '.join(self.counts)} FROM {self.name} ORDER BY key {order}")
        while rows := cursor.fetchmany(block_rows):
            yield rows


class RowTable:
    """Rows with a composite key, read back sorted by it: grouping on disk (e.g. the choices of each question,
    wherever in the spill they were), so a pass over the groups holds one row at a time."""

    def __init__(self, db: sqlite3.Connection, name: str, *, key: Sequence[tuple[str, str]],
                 values: Sequence[tuple[str, str]]) -> None:
        columns = [*key, *values]
        if not _NAME.match(name) or not key or not all(_NAME.match(c) and t in _TYPES for c, t in columns):
            raise ValueError(f"invalid scratch table definition: {name}({columns})")
        self.db, self.name = db, name
        self.key = [c for c, _ in key]
        self.columns = [c for c, _ in columns]
        definition = ", ".join(f"{c} {t} NOT NULL" for c, t in columns)
        db.execute(f"CREATE TABLE {name} ({definition}, PRIMARY KEY ({', '.join(self.key)})) WITHOUT ROWID")
        self._insert = f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})"

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert rows in one transaction; a key already present is an error (sqlite3.IntegrityError)."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany(self._insert, rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def scan_rows(self, *, descending: bool = False, block_rows: int = SCAN_BLOCK_ROWS) -> Iterator[tuple[Any, ...]]:
        """Every row, sorted by the key (fetched a block at a time)."""
        order = ", ".join(f"{column} {'DESC' if descending else 'ASC'}" for column in self.key)
        query = f"SELECT {', '.join(self.columns)} FROM {self.name} ORDER BY {order}"
        cursor = self.db.execute(query)
        while rows := cursor.fetchmany(block_rows):
            yield from rows


def _writable_or_none(path: str | os.PathLike | None) -> str | None:
    if path is not None and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK):
        return os.fspath(path)
    return None
