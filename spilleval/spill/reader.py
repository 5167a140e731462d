"""Read a spill directory back in bounded memory: by chunk, by sample batch, by sample index, or as Arrow.

Shards of every rank are merged; a sample that appears more than once (distributed samplers pad the last batch
with duplicates) is returned once, first occurrence in (rank, chunk) order. Memory is bounded by one chunk plus
a sparse set of the samples met so far for that de-duplication (`spilleval.sampleset`: at most one bit per sample
present, a few bytes per contiguous run), whatever the manifest declares.

A spill may come from anyone. Every JSON file is validated against its schema (`spill.schema`), a finished
spill's metadata against its seal (`spill.integrity`), and every chunk's declared sizes against its record and
a plausible bound before anything is decoded (`spill.chunk`, `spill.limits`): bad input is a `SpillFormatError`
naming the file and the problem, never a traceback or an allocation the spill asked for.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ..batch import SampleBatch
from ..sampleset import SampleSet
from . import limits
from .chunk import read_chunk, read_sample_index
from .integrity import INTEGRITY_NAME, Seal, load_seal
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
    safe_join,
    shard_dir_name,
)
from .results import intervals_by_name, metrics_by_name, read_results_record
from .schema import SHARD_DONE_SCHEMA, parse


class IncompleteSpillError(SpillFormatError):
    """The spill is partial (the run crashed or is still running); reading it needs allow_partial=True."""


class MissingChunkError(SpillFormatError):
    """A chunk that the shard's sequence or completion record promises is not on disk."""


class ShardRecordError(SpillFormatError):
    """A shard's `shard.json` is unreadable or disagrees with the chunks on disk."""


@dataclass
class Completeness:
    expected: int | None  # dataset length, when known
    committed: int  # unique samples on disk
    missing: list[tuple[int, int]]  # the first `limits.MAX_MISSING_RANGES` half-open ranges [start, stop) missing
    complete: bool  # the writer(s) finished
    missing_count: int = 0  # samples of [0, expected) not on disk (exact, however many ranges)


SHARD_PREFIX, CHUNK_PREFIX = "rank-", "chunk-"
RECOVER_SHARD = (
    "To recover, delete that shard.json and resume the evaluation (resume=True): it checks the committed chunks and "
    "writes the record again."
)


def shard_rank(shard_dir: Path) -> int:
    """The rank a shard directory is named for (`rank-00003` -> 3)."""
    digits = shard_dir.name[len(SHARD_PREFIX) :]
    if not (digits.isdigit() and len(digits) == 5):
        raise ShardRecordError(f"{shard_dir} is not a shard directory of a spill (expected rank-NNNNN)")
    return int(digits)


def scan_shard(shard_dir: Path) -> list[ChunkRecord]:
    """Committed chunks of one shard, in sequence order, checking that none is missing in between."""
    records = sorted((load_chunk(shard_dir, entry) for entry in chunk_entries(shard_dir)), key=lambda r: r.seq)
    check_sequence(shard_dir, records)
    if (shard_dir / SHARD_DONE).exists():
        check_shard_done(shard_dir, records)
    return records


def chunk_entries(shard_dir: Path) -> list[Path]:
    """The committed chunk directories of a shard (a chunk being written has a temporary name)."""
    if not shard_dir.exists():
        return []
    return sorted(entry for entry in shard_dir.iterdir() if entry.name.startswith(CHUNK_PREFIX) and entry.is_dir())


def load_chunk(shard_dir: Path, entry: Path) -> ChunkRecord:
    """The validated record of one chunk directory, which must lie where the record says."""
    record_path = safe_join(shard_dir, entry.name) / CHUNK_RECORD  # a chunk symlinked elsewhere is refused
    if not record_path.exists():
        raise ChunkRecordError(f"chunk {entry} has no {CHUNK_RECORD}; it was not written by spilleval")
    record = load_chunk_record(record_path)
    if record.name != entry.name or shard_dir_name(record.rank) != shard_dir.name:
        raise ChunkRecordError(
            f"{record_path} describes {shard_dir_name(record.rank)}/{record.name} but lies in "
            f"{shard_dir.name}/{entry.name}; the chunk was moved or tampered with."
        )
    return record


def check_sequence(shard_dir: Path, records: list[ChunkRecord]) -> None:
    """Chunks are numbered from 0 without gaps; `records` sorted by sequence number."""
    for expected_seq, record in enumerate(records):
        if record.seq != expected_seq:
            raise MissingChunkError(
                f"{shard_dir}: {chunk_dir_name(expected_seq)} is missing (found {record.name} after it). "
                "The spill lost a committed chunk. To recover, delete the chunk directories after the gap, then "
                "resume the evaluation (resume=True): their samples are evaluated again."
            )


