"""The self-describing part of a spill directory: `manifest.json` and the per-chunk records.

Layout of a spill directory::

    manifest.json                  schema version, task, vocab, id dtype, dataset length, metrics, versions
    tokenizer/                     the tokenizer (save_pretrained), when one was given
    results.json                   the live metrics of the run that wrote it, once it finished
    integrity.json                 the seal of a finished spill (`spill.integrity`), written last
    shards/rank-00000/chunk-000000/
        tokens.arrow               Arrow IPC: sample_index, pred_ids, label_ids, [label_logprob], [sample_nll],
                                   [label_positions], [dataset columns...]; each field's metadata says what it
                                   holds (`description`)
        arrays.zarr/               zarr v3 group: fixed-shape per-sample arrays, chunked along the sample axis
        chunk.json                 rows, tokens, sample index range, byte length and CRC-32 of every file

A chunk directory is written under a temporary name and renamed when complete, so a chunk is either absent or
whole. Nothing in the format is pickled; every path read from disk is checked to stay inside the directory.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import Field, JsonValue, TypeAdapter
from typing_extensions import NotRequired, TypedDict

from . import limits
from .schema import (
    STRICT,
    Count,
    FileEntry,
    Name,
    Rank,
    SampleIndex,
    Text,
    parse,
    parse_object,
    read_bounded,
)

SCHEMA_VERSION = 3  # 2: integrity.json seals a finished spill (manifest, results, shard records, tokenizer)
# 3: results.json holds {"metrics" (keys as reported), "provenance", "intervals"}; chunks may hold sample_nll,
# and label_positions (added without a new version: a reader that predates it sees an extra list column)
MANIFEST_NAME = "manifest.json"
RESULTS_NAME = "results.json"
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
CHUNK_RECORD = "chunk.json"
SHARD_DONE = "shard.json"  # written by a rank when its shard is complete
TOKENS_FILE = "tokens.arrow"
ARRAYS_DIR = "arrays.zarr"


class SpillFormatError(ValueError):
    """The directory is not a readable spill (unknown schema, corrupt or missing chunk, unsafe path)."""


class SchemaVersionError(SpillFormatError):
    """The manifest was written by a newer spilleval (or carries no schema version at all)."""


class ManifestError(SpillFormatError):
    """`manifest.json` is unreadable or does not describe a spill."""


class ChunkRecordError(SpillFormatError):
    """A chunk's `chunk.json` is unreadable or does not describe a chunk."""


RECOVER_CHUNK = (
    "To recover, delete this chunk directory and the later ones of its shard, then resume the evaluation "
    "(resume=True): their samples are evaluated again."
)


class UnsafePathError(SpillFormatError):
    """A file name read from spill metadata would point outside the spill directory."""


class MetricEntry(TypedDict):
    """A metric as the manifest records it: its registry name and its constructor parameters."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Name
    params: NotRequired[dict[Name, JsonValue]]


@dataclass
class Manifest:
    """`manifest.json`. The annotations are its schema too: `load_manifest` validates the file against them."""

    __pydantic_config__ = STRICT

    task: Name  # "causal_lm" | "seq2seq" | "generation" | "classification" | custom
    vocab_size: Annotated[int, Field(ge=1, le=limits.MAX_VOCAB)]
    id_dtype: Literal["uint16", "uint32"]
    dataset_length: Annotated[int, Field(ge=0, le=limits.MAX_SAMPLES)] | None = None
    world_size: Annotated[int, Field(ge=1, le=limits.MAX_WORLD_SIZE)] = 1
    metrics: list[MetricEntry] = field(default_factory=list)  # [{"name": ..., "params": {...}}]
    columns: list[Name] = field(default_factory=list)
    arrays: dict[Name, dict[Name, JsonValue]] = field(default_factory=dict)  # name -> {"shape": [...], "dtype": ...}
    has_logprob: bool = False
    # "writing" until every shard is complete, then "complete"; "partial": finished with samples missing
    status: Literal["writing", "complete", "partial"] = "writing"
    versions: dict[Name, Text] = field(default_factory=dict)
    schema_version: Annotated[int, Field(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION
    extra: dict[Name, JsonValue] = field(default_factory=dict)  # free-form, e.g. global step, metric prefix

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate a manifest already parsed from JSON (`load_manifest` reads the file itself)."""
        raw = json.dumps(data).encode()
        _check_schema_version(raw, Path(source))
        return _validate_manifest(raw, Path(source))


