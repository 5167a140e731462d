"""Encode one `SampleBatch` as a chunk directory (Arrow IPC + zarr v3) and decode it back, verifying checksums."""

from __future__ import annotations

import os
import stat
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ..batch import SampleBatch
from .ipc_layout import FileBytes, IpcIndex, IpcLayout, IpcLayoutError, read_ipc_index
from .limits import chunk_decode_budget
from .manifest import (
    ARRAYS_DIR,
    RECOVER_CHUNK,
    TOKENS_FILE,
    ChunkRecord,
    SpillFormatError,
    safe_join,
)
from .zarr_layout import ZarrLayoutError, check_arrays

TOKEN_COLUMNS = ("sample_index", "pred_ids", "label_ids", "label_logprob", "sample_nll", "label_positions")
PER_TOKEN_COLUMNS = ("label_logprob", "label_positions")  # one value per pred_ids value, same offsets
RAGGED_LABELS_KEY = b"spilleval.ragged_labels"  # schema metadata: label rows have their own lengths (generation)
DESCRIPTION_KEY = b"description"  # field metadata: what a column holds, for whoever opens tokens.arrow
COLUMN_DESCRIPTIONS = {
    "sample_index": "the sample's dataset row index (int64); a multi-GPU spill may store a sample twice (sampler "
                    "padding): the first occurrence counts",
    "pred_ids": "the model's argmax token id at each supervised position, already aligned with the labels: "
                "pred_ids[j] is the prediction for label_ids[j] (a causal LM's logits were shifted: the logits at "
                "position t predict the token at t+1)",
    "label_ids": "the supervised label token ids as the loss saw them (positions labelled -100 dropped)",
    "label_logprob": "log p(label_ids[j]) under the model, natural log (nats): log_softmax of the logits in "
                     "float32, gathered at the label",
    "sample_nll": "minus the sum of the sample's label log-probabilities, natural log (nats), float64: the "
                  "sample's summed cross-entropy",
    "label_positions": "the position t on the model's sequence axis of the logits that predicted pred_ids[j] "
                       "(after any image-token expansion); for a causal LM label_ids[j] is the token at t+1 of the "
                       "sequence, for an encoder-decoder the decoder token at t",
}
RAGGED_DESCRIPTIONS = {
    "pred_ids": "the generated token ids of the sample (prompt stripped, cut after the first end-of-sequence id); "
                "not aligned with label_ids",
    "label_ids": "the reference token ids (the labels' supervised ids); rows have their own lengths",
}
ZARR_CHUNK_BYTES = 4 * 2**20
CRC_PIECE_BYTES = 1 << 20  # a file's CRC-32 is computed a piece at a time (`_open_checked`)
RECORD_BATCH_ROWS = 4096  # rows per record batch of tokens.arrow: a reader decodes only the batches that hold the
# rows it wants (`ChunkRows`), so each of 16 workers decodes its tasks' rows, not every 64 MiB chunk it touches (it
# did, 16 x the decompression: answer_macro_f1 on 2.56M tokens, 16 workers on 2 cores, 8.64 -> 6.77 CPU-s). Batches
# of 1,024 rows made a whole chunk's read 1.5x slower (the layout check parses each batch); 4,096 cost nothing
# measurable (token_accuracy in one process 0.069 s either way)


class ChunkCorruptError(SpillFormatError):
    """A committed chunk does not match its recorded length or checksum."""


class ChunkTruncatedError(ChunkCorruptError):
    """A file of a committed chunk is missing or has another length than recorded."""


class ChunkChecksumError(ChunkCorruptError):
    """A file of a committed chunk has its recorded length but fails its CRC-32 check."""


def write_chunk_files(directory: Path, batch: SampleBatch, *, compression: str | None) -> dict[str, dict[str, int]]:
    """Write the chunk's files into `directory` (fsynced) and return {relative name: {bytes, crc32}}."""
    table = batch_to_table(batch)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    files = {TOKENS_FILE: _write_file(directory / TOKENS_FILE, sink.getvalue())}
    if batch.arrays:
        _write_arrays(directory / ARRAYS_DIR, batch.arrays)
        for path in sorted(p for p in (directory / ARRAYS_DIR).rglob("*") if p.is_file()):
            files[path.relative_to(directory).as_posix()] = _record_file(path)
    return files


