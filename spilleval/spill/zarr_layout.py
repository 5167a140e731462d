"""What a chunk's zarr arrays declare (shapes, chunk grids, codecs, decoded sizes), checked before zarr decodes.

zarr allocates what the metadata declare: `array[...]` fills a declared shape (missing chunk files read as the fill
value), and the zstd codec allocates the content size each frame's header declares. A 635-byte `zarr.json` can
ask for gigabytes. A spill's arrays have one layout only (what `chunk._write_arrays` writes): a zarr v3 group of
arrays whose first axis is the chunk's samples, a regular chunk grid along that axis alone, and the `bytes` codec
optionally followed by `zstd`. Anything else is refused, and the decoded sizes are returned for the chunk's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, JsonValue, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from . import limits
from .schema import STRICT, Name, describe

ZARR_JSON = "zarr.json"
MAX_DIMS = 8
DATA_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "float32", "float64")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Dim = Annotated[int, Field(ge=0, le=2**40)]


class ZarrLayoutError(ValueError):
    """A chunk's zarr metadata or chunk files declare what a spill's arrays cannot be."""


class _GridConfig(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    chunk_shape: Annotated[list[Annotated[int, Field(ge=1, le=2**40)]], Field(min_length=1, max_length=MAX_DIMS)]


class _Grid(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Literal["regular"]
    configuration: _GridConfig


class _KeyConfig(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    separator: Literal["/"]


class _KeyEncoding(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Literal["default"]
    configuration: NotRequired[_KeyConfig]


class _BytesConfig(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    endian: Literal["little", "big"]


class _BytesCodec(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Literal["bytes"]
    configuration: NotRequired[_BytesConfig]


class _ZstdConfig(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    level: Annotated[int, Field(ge=-131072, le=22)]
    checksum: bool


class _ZstdCodec(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Literal["zstd"]
    configuration: _ZstdConfig


class ArrayMeta(TypedDict):
    """An array's `zarr.json` as a spill holds it."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    zarr_format: Literal[3]
    node_type: Literal["array"]
    shape: Annotated[list[Dim], Field(min_length=1, max_length=MAX_DIMS)]
    data_type: Literal[DATA_TYPES]  # type: ignore[valid-type]
    chunk_grid: _Grid
    chunk_key_encoding: _KeyEncoding
    fill_value: bool | int | float | Literal["NaN", "Infinity", "-Infinity"]
    codecs: tuple[_BytesCodec] | tuple[_BytesCodec, _ZstdCodec]
    attributes: NotRequired[dict[Name, JsonValue]]
    storage_transformers: NotRequired[Annotated[list[JsonValue], Field(max_length=0)]]
    dimension_names: NotRequired[Annotated[list[str | None], Field(max_length=MAX_DIMS)] | None]


class GroupMeta(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    zarr_format: Literal[3]
    node_type: Literal["group"]
    attributes: NotRequired[dict[Name, JsonValue]]
    consolidated_metadata: NotRequired[None]


_ARRAY = TypeAdapter(ArrayMeta)
_GROUP = TypeAdapter(GroupMeta)


@dataclass
class ArraysLayout:
    names: list[str]
    decoded_bytes: int  # what the arrays take once decoded, chunk buffers included


def check_arrays(payloads: dict[str, bytes], rows: int, *, prefix: str) -> ArraysLayout:
    """Check the zarr group held in `payloads` (relative name -> verified bytes; names under `prefix`)."""
    files = {name[len(prefix):]: data for name, data in payloads.items() if name.startswith(prefix)}
    if ZARR_JSON not in files:
        raise ZarrLayoutError(f"{prefix}{ZARR_JSON} (the group) is missing")
    _parse(_GROUP, files.pop(ZARR_JSON), f"{prefix}{ZARR_JSON}")
    by_array: dict[str, dict[str, bytes]] = {}
    for name, data in files.items():
        array, _, rest = name.partition("/")
        by_array.setdefault(array, {})[rest] = data
    decoded = 0
    for array, array_files in sorted(by_array.items()):
        if ZARR_JSON not in array_files:
            raise ZarrLayoutError(f"{prefix}{array}/ has no {ZARR_JSON}")
        meta = _parse(_ARRAY, array_files.pop(ZARR_JSON), f"{prefix}{array}/{ZARR_JSON}")
        decoded += _check_array(meta, array_files, rows, f"{prefix}{array}")
    return ArraysLayout(sorted(by_array), decoded)


def _parse(schema: TypeAdapter, data: bytes, name: str):
    if len(data) > limits.MAX_JSON_BYTES[ZARR_JSON]:
        raise ZarrLayoutError(f"{name} has {len(data):,} bytes, more than any zarr metadata of a spill")
    try:
        return schema.validate_json(data, strict=True)
    except ValidationError as e:
        raise ZarrLayoutError(f"{name} {describe(e, 'zarr metadata of a spill array')}") from None


def _check_array(meta: ArrayMeta, chunk_files: dict[str, bytes], rows: int, name: str) -> int:
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if shape[0] != rows:
        raise ZarrLayoutError(f"{name} declares {shape[0]} rows; the chunk has {rows}")
    if len(chunks) != len(shape) or list(chunks[1:]) != list(shape[1:]):
        raise ZarrLayoutError(f"{name}: chunk shape {chunks} does not cut shape {shape} along the samples only")
    itemsize = np.dtype(meta["data_type"]).itemsize
    row_bytes = itemsize * math.prod(shape[1:])
    chunk_bytes = row_bytes * chunks[0]
    grid = -(-rows // chunks[0])
    compressed = len(meta["codecs"]) == 2
    for key, data in chunk_files.items():
        if not _is_chunk_key(key, grid, len(shape)):
            raise ZarrLayoutError(f"{name}/{key} is not a chunk of this array")
        declared = _zstd_content_size(data, f"{name}/{key}") if compressed else len(data)
        if declared != chunk_bytes:
            raise ZarrLayoutError(f"{name}/{key} declares {declared} bytes; a chunk of this array has {chunk_bytes}")
    return row_bytes * rows + 2 * grid * chunk_bytes  # the array, and zarr's encoded and decoded chunk buffers


def _is_chunk_key(key: str, grid: int, ndim: int) -> bool:
    parts = key.split("/")
    if len(parts) != ndim + 1 or parts[0] != "c" or any(p != "0" for p in parts[2:]):
        return False
    return parts[1].isdigit() and len(parts[1]) < 20 and int(parts[1]) < grid and str(int(parts[1])) == parts[1]


def _zstd_content_size(data: bytes, name: str) -> int:
    """The content size a zstd frame header declares (RFC 8878 3.1.1.1); numcodecs allocates exactly that."""
    if len(data) < 6 or data[:4] != ZSTD_MAGIC:
        raise ZarrLayoutError(f"{name} is not a zstd frame")
    descriptor = data[4]
    size_flag, single_segment, dictionary_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(data) < position + width:
        raise ZarrLayoutError(f"{name}: its zstd frame does not declare its content size")
    size = int.from_bytes(data[position : position + width], "little")
    return size + 256 if width == 2 else size

