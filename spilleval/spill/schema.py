"""Read a spill's JSON files against their schemas (pydantic): parsed, type-checked and bounded in one step.

Each file is read only up to its size bound (`limits.MAX_JSON_BYTES`), parsed by pydantic's JSON parser (which
refuses nesting deeper than 200 levels instead of recursing), validated strictly (no `"1"` for 1, no 1.0 for an
integer, no true for a number) against a schema that rejects unknown and missing keys and out-of-range numbers.
A file that does not pass raises the caller's `SpillFormatError` subclass with one line naming the file and the
first problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from . import limits

T = TypeVar("T")

STRICT = ConfigDict(extra="forbid", strict=True)

Count = Annotated[int, Field(ge=0, le=limits.MAX_SEQ)]
Rank = Annotated[int, Field(ge=0, lt=limits.MAX_WORLD_SIZE)]
SampleIndex = Annotated[int, Field(ge=0, lt=limits.MAX_SAMPLES)]
Name = Annotated[str, Field(min_length=1, max_length=limits.MAX_NAME)]
Text = Annotated[str, Field(max_length=limits.MAX_NAME)]


class FileEntry(TypedDict):
    """Length and CRC-32 of one file of a chunk, as `chunk.json` records them."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    bytes: Count
    crc32: Annotated[int, Field(ge=0, le=2**32 - 1)]


class ShardDone(TypedDict):
    """`shard.json`: what a rank committed, written when its shard is complete."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    rank: Rank
    chunks: Count
    rows: Count
    tokens: Count


SHARD_DONE_SCHEMA = TypeAdapter(ShardDone)
class ResultsRecord(TypedDict):
    """`results.json` (schema 3): the metrics under the keys the run reported them (a trainer's `eval_` prefix
    included), their confidence intervals when computed, and what produced them (`spilleval.provenance`)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    metrics: dict[Name, JsonValue]
    provenance: dict[Name, JsonValue]
    intervals: NotRequired[dict[Name, JsonValue]]


RESULTS_SCHEMA = TypeAdapter(ResultsRecord)
LEGACY_RESULTS_SCHEMA = TypeAdapter(dict[Name, JsonValue])  # schema 1 and 2: the metrics alone, unprefixed
_OBJECT = TypeAdapter(dict[str, JsonValue])


def read_bounded(path: Path, error: type[Exception], *, kind: str | None = None) -> bytes:
    """The bytes of a metadata file, refusing one larger than its bound before reading it."""
    bound = limits.MAX_JSON_BYTES[kind or path.name]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > bound:
            raise error(f"{path} has {size:,} bytes, more than a spilleval {kind or path.name} ever holds "
                        f"({bound:,}); the file is corrupt or was crafted")
        return f.read(bound + 1)


def parse(path: Path, schema: TypeAdapter[T], error: type[Exception], *, kind: str | None = None,
          what: str = "", fix: str = "", data: bytes | None = None) -> T:
    """`path` validated against `schema`, or `error` naming the file and its first problem (and `fix`)."""
    raw = read_bounded(path, error, kind=kind) if data is None else data
    try:
        return schema.validate_json(raw, strict=True)
    except ValidationError as e:
        raise error(f"{path} {describe(e, what or 'valid')}.{' ' + fix if fix else ''}") from None


def parse_object(path: Path, error: type[Exception], *, kind: str | None = None, fix: str = "",
                 data: bytes | None = None) -> dict[str, Any]:
    """Any JSON object (bounded in size and depth), e.g. to read a schema version before the full schema."""
    return parse(path, _OBJECT, error, kind=kind, what="a JSON object", fix=fix, data=data)


def describe(error: ValidationError, what: str) -> str:
    """The first problem of a validation error as one clause: "is not valid JSON (...)", "lacks the key x"..."""
    first = error.errors(include_url=False)[0]
    kind, location = first["type"], ".".join(str(part) for part in first["loc"])
    if kind == "json_invalid":
        text = f"is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})"
    elif kind == "missing":
        text = f"is not {what}: the required key {location!r} is missing"
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        text = f"is not {what}: unknown key {location!r}"
    elif not location:
        text = f"is not {what}: {first['msg'].lower()}"
    else:
        text = f"is not {what}: {location} {_shorten(first['msg'].lower())} (got {_shorten(repr(first['input']))})"
    more = error.error_count() - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