_MANIFEST_SCHEMA = TypeAdapter(Manifest)


@dataclass
class ChunkRecord:
    """What a committed chunk contains; `files` maps relative file names to {"bytes", "crc32"}."""

    __pydantic_config__ = STRICT

    rank: Rank
    seq: Count
    rows: Count
    tokens: Count
    min_index: SampleIndex
    max_index: SampleIndex
    files: dict[Annotated[str, Field(max_length=limits.MAX_NAME)], FileEntry]

    @property
    def name(self) -> str:
        return chunk_dir_name(self.seq)

    @property
    def bytes(self) -> int:
        return sum(entry["bytes"] for entry in self.files.values())


_CHUNK_RECORD_SCHEMA = TypeAdapter(ChunkRecord)


def load_chunk_record(path: Path) -> ChunkRecord:
    """Parse and type-check a `chunk.json`: a record from disk is untrusted input (names, numbers, files)."""
    record = parse(path, _CHUNK_RECORD_SCHEMA, ChunkRecordError, kind=CHUNK_RECORD, what="a valid chunk record",
                   fix=f"The chunk is corrupt. {RECOVER_CHUNK}")
    problem = None
    if TOKENS_FILE not in record.files:
        problem = f"lists no {TOKENS_FILE}"
    elif record.rows == 0:
        problem = "declares no rows (a committed chunk holds at least one sample)"
    elif record.min_index > record.max_index:
        problem = f"has min_index {record.min_index} > max_index {record.max_index}"
    if problem:
        raise ChunkRecordError(f"{path} {problem}; the chunk is corrupt. {RECOVER_CHUNK}")
    for name in record.files:
        check_chunk_file_name(name, path)
    return record


def check_chunk_file_name(name: str, record_path: Path) -> None:
    """A file of a chunk is `tokens.arrow` or a plain relative path under `arrays.zarr/`: nothing else."""
    path = PurePosixPath(name)
    canonical = path.as_posix() == name and not path.is_absolute()  # no "//", "./", trailing "/"
    plain = all(part != ".." and "\\" not in part and "\0" not in part for part in path.parts)
    if name == TOKENS_FILE or (canonical and plain and len(path.parts) > 1 and path.parts[0] == ARRAYS_DIR):
        return
    raise UnsafePathError(
        f"unsafe path {name!r} in spill metadata {record_path} points outside its chunk or names no chunk file; "
        f"refusing to read it (the spill directory was tampered with or is not a spilleval spill). {RECOVER_CHUNK}"
    )


def library_versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import torch
    import transformers
    import zarr

    from .. import __version__

    return {
        "spilleval": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "zarr": zarr.__version__,
    }


def shard_dir_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def chunk_dir_name(seq: int) -> str:
    return f"chunk-{seq:06d}"


def safe_join(root: Path, relative: str) -> Path:
    """Join a path read from disk onto `root`, refusing anything that would leave `root`."""
    candidate = Path(relative)
    resolved_root = root.resolve()
    try:
        resolved = (resolved_root / candidate).resolve()
    except (ValueError, OSError):  # NUL bytes, symlink loops
        resolved = None
    if candidate.is_absolute() or resolved is None or resolved == resolved_root or not resolved.is_relative_to(
        resolved_root
    ):
        raise UnsafePathError(
            f"unsafe path {relative!r} in spill metadata points outside {root}; refusing to read it (the spill "
            "directory was tampered with or is not a spilleval spill)"
        )
    return resolved