def _write_file(path: Path, data: pa.Buffer) -> dict[str, int]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": data.size, "crc32": zlib.crc32(data)}


def _record_file(path: Path) -> dict[str, int]:
    data = path.read_bytes()
    _fsync_file(path)
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def batch_to_table(batch: SampleBatch) -> pa.Table:
    offsets = pa.array(batch.offsets.astype(np.int32))
    label_offsets = offsets if batch.aligned else pa.array(batch.label_row_offsets.astype(np.int32))
    columns: dict[str, pa.Array] = {
        "sample_index": pa.array(batch.sample_index),
        "pred_ids": pa.ListArray.from_arrays(offsets, pa.array(batch.pred_ids)),
        "label_ids": pa.ListArray.from_arrays(label_offsets, pa.array(batch.label_ids)),
    }
    if batch.label_logprob is not None:
        columns["label_logprob"] = pa.ListArray.from_arrays(offsets, pa.array(batch.label_logprob))
    if batch.sample_nll is not None:
        columns["sample_nll"] = pa.array(batch.sample_nll, type=pa.float64())
    if batch.label_positions is not None:
        columns["label_positions"] = pa.ListArray.from_arrays(offsets, pa.array(batch.label_positions))
    for name, values in batch.columns.items():
        if name in TOKEN_COLUMNS:
            raise ValueError(f"column name {name!r} is reserved; rename the dataset column")
        columns[name] = _column_array(values)
    descriptions = COLUMN_DESCRIPTIONS if batch.aligned else {**COLUMN_DESCRIPTIONS, **RAGGED_DESCRIPTIONS}
    schema = pa.schema(
        [pa.field(name, array.type, metadata=_description(descriptions.get(name))) for name, array in columns.items()],
        metadata=None if batch.aligned else {RAGGED_LABELS_KEY: b"1"},
    )
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def _description(text: str | None) -> dict[bytes, bytes] | None:
    return None if text is None else {DESCRIPTION_KEY: text.encode()}


