"""The seal of a finished spill: `integrity.json`, written last, holds the SHA-256 of every metadata file.

Chunks carry their own checks (`chunk.json` records the length and CRC-32 of each file, and every number in it is
held against the data it describes). The files around them did not: one changed byte in `results.json` showed as
the run's result, a flipped bit in the manifest silently changed what was computed. When a run finishes, the
writer seals the spill: `manifest.json`, every `shards/*/shard.json`, the tokenizer's files and, once written,
`results.json` are hashed into `integrity.json` (written atomically, after them). The reader checks each of these
files against the seal before it uses it.

A writer that continues a spill (resume) removes the seal first; a spill that a crash left unfinished has none and
is read as partial (`allow_partial=True`). Like the CRCs, the seal catches damage (a bad disk, a careless edit, a
truncated copy); someone who edits a spill on purpose can recompute it, and for them the reader's checks of every
declared size (`spilleval.spill.limits`) are what hold.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from .manifest import (
    MANIFEST_NAME,
    RESULTS_NAME,
    SHARD_DONE,
    SHARDS_DIR,
    TOKENIZER_DIR,
    SpillFormatError,
    write_json_atomic,
)
from .schema import STRICT, Count, parse

INTEGRITY_NAME = "integrity.json"


class IntegrityError(SpillFormatError):
    """A metadata file does not match the seal of the spill (`integrity.json`), or the seal itself is damaged."""


class SealedFile(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    bytes: Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class IntegrityFile(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    algorithm: Literal["sha256"]
    files: dict[Annotated[str, Field(min_length=1, max_length=1024)], SealedFile]


_SCHEMA = TypeAdapter(IntegrityFile)
UNVERIFIED = (
    "delete integrity.json: the spill then reads as partial (--allow-partial), its metadata unverified, each "
    "chunk still checked against its CRC-32s"
)


def recovery(name: str) -> str:
    """How to recover when the sealed file `name` (relative to the spill) is damaged."""
    if name == RESULTS_NAME:
        return ("To recover: the chunks are intact, `spilleval compute` recomputes the exact metrics (report and "
                "diff do so by themselves); resuming the evaluation (resume=True) writes results.json and the seal "
                "again.")
    if name.endswith(f"/{SHARD_DONE}"):
        return ("To recover, delete that shard.json and resume the evaluation (resume=True): it checks the "
                "committed chunks, then writes the shard record and the seal again.")
    if name.startswith(f"{TOKENIZER_DIR}/"):
        return ("To recover, restore the tokenizer (from a copy of the spill, or save the model's own tokenizer "
                f"there with save_pretrained), or {UNVERIFIED}.")
    if name == INTEGRITY_NAME:
        return f"To recover, {UNVERIFIED}; resuming the evaluation (resume=True) then seals it again."
    return f"To recover, restore {name} from a copy of the spill, or, if the change is wanted, {UNVERIFIED}."


@dataclass
class Seal:
    path: Path  # the spill directory
    files: dict[str, SealedFile]

    def covers(self, name: str) -> bool:
        return name in self.files

    def verify(self, name: str, data: bytes) -> None:
        """Raise `IntegrityError` unless `data` is what the seal records for `name` (a path relative to the spill)."""
        entry = self.files.get(name)
        if entry is None:
            raise self._not_covered(name)
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise self._changed(name, len(data))

    def verify_file(self, name: str) -> None:
        """`verify` of the file on disk; a file of the wrong length or kind is refused without being read."""
        path = self.path / name
        entry = self.files.get(name)
        if entry is None:
            raise self._not_covered(name)
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing but {INTEGRITY_NAME} seals it. {recovery(name)}") from None
        if not stat.S_ISREG(info.st_mode):
            raise IntegrityError(f"{path} is not a regular file (a link or a device); it was replaced after the "
                                 f"spill was sealed. {recovery(name)}")
        if info.st_size != entry["bytes"]:
            raise self._changed(name, info.st_size)
        with open(path, "rb") as f:
            self.verify(name, f.read(entry["bytes"] + 1))

    def _not_covered(self, name: str) -> IntegrityError:
        return IntegrityError(
            f"{self.path / name} is not covered by {self.path / INTEGRITY_NAME}: it was added after the spill was "
            f"sealed. {recovery(name)}"
        )

    def _changed(self, name: str, size: int) -> IntegrityError:
        return IntegrityError(
            f"{self.path / name} does not match its SHA-256 in {INTEGRITY_NAME} ({size:,} bytes, sealed "
            f"{self.files[name]['bytes']:,}): the file changed after the spill was sealed. {recovery(name)}"
        )

    def verify_tokenizer(self) -> None:
        """Every tokenizer file sealed, and no other: a file added there could change how ids decode.

        A spill sealed without a tokenizer may get one later (README: copy the model's tokenizer in with
        save_pretrained); the reader then checks only that its vocabulary fits the ids."""
        prefix = f"{TOKENIZER_DIR}/"
        sealed = {name for name in self.files if name.startswith(prefix)}
        if not sealed:
            return
        present = set(_tokenizer_files(self.path))
        for name in sorted(present | sealed):
            self.verify_file(name)

    def verify_shards(self) -> None:
        """Every shard's completion record sealed and intact, and none added or lost since."""
        prefix, suffix = f"{SHARDS_DIR}/", f"/{SHARD_DONE}"
        sealed = {name for name in self.files if name.startswith(prefix) and name.endswith(suffix)}
        present = {path.relative_to(self.path).as_posix() for path in (self.path / SHARDS_DIR).glob(f"*/{SHARD_DONE}")}
        for name in sorted(present | sealed):
            self.verify_file(name)


def load_seal(spill_dir: Path) -> Seal | None:
    """The seal of `spill_dir`, or None when it has none (unfinished, or written before seals existed)."""
    path = Path(spill_dir) / INTEGRITY_NAME
    if not path.exists():
        return None
    data = parse(path, _SCHEMA, IntegrityError, what="a valid integrity record", fix=recovery(INTEGRITY_NAME))
    return Seal(Path(spill_dir), data["files"])


def seal(spill_dir: Path) -> None:
    """Hash the metadata files of a finished spill into `integrity.json` (atomically; written after them)."""
    spill_dir = Path(spill_dir)
    names = [MANIFEST_NAME]
    names += sorted(p.relative_to(spill_dir).as_posix() for p in (spill_dir / SHARDS_DIR).glob(f"*/{SHARD_DONE}"))
    names += _tokenizer_files(spill_dir)
    names += [RESULTS_NAME] if (spill_dir / RESULTS_NAME).exists() else []
    files = {}
    for name in names:
        data = (spill_dir / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_json_atomic(spill_dir / INTEGRITY_NAME, {"algorithm": "sha256", "files": files})


def unseal(spill_dir: Path) -> None:
    """Remove the seal before a writer changes the spill again (resume)."""
    (Path(spill_dir) / INTEGRITY_NAME).unlink(missing_ok=True)


def _tokenizer_files(spill_dir: Path) -> list[str]:
    root = spill_dir / TOKENIZER_DIR
    if not root.is_dir():
        return []
    return sorted(p.relative_to(spill_dir).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
