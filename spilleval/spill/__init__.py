"""Stage 3 of the data path: the on-disk spill (Arrow IPC token rows + zarr arrays + a JSON manifest)."""

from .chunk import ChunkCorruptError
from .integrity import IntegrityError
from .manifest import (
    SCHEMA_VERSION,
    ChunkRecordError,
    Manifest,
    ManifestError,
    SpillFormatError,
    load_manifest,
)
from .reader import (
    Completeness,
    IncompleteSpillError,
    MissingChunkError,
    ShardRecordError,
    SpillReader,
)
from .writer import (
    SpillExistsError,
    SpillLockedError,
    SpillWriteError,
    SpillWriter,
    mark_spill_complete,
)

__all__ = [
    "SCHEMA_VERSION",
    "ChunkCorruptError",
    "ChunkRecordError",
    "Completeness",
    "IncompleteSpillError",
    "IntegrityError",
    "Manifest",
    "ManifestError",
    "MissingChunkError",
    "ShardRecordError",
    "SpillExistsError",
    "SpillFormatError",
    "SpillLockedError",
    "SpillReader",
    "SpillWriteError",
    "SpillWriter",
    "load_manifest",
    "mark_spill_complete",
]
