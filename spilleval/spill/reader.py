"""Read a spill directory back in bounded memory: by chunk, by sample batch, by sample index, or as Arrow.

Shards of every rank are merged; a sample that appears more than once (distributed samplers pad the last batch
with duplicates) is returned once, first occurrence in (rank, chunk) order. Memory is bounded by one chunk plus
one byte per dataset sample for that de-duplication.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..batch import SampleBatch
from .chunk import read_chunk, read_sample_index
from .manifest import (
    CHUNK_RECORD,
    RESULTS_NAME,
    SHARD_DONE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    ChunkRecord,
    ChunkRecordError,
    Manifest,
    SpillFormatError,
    chunk_dir_name,
    load_chunk_record,
    load_manifest,
    read_json,
    safe_join,
    shard_dir_name,
)


class IncompleteSpillError(SpillFormatError):
    """The spill is partial (the run crashed or is still running); reading it needs allow_partial=True."""


class MissingChunkError(SpillFormatError):
    """A chunk that the shard's sequence or completion record promises is not on disk."""


@dataclass
class Completeness:
    expected: int | None  # dataset length, when known
    committed: int  # unique samples on disk
    missing: list[tuple[int, int]]  # half-open ranges [start, stop) of missing sample indices
    complete: bool  # the writer(s) finished

    @property
    def missing_count(self) -> int:
        return sum(b - a for a, b in self.missing)


def scan_shard(shard_dir: Path) -> list[ChunkRecord]:
    """Committed chunks of one shard, in sequence order, checking that none is missing in between."""
    records = []
    for entry in sorted(shard_dir.iterdir()) if shard_dir.exists() else []:
        if not entry.is_dir() or not entry.name.startswith("chunk-"):
            continue
        record_path = safe_join(shard_dir, entry.name) / CHUNK_RECORD  # a chunk symlinked elsewhere is refused
        if not record_path.exists():
            raise ChunkRecordError(f"chunk {entry} has no {CHUNK_RECORD}; it was not written by spilleval")
        record = load_chunk_record(record_path)
        if record.name != entry.name or shard_dir_name(record.rank) != shard_dir.name:
            raise ChunkRecordError(
                f"{record_path} describes {shard_dir_name(record.rank)}/{record.name} but lies in "
                f"{shard_dir.name}/{entry.name}; the chunk was moved or tampered with."
            )
        records.append(record)
    records.sort(key=lambda r: r.seq)
    for expected_seq, record in enumerate(records):
        if record.seq != expected_seq:
            raise MissingChunkError(
                f"{shard_dir}: {chunk_dir_name(expected_seq)} is missing (found {record.name} after it). "
                "The spill lost a committed chunk. To recover, delete the chunk directories after the gap, then "
                "resume the evaluation (resume=True): their samples are evaluated again."
            )
    done = shard_dir / SHARD_DONE
    if done.exists():
        promised = int(read_json(done).get("chunks", len(records)))
        if promised > len(records):
            raise MissingChunkError(
                f"{shard_dir}: {chunk_dir_name(len(records))} is missing ({promised} chunks were committed, "
                f"{len(records)} are on disk). Resume the evaluation (resume=True) to re-evaluate the samples "
                "they held."
            )
    return records