def _column_array(values: list[Any]) -> pa.Array:
    """A per-sample column; numpy arrays (any shape, one dtype) become struct<shape, values> (`ndarray_column`)."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        return ndarray_column(values)
    return pa.array(values)


def ndarray_column(arrays: list[np.ndarray]) -> pa.StructArray:
    """One numpy array per sample as struct<shape: list<int64>, values: list<dtype>>: the flat values and the shape
    to restore, so an array of any rank and dtype round-trips exactly (`ndarrays_of`)."""
    shapes = [a.shape for a in arrays]
    shape_offsets = _offsets_array([len(s) for s in shapes])
    value_offsets = _offsets_array([a.size for a in arrays])
    dims = pa.array(np.fromiter((d for s in shapes for d in s), dtype=np.int64))
    flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]))
    return pa.StructArray.from_arrays(
        [pa.ListArray.from_arrays(shape_offsets, dims), pa.ListArray.from_arrays(value_offsets, flat)],
        names=["shape", "values"],
    )


def is_ndarray_column(array: pa.Array) -> bool:
    return pa.types.is_struct(array.type) and [f.name for f in array.type] == ["shape", "values"]


def ndarrays_of(array: pa.StructArray) -> list[np.ndarray]:
    """The numpy arrays of an `ndarray_column`, with their dtype and shape."""
    shapes, values = array.field("shape"), array.field("values")
    dims, flat = _list_values(shapes), _list_values(values)
    shape_offsets = shapes.offsets.to_numpy() - shapes.offsets[0].as_py()
    value_offsets = values.offsets.to_numpy() - values.offsets[0].as_py()
    return [
        flat[value_offsets[i] : value_offsets[i + 1]].reshape(tuple(dims[shape_offsets[i] : shape_offsets[i + 1]]))
        for i in range(len(array))
    ]


def _offsets_array(lengths: list[int]) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.array(offsets)


def read_chunk(directory: Path, record: ChunkRecord, *, verify: bool = True, columns: Iterable[str] | None = None,
               with_arrays: bool = True, with_logprob: bool = True) -> SampleBatch:
    """Read a committed chunk back as a `SampleBatch`, checking every file's length and CRC-32 first, then what
    its headers declare (rows, tokens, decoded sizes) against `record` and the chunk's budget, before decoding.

    Only the ids, and the dataset `columns` (None: all), arrays and log-probs asked for, are decoded."""
    return read_chunk_table(directory, record, verify=verify, columns=columns, with_arrays=with_arrays,
                            with_logprob=with_logprob).to_batch()


@dataclass
class ChunkTable:
    """A chunk read and checked, its rows still in Arrow (`to_batch` converts them; a `slice` first converts only
    those rows: what a worker of the parallel recompute does with its share of a chunk)."""

    directory: Path
    table: pa.Table
    arrays: dict[str, np.ndarray] | None
    columns: list[str] | None

    def slice(self, start: int, stop: int) -> "ChunkTable":
        arrays = None if self.arrays is None else {k: v[start:stop] for k, v in self.arrays.items()}
        return ChunkTable(self.directory, self.table.slice(start, stop - start), arrays, self.columns)

    def to_batch(self) -> SampleBatch:
        with _named_errors(self.directory):
            batch = table_to_batch(self.table, columns=self.columns)
        if self.arrays is not None:
            batch.arrays = self.arrays
        return batch


def read_chunk_table(directory: Path, record: ChunkRecord, *, verify: bool = True,
                     columns: Iterable[str] | None = None, with_arrays: bool = True,
                     with_logprob: bool = True) -> ChunkTable:
    """`read_chunk`'s reading and checking, without converting the rows to numpy and Python values."""
    with ChunkRows(directory, record, verify=verify, columns=columns, with_arrays=with_arrays,
                   with_logprob=with_logprob) as chunk:
        return chunk.rows(0, record.rows)


class ChunkRows:
    """A chunk whose files are checked once (lengths, CRC-32, what the headers declare against its record and
    decode budget), and whose rows are read and decoded a range at a time: only the record batches that hold them,
    read from tokens.arrow with `pread`. A worker of the parallel recompute keeps one and decodes its tasks' rows; it
    holds the last range decoded, not the chunk's bytes (its per-sample arrays, if asked for, are read whole).

    `tokens_verified`: the caller checked tokens.arrow already, its CRC-32 and every header (the parallel
    recompute's planner does, in the parent, for every chunk of a sweep before it hands out its rows), so each of
    16 workers touching a chunk does not read and check the whole file again (they did: 1.3 CPU-s of CRC-32 and 1.3
    of reads per 10M tokens at 16 workers, against 0.2 for one; then every record batch's header at each open: a
    139k-row chunk opened and 1,300 rows read in 4.3 ms, now 3.0). Its length, schema and rows are still checked
    here, and each record batch's header before that batch is decoded."""

    def __init__(self, directory: Path, record: ChunkRecord, *, verify: bool = True, tokens_verified: bool = False,
                 columns: Iterable[str] | None = None, with_arrays: bool = True, with_logprob: bool = True) -> None:
        self.directory, self.record = directory, record
        self.columns = None if columns is None else list(columns)
        self._tokens, self._index, arrays, self._arrays_bytes = _checked_files(
            directory, record, verify=verify, verify_tokens=verify and not tokens_verified, with_arrays=with_arrays,
            every_header=not tokens_verified)
        try:
            with _named_errors(directory):
                self._file = pa.ipc.open_file(self._tokens, options=_read_options(self._index.schema, self.columns,
                                                                                  with_logprob))
                self.arrays = _read_arrays(arrays) if arrays else None
        except BaseException:
            self.close()
            raise
        self._starts = np.cumsum([0, *self._index.lengths])  # each record batch's first row
        self._kept: dict[int, pa.RecordBatch] = {}  # the record batches of the last range read, checked

    def close(self) -> None:
        """Close tokens.arrow (the rows already read stay valid)."""
        self._tokens.close()

    def __enter__(self) -> "ChunkRows":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self, start: int, stop: int) -> ChunkTable:
        """Rows [start, stop) of the chunk, their record batches' values checked once decoded (`check_values`;
        the whole chunk, `check_rows`: its sample indices span exactly its record's). The record batches of the
        last range are kept: the next range, which usually starts where it stopped, decodes only the others."""
        first = max(int(np.searchsorted(self._starts, start, side="right")) - 1, 0)
        end = max(int(np.searchsorted(self._starts, stop, side="left")), first)
        self._check_declared(first, end)
        if (start, stop) == (0, self.record.rows):  # the whole chunk: not kept (nothing else to read here)
            table = self._whole(first, end)
        else:
            self._kept = {i: self._kept[i] if i in self._kept else self._checked_batch(i) for i in range(first, end)}
            table = pa.Table.from_batches([self._kept[i] for i in range(first, end)], schema=self._file.schema)
            table = table.slice(start - int(self._starts[first]), stop - start)
        arrays = None if self.arrays is None else {k: v[start:stop] for k, v in self.arrays.items()}
        return ChunkTable(self.directory, table, arrays, self.columns)

    def _check_declared(self, first: int, end: int) -> None:
        """Before record batches [first, end) are decoded: what their headers declare, with the arrays, fits the
        chunk's decode budget (each header is read once; all of them at the start unless `tokens_verified`)."""
        with _named_errors(self.directory):
            check_budget(self.record, self._arrays_bytes + sum(self._index.batch(i).decoded_bytes
                                                               for i in range(first, end)))

    def _checked_batch(self, index: int) -> pa.RecordBatch:
        with _named_errors(self.directory):
            batch = self._file.get_batch(index)
            check_values(pa.Table.from_batches([batch]), self.record)
        return batch

    def _whole(self, first: int, end: int) -> pa.Table:
        with _named_errors(self.directory):
            table = pa.Table.from_batches([self._file.get_batch(i) for i in range(first, end)],
                                          schema=self._file.schema)
            check_rows(table, self.record)
        return _combined(table)


