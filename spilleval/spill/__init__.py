"""Stage 3 of the data path: the on-disk spill (Arrow IPC token rows + zarr arrays + a JSON manifest)."""

from .chunk import ChunkCorruptError
from .manifest import SCHEMA_VERSION, Manifest, SpillFormatError, load_manifest
from .reader import Completeness, IncompleteSpillError, MissingChunkError, SpillReader
from .writer import SpillExistsError, SpillLockedError, SpillWriteError, SpillWriter, mark_spill_complete

__all__ = [
    "SCHEMA_VERSION",
    "ChunkCorruptError",
    "Completeness",
    "IncompleteSpillError",
    "Manifest",
    "MissingChunkError",
    "SpillExistsError",
    "SpillFormatError",
    "SpillLockedError",
    "SpillReader",
    "SpillWriteError",
    "SpillWriter",
    "load_manifest",
    "mark_spill_complete",
]
