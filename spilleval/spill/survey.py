"""The state of a spill directory, damaged or not: what is intact, what is not, and how to recover.

`SpillReader` stops at the first problem, which is right for computing metrics. `spilleval inspect` needs the
whole picture instead: every file is checked on its own (the same checks the reader makes, one chunk in memory at
a time), each problem is recorded with the message the reader would raise (it names the file, the problem and the
recovery), and completeness is counted over the intact chunks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..sampleset import SampleSet
from .chunk import verify_chunk
from .integrity import INTEGRITY_NAME, Seal, load_seal
from .manifest import (
    RESULTS_NAME,
    SCHEMA_VERSION,
    SHARD_DONE,
    TOKENIZER_DIR,
    ChunkRecord,
    Manifest,
    SpillFormatError,
    load_manifest,
)
from .reader import (
    Completeness,
    check_sequence,
    check_shard_done,
    check_tokenizer_files,
    chunk_entries,
    completeness_of,
    load_chunk,
    shard_dirs,
    shard_rank,
)
from .results import intervals_by_name, metrics_by_name, read_results_record

T = TypeVar("T")


@dataclass
class SpillSurvey:
    path: Path
    manifest: Manifest | None  # None when manifest.json is damaged
    sealed: bool  # integrity.json is present and readable
    chunks: list[ChunkRecord]  # the intact chunks
    chunks_damaged: int
    completeness: Completeness  # over the intact chunks
    results: dict[str, Any] | None  # results.json, when it verifies
    problems: list[str] = field(default_factory=list)  # one message per damaged file: what, where, how to recover
    notes: list[str] = field(default_factory=list)  # not damage: what a person should know (e.g. unverified files)
    intervals: dict[str, Any] = field(default_factory=dict)  # results.json's confidence intervals, by metric name

    @property
    def complete(self) -> bool:
        return self.completeness.complete

    @property
    def num_tokens(self) -> int:
        return sum(r.tokens for r in self.chunks)

    @property
    def num_rows(self) -> int:
        return sum(r.rows for r in self.chunks)

    @property
    def bytes_on_disk(self) -> int:
        return sum(r.bytes for r in self.chunks)


def survey(spill_dir: str | Path) -> SpillSurvey:
    """Check every part of `spill_dir` on its own; never raises for damage (only for a missing directory)."""
    path = Path(spill_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"spill directory {path} does not exist")
    problems: list[str] = []
    notes: list[str] = []
    manifest = _attempt(problems, lambda: load_manifest(path))
    seal = _attempt(problems, lambda: load_seal(path))
    seen, chunks, damaged, finished = SampleSet(), [], 0, {}
    for shard in shard_dirs(path):
        rank = _attempt(problems, lambda: shard_rank(shard))
        if rank is None:
            continue
        if manifest is not None and rank >= manifest.world_size:
            problems.append(f"{shard} is the shard of rank {rank}, but the manifest records a world size of "
                            f"{manifest.world_size}: the directory holds a shard of another run.")
        intact, lost = _survey_shard(shard, seen, problems)
        chunks += intact
        damaged += lost
        finished[rank] = (shard / SHARD_DONE).exists()
    if seal is not None:
        _passes(problems, seal.verify_shards)
        _passes(problems, seal.verify_tokenizer)
    if (path / TOKENIZER_DIR).is_dir():
        _passes(problems, lambda: check_tokenizer_files(path / TOKENIZER_DIR))
    record = _survey_results(path, manifest, seal, problems, notes)
    complete = (
        manifest is not None and manifest.status == "complete" and not problems
        and len(finished) == manifest.world_size and all(finished.values())
        and (seal is not None or manifest.schema_version < 2)
    )
    if manifest is not None and manifest.status == "complete" and seal is None and manifest.schema_version >= 2 \
            and not (path / INTEGRITY_NAME).exists():
        notes.append(f"{INTEGRITY_NAME} is missing: the run stopped while finishing (or the file was deleted), so "
                     "the metadata cannot be verified; the chunks are checked on their own. Read it with "
                     "--allow-partial, or resume the evaluation (resume=True) to finish and seal it.")
    expected = manifest.dataset_length if manifest is not None else None
    return SpillSurvey(path, manifest, seal is not None, chunks, damaged, completeness_of(seen, expected,
                       complete=complete),
                       metrics_by_name(record) if record else None, problems, notes,
                       intervals_by_name(record) if record else {})


def _survey_shard(shard: Path, seen: SampleSet, problems: list[str]) -> tuple[list[ChunkRecord], int]:
    """(intact chunks, damaged chunks) of one shard; the samples of the intact ones are added to `seen`."""
    records, damaged = [], 0
    for entry in chunk_entries(shard):
        record = _attempt(problems, lambda: load_chunk(shard, entry))
        index = None if record is None else _attempt(problems, lambda: verify_chunk(entry, record))
        if index is None:
            damaged += 1
            continue
        seen.add(index)
        records.append(record)
    records.sort(key=lambda r: r.seq)
    if damaged == 0:
        _passes(problems, lambda: check_sequence(shard, records))
        if (shard / SHARD_DONE).exists():
            _passes(problems, lambda: check_shard_done(shard, records))
    return records, damaged


def _survey_results(path: Path, manifest: Manifest | None, seal: Seal | None, problems: list[str],
                    notes: list[str]) -> dict[str, Any] | None:
    """results.json's record when it verifies against the seal."""
    results_path = path / RESULTS_NAME
    if not results_path.exists():
        return None
    if manifest is not None and manifest.schema_version >= 2 and (seal is None or not seal.covers(RESULTS_NAME)):
        notes.append(f"{RESULTS_NAME} is not covered by a seal (left by a run that did not finish, or written "
                     "after it): not shown. `spilleval compute` recomputes the metrics from the chunks.")
        return None
    if seal is not None and not _passes(problems, lambda: seal.verify_file(RESULTS_NAME)):
        return None
    version = manifest.schema_version if manifest is not None else SCHEMA_VERSION
    return _attempt(problems, lambda: read_results_record(results_path, version))


def _attempt(problems: list[str], step: Callable[[], T]) -> T | None:
    """Run one step; damage (a `SpillFormatError`, an unreadable file) is recorded as a problem: None."""
    try:
        return step()
    except (SpillFormatError, OSError) as e:
        problems.append(str(e))
        return None


def _passes(problems: list[str], check: Callable[[], Any]) -> bool:
    try:
        check()
    except (SpillFormatError, OSError) as e:
        problems.append(str(e))
        return False
    return True