def _checked_files(directory: Path, record: ChunkRecord, *, verify: bool, verify_tokens: bool, with_arrays: bool,
                   every_header: bool = True) -> tuple[pa.OSFile, IpcIndex, dict[str, bytes], int]:
    """(tokens.arrow open, its index, the bytes of the arrays' files, their decoded size): every file's length
    checked, and its CRC-32 where asked (`verify_tokens` for tokens.arrow, `verify` for the others), and what the
    headers declare checked against the record and the decode budget, before anything is decoded: every record
    batch's header, or (not `every_header`) the schema and rows, the others left to the reader of each record
    batch. Arrays are read only `with_arrays`."""
    tokens = _open_checked(directory, TOKENS_FILE, record.files[TOKENS_FILE], verify=verify_tokens)
    try:
        arrays = {name: _read_verified(directory, name, expected, verify=verify)
                  for name, expected in record.files.items() if with_arrays and name.startswith(f"{ARRAYS_DIR}/")}
        with _named_errors(directory):
            index = read_ipc_index(FileBytes(tokens))
            check_index(index, record)
            layout = index.layout() if every_header else None
            if layout is not None:
                check_layout(layout, record)
            arrays_bytes = check_arrays(arrays, record.rows, prefix=f"{ARRAYS_DIR}/").decoded_bytes if arrays else 0
            check_budget(record, (layout.decoded_bytes if layout is not None else 0) + arrays_bytes)
    except BaseException:
        tokens.close()
        raise
    return tokens, index, arrays, arrays_bytes


def _combined(table: pa.Table) -> pa.Table:
    """The table with one chunk per column, concatenated a column at a time: each column's record batch buffers are
    freed once it is copied, so a whole chunk's read peaks at the chunk and one column, not twice the chunk (the
    numpy views `table_to_batch` takes then copy nothing)."""
    schema, columns = table.schema, []
    while table.num_columns:
        column = table.column(0)
        table = table.remove_column(0)
        columns.append(column.combine_chunks() if column.num_chunks != 1 else column.chunk(0))
        del column
    return pa.Table.from_arrays(columns, schema=schema)


