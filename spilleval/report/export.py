"""Stream a spill out as JSON Lines or Parquet, one window of samples at a time.

Rows are in stored order (rank by rank, chunk by chunk) with distributed-padding duplicates dropped; sort by
`sample_index` downstream if you need dataset order. Parquet carries the manifest in its schema metadata.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import pyarrow as pa

from ..batch import SampleBatch
from ..progress import sample_bar
from ..spill import SpillReader
from ..spill.chunk import batch_to_table
from ..spill.manifest import create_temp_file
from .scan import SCORE_WINDOW_TOKENS, windows
from .scores import SampleScore, score_batch

FORMATS = ("jsonl", "parquet")
WINDOW_ROWS = 2048  # rows converted to python objects / Parquet row groups at a time
TEXT_COLUMNS = ("prediction", "reference")


class ExportError(ValueError):
    """The export cannot be written as asked (format, destination, column names)."""


@dataclass
class ExportSummary:
    path: str
    format: str
    rows: int
    bytes: int | None


def export_spill(
    reader: SpillReader,
    destination: str,
    fmt: str,
    *,
    decode: bool = False,
    scores: list[SampleScore] = (),
    overwrite: bool = False,
    progress_bar: bool = False,
) -> ExportSummary:
    """Write every unique sample to `destination` ("-" = stdout, JSON Lines only); returns what was written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if decode:
        reader.require_tokenizer()
    tables = _tables(reader, list(scores), decode=decode, progress_bar=progress_bar)
    if destination == "-":
        if fmt != "jsonl":
            raise ExportError("only --format jsonl can be written to stdout (-o -); give Parquet a file path")
        rows = _write_jsonl(tables, sys.stdout)
        return ExportSummary("-", fmt, rows, None)
    path = Path(destination)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists: choose another -o path, or pass --force to replace it")
    rows = _write_atomically(path, lambda tmp: _write_file(tables, tmp, fmt, reader))
    return ExportSummary(str(path), fmt, rows, path.stat().st_size)


def _tables(
    reader: SpillReader, scores: list[SampleScore], *, decode: bool, progress_bar: bool
) -> Iterator[pa.Table]:
    """One Arrow table per window: token columns, dataset columns, [decoded text], [scores], [arrays]."""
    with_arrays = bool(reader.manifest.arrays)
    with sample_bar(reader.num_rows, "exporting", enabled=progress_bar) as advance:
        for chunk in reader.iter_chunks(with_arrays=with_arrays):
            for window in windows(chunk, rows=WINDOW_ROWS, tokens=SCORE_WINDOW_TOKENS):
                yield _window_table(reader, window, scores, decode=decode)
                advance(len(window))


def _window_table(reader: SpillReader, batch: SampleBatch, scores: list[SampleScore], *, decode: bool) -> pa.Table:
    table = batch_to_table(batch)
    extra: dict[str, pa.Array] = {}
    if decode or any(s.needs_text for s in scores):
        reader.decode(batch)
    if decode:
        extra["prediction"] = pa.array(batch.pred_text, pa.string())
        extra["reference"] = pa.array(batch.label_text, pa.string())
    for name, values in score_batch(batch, scores).items():
        extra[name] = pa.array(values, pa.float64())
    for name, values in batch.arrays.items():
        extra[name] = _fixed_shape_array(values)
    for name, array in extra.items():
        if name in table.column_names:
            raise ExportError(
                f"the export would have two columns named {name!r} (a dataset column and a computed one); "
                "rename the dataset column or leave out --decode / --scores"
            )
        table = table.append_column(name, array)
    return table


def _fixed_shape_array(values: np.ndarray) -> pa.Array:
    """[B, d1, d2, ...] -> nested fixed-size lists, so JSON keeps the shape and Parquet the type."""
    array: pa.Array = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _write_file(tables: Iterator[pa.Table], path: Path, fmt: str, reader: SpillReader) -> int:
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            return _write_jsonl(tables, f)
    return _write_parquet(tables, path, reader)


def _write_jsonl(tables: Iterator[pa.Table], out: IO[str]) -> int:
    rows = 0
    for table in tables:
        for record in table.to_pylist():
            out.write(json.dumps(record, ensure_ascii=False, allow_nan=True))
            out.write("\n")
        rows += table.num_rows
    out.flush()
    return rows


def _write_parquet(tables: Iterator[pa.Table], path: Path, reader: SpillReader) -> int:
    import pyarrow.parquet as pq

    writer = None
    rows = 0
    try:
        for table in tables:
            if writer is None:
                metadata = {b"spilleval.manifest": json.dumps(reader.manifest.to_json()).encode()}
                schema = table.schema.with_metadata(metadata)
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            writer.write_table(table.cast(writer.schema), row_group_size=WINDOW_ROWS)
            rows += table.num_rows
        if writer is None:  # an empty spill still gets a readable file
            pq.write_table(reader.table(0, 0), path)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _write_atomically(path: Path, write) -> int:
    """Write to a temp file beside `path` and rename it into place, so a failed export leaves nothing half-done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path)  # readable as the umask says, as the spill itself
    os.close(fd)
    try:
        rows = write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows
