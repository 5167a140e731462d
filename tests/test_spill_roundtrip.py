"""What the reader returns is bit-exact what was written, whatever the chunking."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_manifest, random_batch, split_batch, write_spill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spilleval.batch import SampleBatch
from spilleval.spill import SpillReader

SPECIAL_FLOATS = np.array([0.0, -0.0, -np.inf, np.nan, -1e-45, -3.4e38], dtype=np.float32)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # any unicode but lone surrogates


def assert_bit_exact(got: SampleBatch, want: SampleBatch) -> None:
    np.testing.assert_array_equal(got.sample_index, want.sample_index)
    np.testing.assert_array_equal(got.offsets - got.offsets[0], want.offsets - want.offsets[0])
    for name in ("pred_ids", "label_ids"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w)
    if want.label_logprob is None:
        assert got.label_logprob is None
    else:  # compare bits: NaN, -0.0 and infinities included
        assert got.label_logprob.dtype == np.float32
        np.testing.assert_array_equal(got.label_logprob.view(np.uint32), want.label_logprob.view(np.uint32))
    assert got.columns == want.columns
    assert sorted(got.arrays) == sorted(want.arrays)
    for name, values in want.arrays.items():
        assert got.arrays[name].dtype == values.dtype and got.arrays[name].shape == values.shape
        np.testing.assert_array_equal(got.arrays[name].view(np.uint8), values.view(np.uint8))


@st.composite
def spill_cases(draw):
    """A random dataset (ids, log-probs, string / list-of-string / int columns, zarr arrays) and a chunking."""
    n = draw(st.integers(1, 40))
    vocab = draw(st.sampled_from([50, 65_535, 65_536, 200_000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = random_batch(rng, n, vocab_size=vocab, max_len=draw(st.integers(0, 30)), logprob=draw(st.booleans()))
    if batch.label_logprob is not None and len(batch.label_logprob):
        where = rng.random(len(batch.label_logprob)) < 0.2
        batch.label_logprob[where] = rng.choice(SPECIAL_FLOATS, size=int(where.sum()))
    batch.sample_index = rng.permutation(draw(st.integers(n, 3 * n)))[:n]  # any order, gaps allowed
    if draw(st.booleans()):
        batch.columns["references"] = draw(st.lists(st.lists(TEXT, max_size=3), min_size=n, max_size=n))
        batch.columns["question"] = draw(st.lists(TEXT, min_size=n, max_size=n))
        batch.columns["answer_id"] = rng.integers(-5, 10**12, size=n).tolist()
    if draw(st.booleans()):
        batch.arrays["class_scores"] = rng.standard_normal((n, 3)).astype(np.float32)
        batch.arrays["top_ids"] = rng.integers(0, vocab, size=(n, 2, 2)).astype(np.int64)
    write_size = draw(st.integers(1, n))  # how the evaluation loop fed the writer
    chunk_rows = draw(st.integers(1, n))  # from one sample per chunk to everything in one chunk
    return batch, vocab, write_size, chunk_rows


def write_and_read(directory: Path, batch: SampleBatch, vocab: int, write_size: int, chunk_rows: int) -> SpillReader:
    manifest = make_manifest(vocab, has_logprob=batch.label_logprob is not None,
                             columns=sorted(batch.columns), dataset_length=int(batch.sample_index.max()) + 1)
    write_spill(directory, split_batch(batch, write_size), manifest, chunk_rows=chunk_rows)
    return SpillReader(directory)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spill_cases())
def test_reader_returns_exactly_what_was_written(case):
    batch, vocab, write_size, chunk_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        reader = write_and_read(Path(tmp) / "spill", batch, vocab, write_size, chunk_rows)
        n = len(batch)
        assert len(reader.chunks) == -(-n // chunk_rows)
        assert reader.num_rows == n and reader.num_tokens == batch.num_tokens

        chunks = list(reader.iter_chunks())
        assert all(len(c) <= chunk_rows for c in chunks)
        assert_bit_exact(SampleBatch.concat(chunks), batch)

        for size in {1, 3, n}:
            assert_bit_exact(SampleBatch.concat(list(reader.iter_batches(size))), batch)

        for i in (0, n // 2, n - 1):
            assert_bit_exact(reader.get(int(batch.sample_index[i])), batch.take(np.array([i])))

        order = np.argsort(batch.sample_index)
        table = reader.table()
        assert table.column("sample_index").to_pylist() == batch.sample_index[order].tolist()
        assert table.column("pred_ids").to_pylist() == [batch.row(int(i))[0].tolist() for i in order]


def test_subset_of_columns_and_no_arrays(tmp_path):
    rng = np.random.default_rng(0)
    batch = random_batch(rng, 10, logprob=True)
    batch.columns = {"references": [["a", "b"]] * 10, "question": ["q"] * 10}
    batch.arrays = {"class_scores": rng.random((10, 4)).astype(np.float32)}
    reader = write_and_read(tmp_path / "spill", batch, 1000, 4, 3)
    for got in reader.iter_batches(10, columns=["references"], with_arrays=False):
        assert list(got.columns) == ["references"] and got.arrays == {}
        np.testing.assert_array_equal(got.pred_ids, batch.pred_ids)
        np.testing.assert_array_equal(got.label_logprob, batch.label_logprob)
    for got in reader.iter_batches(10, columns=[], with_arrays=False, with_logprob=False):  # ids only
        assert got.columns == {} and got.arrays == {} and got.label_logprob is None
        np.testing.assert_array_equal(got.label_ids, batch.label_ids)


def test_table_slices_by_sample_index(tmp_path):
    rng = np.random.default_rng(1)
    batch = random_batch(rng, 30)
    batch.sample_index = rng.permutation(30)
    reader = write_and_read(tmp_path / "spill", batch, 1000, 7, 5)
    table = reader.table(10, 20)
    assert isinstance(table, pa.Table)
    assert table.column("sample_index").to_pylist() == list(range(10, 20))
    assert reader.table(100, 200).num_rows == 0
    with pytest.raises(KeyError, match="sample 31 is not in the spill"):
        reader.get(31)


def test_chunk_files_are_plain_arrow_ipc_readable_by_other_tools(tmp_path):
    """The format promise: polars (and anything Arrow) reads a chunk file as it is, no spilleval needed."""
    polars = pytest.importorskip("polars")
    rng = np.random.default_rng(2)
    batch = random_batch(rng, 6)
    batch.columns = {"references": [["x", "y"]] * 6}
    reader = write_and_read(tmp_path / "spill", batch, 1000, 6, 6)
    frame = polars.read_ipc(next((tmp_path / "spill").rglob("tokens.arrow")))
    assert frame["sample_index"].to_list() == batch.sample_index.tolist()
    assert frame["label_ids"].to_list() == [batch.row(i)[1].tolist() for i in range(6)]
    assert frame["references"].to_list() == [["x", "y"]] * 6
    assert reader.is_complete