@contextmanager
def _named_errors(directory: Path) -> Iterator[None]:
    """Any decoding problem of a chunk becomes a `ChunkCorruptError` naming it (one line, and how to recover)."""
    try:
        yield
    except SpillFormatError:
        raise
    except (IpcLayoutError, ZarrLayoutError) as e:
        raise ChunkCorruptError(f"chunk {directory}: {e}; the chunk is corrupt. {RECOVER_CHUNK}") from e
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as e:
        # verify=False, or a crafted file with valid CRCs (or one changed after its check). An OSError is pyarrow's
        # ArrowIOError for corrupt compressed data or a record batch cut short, a RuntimeError numcodecs' for a
        # corrupt zstd frame
        raise ChunkCorruptError(f"chunk {directory} cannot be decoded ({e}); the chunk is corrupt. {RECOVER_CHUNK}") \
            from e


def check_index(index: IpcIndex, record: ChunkRecord) -> None:
    """tokens.arrow's schema is a spill's, and its record batches hold the rows its chunk record says."""
    _check_token_schema(index.schema)
    if index.rows != record.rows:
        raise IpcLayoutError(f"{TOKENS_FILE} declares {index.rows} rows; chunk.json records {record.rows}")


def check_layout(layout: IpcLayout, record: ChunkRecord) -> None:
    """Every record batch of tokens.arrow declares, in all, the tokens its chunk record says."""
    schema = layout.schema
    ragged = RAGGED_LABELS_KEY in (schema.metadata or {})
    per_token = ["pred_ids"] + ([] if ragged else ["label_ids"]) + [n for n in PER_TOKEN_COLUMNS if n in schema.names]
    for name in per_token:
        declared = layout.child_length(name)
        if declared != record.tokens:
            raise IpcLayoutError(f"{TOKENS_FILE} declares {declared} {name}; chunk.json records {record.tokens} tokens")


def _check_token_schema(schema: pa.Schema) -> None:
    names = schema.names
    if len(set(names)) != len(names) or names[:3] != ["sample_index", "pred_ids", "label_ids"]:
        raise IpcLayoutError(f"{TOKENS_FILE} has the columns {names[:8]}, not those of a spill")
    ids = schema.field("pred_ids").type
    expected = {
        "sample_index": pa.int64(),
        "pred_ids": ids,
        "label_ids": ids,
        "label_logprob": pa.list_(pa.float32()),
        "sample_nll": pa.float64(),
        "label_positions": pa.list_(pa.int32()),
    }
    if not pa.types.is_list(ids) or ids.value_type not in (pa.uint16(), pa.uint32()):
        raise IpcLayoutError(f"{TOKENS_FILE}: pred_ids has the type {ids}, not a list of uint16/uint32 ids")
    for field in schema:
        if field.name in expected and field.type != expected[field.name]:
            raise IpcLayoutError(f"{TOKENS_FILE}: {field.name} has the type {field.type}, expected {expected[field.name]}")
        if _has_dictionary(field.type):
            raise IpcLayoutError(f"{TOKENS_FILE}: column {field.name!r} is dictionary-encoded, which a spill never is")


def _has_dictionary(type_: pa.DataType) -> bool:
    return pa.types.is_dictionary(type_) or any(_has_dictionary(type_.field(i).type) for i in range(type_.num_fields))


def check_budget(record: ChunkRecord, decoded_bytes: int) -> None:
    budget = chunk_decode_budget(record.bytes)
    if decoded_bytes > budget:
        raise IpcLayoutError(
            f"its files declare {decoded_bytes:,} bytes once decoded, more than a chunk of {record.bytes:,} bytes on "
            f"disk may take ({budget:,}; a decompression bomb?). If this spill is genuine and its chunks are that "
            "large, raise the bound with SPILLEVAL_MAX_CHUNK_BYTES"
        )


def check_rows(table: pa.Table, record: ChunkRecord) -> None:
    """After decoding a whole chunk: `check_values`, and its sample indices span exactly what its record says."""
    check_values(table, record, whole=True)


