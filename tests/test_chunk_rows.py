"""A chunk's tokens.arrow is cut into record batches of `RECORD_BATCH_ROWS` rows, and `ChunkRows` decodes only the
record batches that hold the rows asked for: a worker of the parallel recompute decodes its tasks' rows, not the
whole chunk. Any range reads exactly as the same rows of the whole chunk, in the default layout and in chunks
written as one record batch (as every chunk was before)."""

from __future__ import annotations

import dataclasses
import glob
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_manifest, random_batch, write_spill
from hypothesis import given, settings
from hypothesis import strategies as st

from spilleval.batch import SampleBatch
from spilleval.metrics import compute_from_spill
from spilleval.metrics.parallel import TaskPlanner
from spilleval.metrics.pool import local_executor, shutdown
from spilleval.spill import SpillReader, chunk
from spilleval.spill.chunk import RECORD_BATCH_ROWS, ChunkCorruptError, ChunkRows, read_chunk
from spilleval.spill.ipc_layout import read_ipc_index

ROWS = 2 * RECORD_BATCH_ROWS + 37


def one_chunk_spill(path: Path) -> Path:
    """ROWS samples in one chunk, with log-probs and a dataset column of strings."""
    batch = random_batch(np.random.default_rng(0), ROWS, logprob=True, max_len=6)
    batch.columns = {"note": [f"sample {i}" * (i % 3) for i in range(ROWS)]}
    return write_spill(path, [batch], make_manifest(dataset_length=ROWS, has_logprob=True, columns=["note"]),
                       chunk_rows=ROWS)


@pytest.fixture(scope="module")
def spills(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chunk_rows")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunk, "RECORD_BATCH_ROWS", 1 << 30)  # one record batch per chunk, the layout before
        single = one_chunk_spill(root / "single")
    return {"default": one_chunk_spill(root / "default"), "single": single}


def tokens_file(spill: Path) -> pa.ipc.RecordBatchFileReader:
    (path,) = glob.glob(str(spill / "shards/*/chunk-*/tokens.arrow"))
    return pa.ipc.open_file(path)


def test_tokens_arrow_holds_record_batches_of_the_default_rows(spills):
    default = tokens_file(spills["default"])
    assert [default.get_batch(i).num_rows for i in range(default.num_record_batches)] == \
        [RECORD_BATCH_ROWS, RECORD_BATCH_ROWS, 37]
    assert tokens_file(spills["single"]).num_record_batches == 1


def assert_same_rows(part: SampleBatch, whole: SampleBatch) -> None:
    np.testing.assert_array_equal(part.sample_index, whole.sample_index)
    np.testing.assert_array_equal(part.offsets, whole.offsets)
    np.testing.assert_array_equal(part.pred_ids, whole.pred_ids)
    np.testing.assert_array_equal(part.label_ids, whole.label_ids)
    np.testing.assert_array_equal(part.label_logprob, whole.label_logprob)
    assert part.columns == whole.columns


class Decoded:
    """The record batches a `ChunkRows` decodes (its file reader, wrapped)."""

    def __init__(self, file: pa.ipc.RecordBatchFileReader) -> None:
        self.file, self.schema, self.asked = file, file.schema, []

    def get_batch(self, i: int) -> pa.RecordBatch:
        self.asked.append(i)
        return self.file.get_batch(i)


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(["default", "single"]), start=st.integers(0, ROWS - 1), length=st.integers(1, 2500),
       then=st.integers(0, ROWS - 1))