def create_temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty file beside `path` to write and then rename over it (an open fd and its path).

    Created like any other file, with the permissions the umask gives (0644 under umask 022), where `mkstemp`
    would make it 0600 and, once renamed, leave teammates and dashboard jobs unable to read the spill."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue  # another writer drew the same name (2^-48): draw again


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write JSON to a temp file, fsync, rename over `path`, fsync the directory (keys sorted unless their order
    means something, as the metrics' order in results.json does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RECOVER_MANIFEST = (
    "The chunks may be intact (`spilleval inspect` lists them), but a spill cannot be read without its manifest: "
    "restore manifest.json from a copy, or evaluate again into a new directory."
)


def load_manifest(spill_dir: Path) -> Manifest:
    """The validated manifest of `spill_dir`, checked against `integrity.json` when the spill is sealed."""
    path = Path(spill_dir) / MANIFEST_NAME
    if not path.exists():
        raise SpillFormatError(f"{spill_dir} has no {MANIFEST_NAME}: it is not a spill directory"
                               f"{spills_inside(Path(spill_dir))}")
    raw = read_bounded(path, ManifestError, kind=MANIFEST_NAME)
    _check_schema_version(raw, path)  # first: a newer spilleval's spill may also be sealed differently
    from .integrity import load_seal

    seal = load_seal(Path(spill_dir))
    if seal is not None:
        seal.verify(MANIFEST_NAME, raw)
    return _validate_manifest(raw, path)


def spills_inside(directory: Path) -> str:
    """"; it holds the spills ...: the latest is DIR/spill-eval-step-N" for a directory of spills (a trainer's
    output_dir), steps in numeric order (step 1000 after step 200); "" when it holds none."""
    names = sorted((p.parent.name for p in directory.glob(f"*/{MANIFEST_NAME}")), key=_spill_order)
    if not names:
        return ""
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:2])}, ..., {', '.join(names[-3:])}"
    return f"; it holds {len(names)} spill(s) ({shown}): the latest is {directory / names[-1]}"


def _spill_order(name: str) -> tuple[str, int, int]:
    """spill-eval-step-200 < spill-eval-step-1000 < spill-eval-step-1000-1 (a second evaluation at that step)."""
    match = re.fullmatch(r"(.*?)(\d+)(?:-(\d+))?", name)
    if match is None:
        return name, -1, 0
    return match.group(1), int(match.group(2)), int(match.group(3) or 0)


def _check_schema_version(raw: bytes, path: Path) -> None:
    data = parse_object(path, ManifestError, kind=MANIFEST_NAME, data=raw, fix=RECOVER_MANIFEST)
    version = data.get("schema_version")
    if type(version) is not int:
        raise SchemaVersionError(f"{path} has no integer schema_version; this is not a spilleval manifest")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} uses spill schema {version}, newer than this spilleval understands ({SCHEMA_VERSION}). "
            "Upgrade spilleval (pip install -U spilleval) to read it."
        )


def _validate_manifest(raw: bytes, path: Path) -> Manifest:
    """The manifest in `raw` (its schema version already checked), validated against the `Manifest` schema."""
    manifest = parse(path, _MANIFEST_SCHEMA, ManifestError, kind=MANIFEST_NAME, data=raw,
                     what="a valid spilleval manifest", fix=RECOVER_MANIFEST)
    expected_dtype = "uint16" if manifest.vocab_size <= 65_535 else "uint32"
    if manifest.id_dtype != expected_dtype:
        raise ManifestError(
            f"{path} is not a valid spilleval manifest: id_dtype {manifest.id_dtype} does not match vocab_size "
            f"{manifest.vocab_size} ({expected_dtype}). {RECOVER_MANIFEST}"
        )
    return manifest


def save_manifest(spill_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(spill_dir) / MANIFEST_NAME, manifest.to_json())