def check_values(table: pa.Table, record: ChunkRecord, *, whole: bool = False) -> None:
    """After decoding some of a chunk's rows: valid offsets, no missing values in the token columns, sample
    indices within those its record spans (`whole`: spanning exactly those)."""
    table.validate(full=True)
    for name in TOKEN_COLUMNS:
        if name in table.column_names and table.column(name).null_count:
            raise ValueError(f"{TOKENS_FILE}: column {name} has missing values")
    index = table.column("sample_index")
    if not len(index):
        return
    import pyarrow.compute as pc

    bounds = pc.min_max(index)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if whole and (low, high) != (record.min_index, record.max_index):
        raise ValueError(f"{TOKENS_FILE} holds sample indices {low}..{high}; chunk.json records {record.min_index}.."
                         f"{record.max_index}")
    if low < record.min_index or high > record.max_index:
        raise ValueError(f"{TOKENS_FILE} holds sample indices {low}..{high}, outside the {record.min_index}.."
                         f"{record.max_index} that chunk.json records")


def _read_options(schema: pa.Schema, columns: list[str] | None, with_logprob: bool) -> pa.ipc.IpcReadOptions:
    """tokens.arrow with the unwanted columns skipped, never decompressed (e.g. log-probs for token accuracy,
    reference strings for a metric on ids)."""
    wanted = None if columns is None else set(columns)
    fields = [
        i for i, name in enumerate(schema.names)
        if (with_logprob or name != "label_logprob") and (name in TOKEN_COLUMNS or wanted is None or name in wanted)
    ]
    return pa.ipc.IpcReadOptions(included_fields=fields if len(fields) < len(schema) else None,
                                 use_threads=False)  # measured faster on 2 cores (tools/bench_compute.py)


def read_sample_index(directory: Path, record: ChunkRecord, *, verify: bool = True) -> np.ndarray:
    """Only the sample_index column of a chunk (for completeness and random access); tokens.arrow's length and
    CRC-32 (`verify`) and what its headers declare are checked first."""
    return verify_chunk(directory, record, verify=verify, with_arrays=False)


def verify_chunk(directory: Path, record: ChunkRecord, *, verify: bool = True, with_arrays: bool = True,
                 ) -> np.ndarray:
    """Check every file of a chunk (length, CRC-32, what its headers declare) without decoding its rows; return
    its sample indices. What `spilleval inspect` does to tell an intact chunk from a damaged one."""
    tokens, *_ = _checked_files(directory, record, verify=verify, verify_tokens=verify, with_arrays=with_arrays)
    with tokens, _named_errors(directory):
        options = pa.ipc.IpcReadOptions(included_fields=[0], use_threads=False)
        table = pa.ipc.open_file(tokens, options=options).read_all()
        check_rows(table, record)
        return table.column("sample_index").to_numpy()


def table_to_batch(table: pa.Table, *, columns: Iterable[str] | None = None) -> SampleBatch:
    table = table.combine_chunks()
    pred = table.column("pred_ids").chunk(0) if table.num_rows else None
    if pred is None:
        id_type = table.schema.field("pred_ids").type.value_type.to_pandas_dtype()
        empty = np.zeros(0, dtype=id_type)
        return SampleBatch(np.zeros(0, np.int64), np.zeros(1, np.int64), empty, empty.copy())
    offsets = pred.offsets.to_numpy().astype(np.int64)
    start = offsets[0]
    label = table.column("label_ids").chunk(0)
    label_offsets = label.offsets.to_numpy().astype(np.int64)
    label_offsets -= label_offsets[0]
    metadata = table.schema.metadata or {}
    ragged = RAGGED_LABELS_KEY in metadata or not np.array_equal(label_offsets, offsets - start)
    logprob = None
    if "label_logprob" in table.column_names:
        logprob = _list_values(table.column("label_logprob").chunk(0))
    sample_nll = table.column("sample_nll").to_numpy() if "sample_nll" in table.column_names else None
    positions = None
    if "label_positions" in table.column_names and not ragged:  # spills written before it have none
        positions = _list_values(table.column("label_positions").chunk(0))
    wanted = [c for c in table.column_names if c not in TOKEN_COLUMNS]
    if columns is not None:
        wanted = [c for c in wanted if c in set(columns)]
    return SampleBatch(
        sample_index=table.column("sample_index").to_numpy(),
        offsets=offsets - start,
        label_offsets=label_offsets if ragged else None,
        pred_ids=_list_values(pred),
        label_ids=_list_values(label),
        label_logprob=logprob,
        sample_nll=sample_nll,
        label_positions=positions,
        columns={c: _column_values(table.column(c).chunk(0)) for c in wanted},
    )


