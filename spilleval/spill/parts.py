"""The parts of one evaluation directory: a run with `generation=` writes `<dir>/teacher_forced` and
`<dir>/generation`, two spills, and `trainer.last_spill_dir` names their parent. Commands that take a spill take
that parent too and treat each part in turn."""

from __future__ import annotations

import os
from pathlib import Path

from .manifest import MANIFEST_NAME

TEACHER_FORCED_PART = "teacher_forced"
GENERATION_PART = "generation"
EVALUATION_PARTS = (TEACHER_FORCED_PART, GENERATION_PART)  # in the order commands show them


def evaluation_parts(path: str | os.PathLike) -> dict[str, Path]:
    """{part name: spill} of an evaluation directory holding part spills; {} for a spill itself or anything else
    (the reader then says what it is)."""
    path = Path(path)
    if (path / MANIFEST_NAME).exists():
        return {}
    return {name: path / name for name in EVALUATION_PARTS if (path / name / MANIFEST_NAME).exists()}
