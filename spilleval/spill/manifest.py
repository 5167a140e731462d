"""The self-describing part of a spill directory: `manifest.json` and the per-chunk records.

Layout of a spill directory::

    manifest.json                  schema version, task, vocab, id dtype, dataset length, metrics, versions
    tokenizer/                     the tokenizer (save_pretrained), when one was given
    results.json                   the live metrics of the run that wrote it, once it finished
    shards/rank-00000/chunk-000000/
        tokens.arrow               Arrow IPC: sample_index, pred_ids, label_ids, [label_logprob], [columns...]
        arrays.zarr/               zarr v3 group: fixed-shape per-sample arrays, chunked along the sample axis
        chunk.json                 rows, tokens, sample index range, byte length and CRC-32 of every file

A chunk directory is written under a temporary name and renamed when complete, so a chunk is either absent or
whole. Nothing in the format is pickled; every path read from disk is checked to stay inside the directory.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
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


class ChunkRecordError(SpillFormatError):
    """A chunk's `chunk.json` is unreadable or does not describe a chunk."""


RECOVER_CHUNK = (
    "To recover, delete this chunk directory and the later ones of its shard, then resume the evaluation "
    "(resume=True): their samples are evaluated again."
)


class UnsafePathError(SpillFormatError):
    """A file name read from spill metadata would point outside the spill directory."""


@dataclass
class Manifest:
    task: str  # "causal_lm" | "seq2seq" | "generation" | "classification" | custom
    vocab_size: int
    id_dtype: str  # "uint16" | "uint32"
    dataset_length: int | None = None
    world_size: int = 1
    metrics: list[dict[str, Any]] = field(default_factory=list)  # [{"name": ..., "params": {...}}]
    columns: list[str] = field(default_factory=list)
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"shape": [...], "dtype": ...}
    has_logprob: bool = False
    status: str = "writing"  # "writing" until every shard is complete, then "complete"
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. global step, metric prefix

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = MANIFEST_NAME) -> "Manifest":
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise SchemaVersionError(f"{source} has no integer schema_version; this is not a spilleval manifest")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{source} uses spill schema {version}, newer than this spilleval understands ({SCHEMA_VERSION}). "
                "Upgrade spilleval (pip install -U spilleval) to read it."
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ChunkRecord:
    """What a committed chunk contains; `files` maps relative file names to {"bytes", "crc32"}."""

    rank: int
    seq: int
    rows: int
    tokens: int
    min_index: int
    max_index: int
    files: dict[str, dict[str, int]]

    @property
    def name(self) -> str:
        return chunk_dir_name(self.seq)


def load_chunk_record(path: Path) -> ChunkRecord:
    """Parse and type-check a `chunk.json`: a record from disk is untrusted input (names, numbers, files)."""
    try:
        data = read_json(path)
    except SpillFormatError as e:
        raise ChunkRecordError(f"{e}. {RECOVER_CHUNK}") from e
    ints = ("rank", "seq", "rows", "tokens", "min_index", "max_index")
    files = data.get("files") if isinstance(data, dict) else None
    valid = (
        isinstance(data, dict)
        and set(data) == {*ints, "files"}
        and all(type(data[k]) is int and data[k] >= 0 for k in ints)
        and isinstance(files, dict)
        and TOKENS_FILE in files
        and all(isinstance(name, str) and _is_file_entry(entry) for name, entry in files.items())
    )
    if not valid:
        raise ChunkRecordError(
            f"{path} is not a valid chunk record (expected integer {', '.join(ints)} and a files map of "
            f"{{name: {{bytes, crc32}}}}); the chunk is corrupt. {RECOVER_CHUNK}"
        )
    return ChunkRecord(**data)


def _is_file_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and set(entry) == {"bytes", "crc32"} and all(
        type(v) is int and v >= 0 for v in entry.values()
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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync, rename over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpillFormatError(f"{path} is not valid JSON ({e}); the file is corrupt") from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_manifest(spill_dir: Path) -> Manifest:
    path = Path(spill_dir) / MANIFEST_NAME
    if not path.exists():
        parts = sorted(p.parent.name for p in Path(spill_dir).glob(f"*/{MANIFEST_NAME}"))
        hint = f"; it holds the spills {', '.join(parts)}: pass {Path(spill_dir) / parts[0]}" if parts else ""
        raise SpillFormatError(f"{spill_dir} has no {MANIFEST_NAME}: it is not a spill directory{hint}")
    return Manifest.from_json(read_json(path), source=str(path))


def save_manifest(spill_dir: Path, manifest: Manifest) -> None:
    write_json_atomic(Path(spill_dir) / MANIFEST_NAME, manifest.to_json())