def _column_values(array: pa.Array) -> list[Any]:
    return ndarrays_of(array) if is_ndarray_column(array) else array.to_pylist()


def _list_values(array: pa.ListArray) -> np.ndarray:
    offsets = array.offsets.to_numpy()
    return array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import zarr  # here, not at the top: most chunks have no arrays, and importing zarr costs a second

    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    for name, values in arrays.items():
        values = np.ascontiguousarray(values)
        row_bytes = max(1, values[0:1].nbytes) if len(values) else 1
        rows_per_chunk = max(1, min(len(values), ZARR_CHUNK_BYTES // row_bytes))
        array = group.create_array(
            name, shape=values.shape, dtype=values.dtype, chunks=(rows_per_chunk, *values.shape[1:])
        )
        array[...] = values


def _read_arrays(payloads: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Decode the zarr group from the verified bytes (an in-memory store): zarr reads nothing else from disk."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    prefix = f"{ARRAYS_DIR}/"
    buffer = default_buffer_prototype().buffer
    store = MemoryStore({k[len(prefix) :]: buffer.from_bytes(v) for k, v in payloads.items() if k.startswith(prefix)})
    group = zarr.open_group(store=store, mode="r", zarr_format=3)
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


def _open_checked(directory: Path, name: str, expected: dict[str, int], *, verify: bool) -> pa.OSFile:
    """The file `name` of a chunk, open for `pread`s, its length checked, and its CRC-32 when `verify` (read in
    pieces: the check holds one piece in memory, not the file)."""
    path = safe_join(directory, name)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ChunkCorruptError(f"chunk {directory}: {name} is not a regular file. {RECOVER_CHUNK}")
        file = pa.OSFile(os.fspath(path))
    except FileNotFoundError:
        raise _missing_error(directory, name) from None
    try:
        _check_length(directory, name, file.size(), expected)
        if verify and _crc32_of(file) != expected["crc32"]:
            raise _checksum_error(directory, name)
    except BaseException:
        file.close()
        raise
    return file


def _crc32_of(file: pa.OSFile) -> int:
    piece = bytearray(CRC_PIECE_BYTES)
    crc, offset, size = 0, 0, file.size()
    while offset < size:
        got = os.preadv(file.fileno(), [piece], offset)
        if got <= 0:
            break  # cut short while being read: the CRC of what is there fails
        crc = zlib.crc32(memoryview(piece)[:got], crc)
        offset += got
    return crc


def _read_verified(directory: Path, name: str, expected: dict[str, int], *, verify: bool) -> bytes:
    path = safe_join(directory, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing_error(directory, name) from None
    _check_length(directory, name, len(data), expected)
    if verify and zlib.crc32(data) != expected["crc32"]:
        raise _checksum_error(directory, name)
    return data


def _check_length(directory: Path, name: str, size: int, expected: dict[str, int]) -> None:
    if size != expected["bytes"]:
        raise ChunkTruncatedError(
            f"chunk {directory}: {name} has {size} bytes, expected {expected['bytes']} (truncated or "
            f"overwritten). {RECOVER_CHUNK}"
        )


def _missing_error(directory: Path, name: str) -> ChunkTruncatedError:
    return ChunkTruncatedError(f"chunk {directory}: file {name} is missing. {RECOVER_CHUNK}")


def _checksum_error(directory: Path, name: str) -> ChunkChecksumError:
    return ChunkChecksumError(
        f"chunk {directory}: {name} fails its CRC-32 check (the bytes changed after it was written). "
        f"{RECOVER_CHUNK}"
    )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