def check_shard_done(shard_dir: Path, records: list[ChunkRecord]) -> None:
    """`shard.json` (what the rank committed) must describe exactly the chunks on disk."""
    path = shard_dir / SHARD_DONE
    done = parse(path, SHARD_DONE_SCHEMA, ShardRecordError, what="a valid shard record", fix=RECOVER_SHARD)
    promised = done["chunks"]
    if promised > len(records):
        raise MissingChunkError(
            f"{shard_dir}: {chunk_dir_name(len(records))} is missing ({promised} chunks were committed, "
            f"{len(records)} are on disk). Resume the evaluation (resume=True) to re-evaluate the samples "
            "they held."
        )
    on_disk = {"rank": shard_rank(shard_dir), "chunks": len(records), "rows": sum(r.rows for r in records),
               "tokens": sum(r.tokens for r in records)}
    differ = [key for key in on_disk if done[key] != on_disk[key]]
    if differ:
        key = differ[0]
        raise ShardRecordError(
            f"{path} records {key} {done[key]}, but the shard's chunks on disk hold {on_disk[key]}: the record or "
            f"the chunks changed after the rank finished. {RECOVER_SHARD}"
        )


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
        self.seal: Seal | None = load_seal(self.path)
        self.verify = verify
        self.allow_partial = allow_partial
        self.chunks: list[ChunkRecord] = []
        self._shard_done: dict[int, bool] = {}
        self._index_cache: dict[tuple[int, int], np.ndarray] = {}
        self.progress: Any = None  # a spilleval.progress.PassProgress: bars for iter_batches passes
        if self.seal is not None:
            self.seal.verify_shards()
        for shard in shard_dirs(self.path):
            rank = shard_rank(shard)
            if rank >= self.manifest.world_size:
                raise ShardRecordError(
                    f"{shard} is the shard of rank {rank}, but the manifest records a world size of "
                    f"{self.manifest.world_size}: the directory holds a shard of another run."
                )
            self.chunks.extend(scan_shard(shard))
            self._shard_done[rank] = (shard / SHARD_DONE).exists()
        if not self.is_complete and not allow_partial:
            c = self.completeness()
            raise IncompleteSpillError(
                f"{self.path} is a partial spill ({c.committed} of {c.expected or '?'} samples committed; "
                f"{self.incomplete_reason()}). Pass allow_partial=True (CLI: --allow-partial) to use what is "
                "there, or resume the evaluation with resume=True."
            )

    # ------------------------------------------------------------------------------------------- metadata
    @property
    def is_complete(self) -> bool:
        """Every rank finished its shard, the run marked the spill complete, and sealed it (schema 2 on)."""
        every_rank = len(self._shard_done) == self.manifest.world_size and all(self._shard_done.values())
        sealed = self.seal is not None or self.manifest.schema_version < 2
        return self.manifest.status == "complete" and every_rank and sealed

    def incomplete_reason(self) -> str:
        if self.manifest.status == "partial":
            return "the evaluation finished without covering every sample"
        if self.manifest.status == "complete" and self.seal is None:
            return (f"{INTEGRITY_NAME} is missing: the run stopped while finishing, or the file was deleted, so the "
                    "metadata cannot be verified")
        return "the run crashed or is still running"

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
        """The live metrics of the run that wrote this spill, by metric name (without a trainer's `eval_` prefix),
        if it finished and they verify against the seal.

        None when there are none, or none that can be trusted: written by a run that did not seal the spill (it
        stopped, or a resumed run has not finished yet). `IntegrityError` when they changed after the seal."""
        record = self.results_record()
        return None if record is None else metrics_by_name(record)

    def intervals(self) -> dict[str, Any]:
        """The run's confidence intervals by metric name ({} when none were stored or results do not verify)."""
        record = self.results_record()
        return {} if record is None else intervals_by_name(record)

    def results_record(self) -> dict[str, Any] | None:
        """The whole `results.json` (metrics as the run reported them, intervals, provenance); None as `results`."""
        path = self.path / RESULTS_NAME
        if not path.exists():
            return None
        if self.manifest.schema_version >= 2:
            if self.seal is None or not self.seal.covers(RESULTS_NAME):
                return None
            self.seal.verify_file(RESULTS_NAME)
        return read_results_record(path, self.manifest.schema_version)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The tokenizer saved in the directory, loaded without remote code. None when there is none."""
        path = self.path / TOKENIZER_DIR
        if not path.is_dir():
            return None
        if self.seal is not None:
            self.seal.verify_tokenizer()
        check_tokenizer_files(path)
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except (ValueError, OSError) as e:  # e.g. it asks for custom code: a spill never runs code it carries
            raise SpillFormatError(
                f"the tokenizer in {path} cannot be loaded ({_first_line(e)}). spilleval loads it "
                "with trust_remote_code=False: it never runs code that a spill carries. Save the model's own "
                "tokenizer there instead (tokenizer.save_pretrained)."
            ) from e
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on bad files
            raise SpillFormatError(
                f"the tokenizer in {path} cannot be loaded ({type(e).__name__}: {_first_line(e)}); its files are "
                "corrupt. Save the model's own tokenizer there (tokenizer.save_pretrained), or compute metrics on "
                "ids only."
            ) from e

    @functools.cached_property
    def display_tokenizer(self) -> Any:
        """The saved tokenizer for showing decoded text: loaded with the `tokenizers` library alone (no torch
        import) when that decodes exactly as transformers does (`spill.light_tokenizer`), else `tokenizer`."""
        path = self.path / TOKENIZER_DIR
        if "tokenizer" in self.__dict__ or not path.is_dir():
            return self.tokenizer
        if self.seal is not None:
            self.seal.verify_tokenizer()
        check_tokenizer_files(path)
        from .light_tokenizer import load_light_tokenizer

        return load_light_tokenizer(path) or self.tokenizer

    def completeness(self) -> Completeness:
        seen = SampleSet()
        for record in self.chunks:
            seen.add(read_sample_index(self.chunk_path(record), record, verify=self.verify))
        return completeness_of(seen, self.manifest.dataset_length, complete=self.is_complete)

    # ------------------------------------------------------------------------------------------- iteration
    def iter_chunks(self, *, columns: Sequence[str] | None = None, with_arrays: bool = True,
                    with_logprob: bool = True) -> Iterator[SampleBatch]:
        """Every unique sample once, one chunk at a time (duplicates from distributed padding dropped).

        `columns` (None: all), `with_arrays` and `with_logprob` choose what is decoded besides the ids."""
        seen = SampleSet()
        for record in self.chunks:
            batch = read_chunk(
                self.chunk_path(record), record, verify=self.verify, columns=columns, with_arrays=with_arrays,
                with_logprob=with_logprob,
            )
            keep = seen.first_occurrences(batch.sample_index)  # a sample may also repeat inside one chunk
            if keep is not None:
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
        """Samples in batches of `batch_size` (re-cut across chunks); with decode=True, text is attached.

        With `progress` set (a `spilleval.progress.PassProgress`), the pass draws a bar."""
        batches = self._batches(batch_size, decode=decode, columns=columns, with_arrays=with_arrays,
                                with_logprob=with_logprob)
        return self.progress.track(batches) if self.progress is not None else batches

    def _batches(self, batch_size: int, *, decode: bool, columns: Sequence[str] | None, with_arrays: bool,
                 with_logprob: bool) -> Iterator[SampleBatch]:
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

    def require_tokenizer(self, *, light: bool = False) -> Any:
        """The saved tokenizer, checked against the spill's vocabulary. `light`: for a process that only decodes,
        the `display_tokenizer` (no torch import where it decodes as transformers does)."""
        self.check_has_tokenizer()
        from ..decode import check_tokenizer_vocab

        tokenizer = self.display_tokenizer if light else self.tokenizer
        check_tokenizer_vocab(tokenizer, self.manifest.vocab_size)
        return tokenizer

    def check_has_tokenizer(self) -> None:
        """Fail, naming the fix, when the spill has no tokenizer (without loading it)."""
        if not (self.path / TOKENIZER_DIR).is_dir():
            raise SpillFormatError(
                f"{self.path} has no tokenizer/ directory, but a text metric needs one to decode ids. Pass "
                "tokenizer=... when evaluating, or copy a tokenizer into it: tokenizer.save_pretrained("
                f"'{self.path / TOKENIZER_DIR}')."
            )

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

    def _empty_table(self) -> pa.Table:
        from ..batch import id_dtype_for_vocab
        from .chunk import batch_to_table

        dtype = id_dtype_for_vocab(self.manifest.vocab_size)
        empty = SampleBatch(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, dtype), np.zeros(0, dtype))
        return batch_to_table(empty)


def shard_dirs(spill_dir: Path) -> list[Path]:
    """The shard directories of a spill (`shards/rank-NNNNN`), sorted by rank."""
    root = Path(spill_dir) / SHARDS_DIR
    if not root.exists():
        return []
    return sorted(entry for entry in root.iterdir() if entry.name.startswith(SHARD_PREFIX) and entry.is_dir())


def completeness_of(seen: SampleSet, expected: int | None, *, complete: bool) -> Completeness:
    """What `seen` (the unique samples on disk) covers of a dataset of `expected` samples."""
    if expected is None:
        return Completeness(expected=None, committed=len(seen), missing=[], complete=complete)
    missing = seen.missing_ranges(expected, limit=limits.MAX_MISSING_RANGES)
    return Completeness(expected=expected, committed=len(seen), missing=missing, complete=complete,
                        missing_count=expected - seen.count_range(0, expected))


def check_tokenizer_files(path: Path) -> None:
    """The tokenizer directory holds plain files of plausible size: no links (to /dev/zero, or out of the spill)."""
    for entry in path.rglob("*"):
        info = entry.lstat()
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise SpillFormatError(f"{entry} is not a regular file (a link or a device); a spill's tokenizer is "
                                   "saved as plain files. Save the model's own tokenizer there (save_pretrained).")
        if info.st_size > limits.MAX_TOKENIZER_FILE_BYTES:
            raise SpillFormatError(f"{entry} has {info.st_size:,} bytes, more than any tokenizer file "
                                   f"({limits.MAX_TOKENIZER_FILE_BYTES:,}); it is corrupt or was crafted.")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__