def test_any_range_reads_as_those_rows_of_the_whole_chunk(spills, layout, start, length, then):
    reader = SpillReader(spills[layout])
    (record,) = reader.chunks
    whole = read_chunk(reader.chunk_path(record), record)
    rows = ChunkRows(reader.chunk_path(record), record)
    rows._file = decoded = Decoded(rows._file)
    for first in (start, then):  # a second range after the first: what a worker's next task does
        stop = min(first + length, ROWS)
        decoded.asked.clear()
        assert_same_rows(rows.rows(first, stop).to_batch(), whole.slice(first, stop))
        if layout == "default" and (first, stop) != (0, ROWS):  # only the record batches that hold the rows
            assert set(decoded.asked) <= set(range(first // RECORD_BATCH_ROWS, (stop - 1) // RECORD_BATCH_ROWS + 1))


def test_a_whole_chunk_read_is_one_piece_per_column(spills):
    """`read_chunk` of a chunk of several record batches gives numpy arrays over one buffer each, as before."""
    reader = SpillReader(spills["default"])
    (record,) = reader.chunks
    table = ChunkRows(reader.chunk_path(record), record).rows(0, ROWS).table
    assert all(column.num_chunks == 1 for column in table.columns)


def test_default_settings_workers_match_the_rows(spills):
    """Default chunk, record batch and task sizes, 2 workers: tasks start and end inside record batches of 4,096
    rows, and the numbers are one worker's and those of the rows themselves."""
    reader = SpillReader(spills["default"])
    (record,) = reader.chunks
    rows = read_chunk(reader.chunk_path(record), record)
    metrics = ["token_accuracy", "sequence_exact_match", "loss_percentiles"]
    one = compute_from_spill(spills["default"], metrics, workers=1)
    assert compute_from_spill(spills["default"], metrics, workers=2) == one
    assert one["token_accuracy"] == np.mean(rows.pred_ids == rows.label_ids)
    starts = [t.start for t in TaskPlanner(reader, 2).tasks()]
    assert any(s % RECORD_BATCH_ROWS for s in starts)  # tasks begin inside record batches


def with_tokens(directory: Path, record: chunk.ChunkRecord, data: bytes) -> chunk.ChunkRecord:
    """`data` written as the chunk's tokens.arrow, and its record with that file's length and CRC-32, as a crafted
    spill's would be."""
    (directory / "tokens.arrow").write_bytes(data)
    return dataclasses.replace(record, files={**record.files,
                                              "tokens.arrow": {"bytes": len(data), "crc32": zlib.crc32(data)}})


def test_a_crafted_record_batch_is_refused_when_its_rows_are_read(spills, tmp_path):
    """A chunk whose second record batch holds sample indices outside its record's range (its CRC made valid, as a
    crafted file's would be): the first batch's rows read, the second's raise a named error, as does the whole."""
    reader = SpillReader(spills["default"])
    (record,) = reader.chunks
    directory = tmp_path / "chunk"
    shutil.copytree(reader.chunk_path(record), directory)
    table = pa.ipc.open_file(directory / "tokens.arrow").read_all()
    index = table.column("sample_index").to_numpy().copy()
    index[RECORD_BATCH_ROWS + 5] = record.max_index + 1_000
    table = table.set_column(0, table.schema.field(0), pa.array(index))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table, max_chunksize=RECORD_BATCH_ROWS)
    data = sink.getvalue().to_pybytes()
    crafted = with_tokens(directory, record, data)
    rows = ChunkRows(directory, crafted)
    assert len(rows.rows(0, 100).to_batch()) == 100
    for start, stop in ((RECORD_BATCH_ROWS, RECORD_BATCH_ROWS + 10), (0, ROWS)):
        with pytest.raises(ChunkCorruptError, match="sample indices"):
            rows.rows(start, stop)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_chunk_rewritten_under_its_name_is_read_again(tmp_path, workers):
    """A process keeps its reader and last chunk between tasks, and between computes (in-process, or a pool that
    outlives them): a chunk rewritten under the same rank and sequence number (as compaction renumbers chunks) is
    read again, not served from the copy kept."""
    rng = np.random.default_rng(1)
    first, second = (random_batch(rng, 50, p_correct=p) for p in (0.2, 0.9))
    for name, batch in (("first", first), ("second", second)):
        write_spill(tmp_path / name, [batch], make_manifest(dataset_length=50))
    spill = tmp_path / "spill"
    pool = local_executor(workers)
    try:
        for batch in (first, second):
            shutil.rmtree(spill, ignore_errors=True)
            shutil.copytree(tmp_path / ("first" if batch is first else "second"), spill)
            got = compute_from_spill(spill, ["token_accuracy"], executor=pool, workers=workers)
            assert got["token_accuracy"] == np.mean(batch.pred_ids == batch.label_ids)
    finally:
        shutdown(pool)


def damaged_last_batch(spill: Path, directory: Path) -> Path:
    """A copy of the spill's chunk with a byte of its last record batch's body changed (the record's CRC-32 left
    as it was, so the file fails its check)."""
    shutil.copytree(Path(glob.glob(str(spill / "shards/*/chunk-*"))[0]), directory)
    tokens = directory / "tokens.arrow"
    data = bytearray(tokens.read_bytes())
    data[len(data) - 2_000] ^= 0xFF  # before the footer, after the first record batches (checked by the caller)
    tokens.write_bytes(bytes(data))
    return directory


def test_rows_are_read_from_their_record_batches_only(spills, tmp_path):
    """`ChunkRows` reads tokens.arrow a record batch at a time: where the caller checked the CRC-32 already
    (`tokens_verified`, as the parallel recompute's workers, whose parent checked it), rows of an intact record
    batch read exactly though another batch of the file is damaged; without it, the damage is found before
    anything is decoded."""
    reader = SpillReader(spills["default"])
    (record,) = reader.chunks
    whole = read_chunk(reader.chunk_path(record), record)
    directory = damaged_last_batch(spills["default"], tmp_path / "chunk")
    with ChunkRows(directory, record, tokens_verified=True) as rows:
        assert_same_rows(rows.rows(10, 4_000).to_batch(), whole.slice(10, 4_000))
        with pytest.raises(ChunkCorruptError):  # the damage is in the rows of the last record batch
            rows.rows(ROWS - 5, ROWS).to_batch()
    with pytest.raises(chunk.ChunkChecksumError, match="tokens.arrow fails its CRC-32 check"):
        ChunkRows(directory, record)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_chunk_is_named_by_the_parallel_recompute(spills, tmp_path, workers):
    """The workers leave tokens.arrow's CRC-32 to the parent's planner, which checks each chunk before handing out
    its rows: damage is still a named error, whatever the number of workers."""
    spill = tmp_path / "spill"
    shutil.copytree(spills["default"], spill)
    chunk_dir = Path(glob.glob(str(spill / "shards/*/chunk-*"))[0])
    shutil.rmtree(chunk_dir)
    damaged_last_batch(spills["default"], chunk_dir)
    with pytest.raises(chunk.ChunkChecksumError, match="tokens.arrow fails its CRC-32 check"):
        compute_from_spill(spill, ["token_accuracy"], workers=workers)


def test_a_record_batch_declaring_gigabytes_is_refused_before_it_is_decoded(spills, tmp_path):
    """The workers' `ChunkRows` (`tokens_verified`: the parent checked every header of the file) reads each record
    batch's header when it first decodes that batch. A crafted last record batch (valid CRC) whose first buffer
    declares a terabyte once decompressed: the rows of the other batches read, the last batch's rows raise the
    decode budget's error before pyarrow allocates anything; a full check (no `tokens_verified`) refuses the
    chunk when it is opened."""
    reader = SpillReader(spills["default"])
    (record,) = reader.chunks
    directory = tmp_path / "chunk"
    shutil.copytree(reader.chunk_path(record), directory)
    data = bytearray((directory / "tokens.arrow").read_bytes())
    offset, meta_length, _ = read_ipc_index(bytes(data)).blocks[-1]
    body = offset + meta_length  # the first non-empty buffer starts the body, its uncompressed length first
    assert int.from_bytes(data[body:body + 8], "little", signed=True) > 0
    data[body:body + 8] = (1 << 40).to_bytes(8, "little", signed=True)
    crafted = with_tokens(directory, record, bytes(data))
    whole = read_chunk(reader.chunk_path(record), record)
    with ChunkRows(directory, crafted, tokens_verified=True) as rows:
        assert_same_rows(rows.rows(5, 2 * RECORD_BATCH_ROWS).to_batch(), whole.slice(5, 2 * RECORD_BATCH_ROWS))
        for start, stop in ((ROWS - 3, ROWS), (0, ROWS)):
            with pytest.raises(ChunkCorruptError, match="declare 1,09[\\d,]* bytes once decoded"):
                rows.rows(start, stop)
    with pytest.raises(ChunkCorruptError, match="decompression bomb"):
        ChunkRows(directory, crafted)