class SpillReader:
    """Bounded-memory access to a spill directory.

    Raises `IncompleteSpillError` for a partial spill unless `allow_partial=True`. With `verify=True` (the
    default) each chunk's files are checked against their recorded length and CRC-32 as they are read.
    """

    def __init__(self, spill_dir: str | os.PathLike, *, allow_partial: bool = False, verify: bool = True) -> None:
        self.path = Path(spill_dir)
        if not self.path.is_dir():
            raise FileNotFoundError(f"spill directory {self.path} does not exist")
        self.manifest: Manifest = load_manifest(self.path)
        self.verify = verify
        self.allow_partial = allow_partial
        self.chunks: list[ChunkRecord] = []
        self._shard_done: dict[int, bool] = {}
        self._index_cache: dict[tuple[int, int], np.ndarray] = {}
        shards_root = self.path / SHARDS_DIR
        for shard in sorted(shards_root.iterdir()) if shards_root.exists() else []:
            if shard.is_dir() and shard.name.startswith("rank-"):
                records = scan_shard(shard)
                self.chunks.extend(records)
                self._shard_done[int(shard.name.split("-")[1])] = (shard / SHARD_DONE).exists()
        if not self.is_complete and not allow_partial:
            c = self.completeness()
            why = ("the evaluation finished without covering every sample" if self.manifest.status == "partial"
                   else "the run crashed or is still running")
            raise IncompleteSpillError(
                f"{self.path} is a partial spill ({c.committed} of {c.expected or '?'} samples committed; {why}). "
                "Pass allow_partial=True (CLI: --allow-partial) to use what is "
                "there, or resume the evaluation with resume=True."
            )

    # ------------------------------------------------------------------------------------------- metadata
    @property
    def is_complete(self) -> bool:
        return self.manifest.status == "complete" and all(self._shard_done.values())

    @property
    def num_tokens(self) -> int:
        """Supervised tokens on disk (duplicates from padding included)."""
        return sum(r.tokens for r in self.chunks)

    @property
    def num_rows(self) -> int:
        """Rows on disk, duplicates from padding included; `len(reader)` counts unique samples."""
        return sum(r.rows for r in self.chunks)

    @property
    def bytes_on_disk(self) -> int:
        return sum(f["bytes"] for r in self.chunks for f in r.files.values())

    def __len__(self) -> int:
        return self.completeness().committed

    def chunk_path(self, record: ChunkRecord) -> Path:
        return safe_join(self.path, f"{SHARDS_DIR}/rank-{record.rank:05d}/{record.name}")

    def results(self) -> dict[str, Any] | None:
        """The live metrics of the run that wrote this spill, if it finished."""
        path = self.path / RESULTS_NAME
        return read_json(path) if path.exists() else None

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The tokenizer saved in the directory, loaded without remote code. None when there is none."""
        path = self.path / TOKENIZER_DIR
        if not path.is_dir():
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except (ValueError, OSError) as e:  # e.g. it asks for custom code: a spill never runs code it carries
            raise SpillFormatError(
                f"the tokenizer in {path} cannot be loaded ({str(e).splitlines()[0].strip()}). spilleval loads it "
                "with trust_remote_code=False: it never runs code that a spill carries. Save the model's own "
                "tokenizer there instead (tokenizer.save_pretrained)."
            ) from e

    def completeness(self) -> Completeness:
        seen = self._seen_bitmap(self._index_upper_bound())
        for record in self.chunks:
            seen[read_sample_index(self.chunk_path(record), record, verify=self.verify)] = True
        expected = self.manifest.dataset_length
        committed = int(seen.sum())
        missing = _missing_ranges(seen, expected) if expected is not None else []
        return Completeness(expected=expected, committed=committed, missing=missing, complete=self.is_complete)

    # ------------------------------------------------------------------------------------------- iteration
    def iter_chunks(self, *, columns: Sequence[str] | None = None, with_arrays: bool = True,
                    with_logprob: bool = True) -> Iterator[SampleBatch]:
        """Every unique sample once, one chunk at a time (duplicates from distributed padding dropped).

        `columns` (None: all), `with_arrays` and `with_logprob` choose what is decoded besides the ids."""
        seen = self._seen_bitmap(self._index_upper_bound())
        for record in self.chunks:
            batch = read_chunk(
                self.chunk_path(record), record, verify=self.verify, columns=columns, with_arrays=with_arrays,
                with_logprob=with_logprob,
            )
            fresh = ~seen[batch.sample_index]
            # a sample may also repeat inside one chunk (padding of a rank's last batch)
            _, first = np.unique(batch.sample_index, return_index=True)
            keep = np.zeros(len(batch), dtype=bool)
            keep[first] = True
            keep &= fresh
            seen[batch.sample_index] = True
            if not keep.all():
                batch = batch.take(np.flatnonzero(keep))
            if len(batch):
                yield batch

    def iter_batches(
        self,
        batch_size: int = 1024,
        *,
        decode: bool = False,
        columns: Sequence[str] | None = None,
        with_arrays: bool = True,
        with_logprob: bool = True,
    ) -> Iterator[SampleBatch]:
        """Samples in batches of `batch_size` (re-cut across chunks); with decode=True, text is attached."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        pending: list[SampleBatch] = []
        count = 0
        for chunk in self.iter_chunks(columns=columns, with_arrays=with_arrays, with_logprob=with_logprob):
            pending.append(chunk)
            count += len(chunk)
            while count >= batch_size:
                merged = SampleBatch.concat(pending)
                yield self._maybe_decode(merged.slice(0, batch_size), decode)
                rest = merged.slice(batch_size, len(merged))  # views: a chunk is never copied once per batch
                pending, count = ([rest] if len(rest) else []), len(rest)
        if count:
            yield self._maybe_decode(SampleBatch.concat(pending), decode)

    def get(self, sample_index: int) -> SampleBatch:
        """One sample by its dataset index (reads only the chunks whose index range holds it)."""
        for record in self.chunks:
            if record.min_index <= sample_index <= record.max_index:
                index = self._chunk_index(record)
                rows = np.flatnonzero(index == sample_index)
                if len(rows):
                    batch = read_chunk(self.chunk_path(record), record, verify=self.verify)
                    return batch.take(rows[:1])
        raise KeyError(f"sample {sample_index} is not in the spill {self.path}")

    def table(self, start: int | None = None, stop: int | None = None) -> pa.Table:
        """Samples with start <= sample_index < stop as a `pyarrow.Table`, sorted by sample_index."""
        import pyarrow.compute as pc

        from .chunk import batch_to_table

        lo = -1 if start is None else start
        hi = np.iinfo(np.int64).max if stop is None else stop
        parts = []
        for batch in self.iter_chunks(with_arrays=False):
            rows = np.flatnonzero((batch.sample_index >= lo) & (batch.sample_index < hi))
            if len(rows):
                parts.append(batch_to_table(batch.take(rows)))
        if not parts:
            return self._empty_table()
        table = pa.concat_tables(parts, promote_options="default")
        return table.take(pc.sort_indices(table, sort_keys=[("sample_index", "ascending")]))

    def decode(self, batch: SampleBatch) -> SampleBatch:
        """Attach decoded text to a batch with the directory's tokenizer."""
        from ..decode import decode_batch

        return decode_batch(batch, self.require_tokenizer())

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise SpillFormatError(
                f"{self.path} has no tokenizer/ directory, but a text metric needs one to decode ids. Pass "
                "tokenizer=... when evaluating, or copy a tokenizer into it: tokenizer.save_pretrained("
                f"'{self.path / TOKENIZER_DIR}')."
            )
        from ..decode import check_tokenizer_vocab

        check_tokenizer_vocab(self.tokenizer, self.manifest.vocab_size)
        return self.tokenizer

    # ------------------------------------------------------------------------------------------- helpers
    def _maybe_decode(self, batch: SampleBatch, decode: bool) -> SampleBatch:
        return self.decode(batch) if decode else batch

    def _chunk_index(self, record: ChunkRecord) -> np.ndarray:
        key = (record.rank, record.seq)
        if key not in self._index_cache:
            if len(self._index_cache) >= 64:
                self._index_cache.pop(next(iter(self._index_cache)))
            self._index_cache[key] = read_sample_index(self.chunk_path(record), record, verify=self.verify)
        return self._index_cache[key]

    def _index_upper_bound(self) -> int:
        top = max((r.max_index + 1 for r in self.chunks), default=0)
        return max(top, self.manifest.dataset_length or 0)

    @staticmethod
    def _seen_bitmap(size: int) -> np.ndarray:
        return np.zeros(size, dtype=bool)

    def _empty_table(self) -> pa.Table:
        from .chunk import batch_to_table
        from ..batch import id_dtype_for_vocab

        dtype = id_dtype_for_vocab(self.manifest.vocab_size)
        empty = SampleBatch(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, dtype), np.zeros(0, dtype))
        return batch_to_table(empty)


def _missing_ranges(seen: np.ndarray, expected: int) -> list[tuple[int, int]]:
    flags = np.zeros(expected + 2, dtype=np.int8)
    flags[1 : expected + 1] = ~seen[:expected]
    edges = np.flatnonzero(np.diff(flags))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]

