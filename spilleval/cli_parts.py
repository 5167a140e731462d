"""Commands on an evaluation directory with parts (`<dir>/teacher_forced`, `<dir>/generation`, what
`trainer.last_spill_dir` names after a run with `generation=`): the command runs once per part, under a heading
per part; with --json the parts' outputs become one object, `{"spill": dir, "parts": {part: output}}`.

Commands that write a file get one file per part: `report -o report.html` writes `report-teacher_forced.html` and
`report-generation.html`; `export` likewise (`-o -` cannot hold two parts: name a part).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from .spill.parts import evaluation_parts


def per_part(console: Console, *, output: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command whose first argument is `spill_dir`; `output`: the name of its output-file option."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            parts = evaluation_parts(kwargs["spill_dir"])
            if not parts:
                return command(**kwargs)
            calls = {name: {**kwargs, "spill_dir": path, **_part_output(kwargs, output, name)}
                     for name, path in parts.items()}
            if kwargs.get("as_json"):
                _print_merged_json(command, kwargs["spill_dir"], calls)
                return None
            _run_sections(console, command, {f"{name}: {call['spill_dir']}": call for name, call in calls.items()})
            return None

        return run

    return decorate


def per_part_pair(console: Console) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command of two spills (`dir_a`, `dir_b`): two evaluation directories compare part by part."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            parts_a, parts_b = evaluation_parts(kwargs["dir_a"]), evaluation_parts(kwargs["dir_b"])
            if not parts_a and not parts_b:
                return command(**kwargs)
            if parts_a.keys() != parts_b.keys():
                raise typer.BadParameter(
                    f"{kwargs['dir_a']} holds the parts {_names(parts_a)} and {kwargs['dir_b']} the parts "
                    f"{_names(parts_b)}: compare two evaluation directories with the same parts, or two spills "
                    "(e.g. <dir>/generation)"
                )
            calls = {name: {**kwargs, "dir_a": parts_a[name], "dir_b": parts_b[name]} for name in parts_a}
            if kwargs.get("as_json"):
                _print_merged_json(command, f"{kwargs['dir_a']} vs {kwargs['dir_b']}", calls)
                return None
            _run_sections(console, command, calls)
            return None

        return run

    return decorate


def _run_sections(console: Console, command: Callable[..., Any], calls: dict[str, dict[str, Any]]) -> None:
    """Each part under its heading; a part that fails (e.g. inspect's damaged spill) does not hide the next."""
    failure: BaseException | None = None
    for title, call in calls.items():
        console.rule(escape(title))
        try:
            command(**call)
        except Exception as error:  # noqa: BLE001 - re-raised once every part was shown
            failure = failure or error
    if failure is not None:
        raise failure


def _part_output(kwargs: dict[str, Any], option: str | None, part: str) -> dict[str, Any]:
    """The output file of one part: `<stem>-<part><suffix>` (None stays None: the command names it)."""
    if option is None or kwargs.get(option) is None:
        return {}
    value = kwargs[option]
    if str(value) == "-":
        raise typer.BadParameter(
            f"-o - writes one stream, but {kwargs['spill_dir']} holds several parts: name one "
            f"({', '.join(str(Path(kwargs['spill_dir']) / p) for p in evaluation_parts(kwargs['spill_dir']))}) or "
            "write files"
        )
    path = Path(value)
    named = path.with_name(f"{path.stem}-{part}{path.suffix}")
    return {option: named if isinstance(value, Path) else str(named)}


def _print_merged_json(command: Callable[..., Any], spill: Any, calls: dict[str, dict[str, Any]]) -> None:
    """Run each part with its JSON captured, then print them as one JSON object."""
    merged: dict[str, Any] = {}
    failure: BaseException | None = None
    for name, call in calls.items():
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                command(**call)
        except Exception as error:  # noqa: BLE001 - e.g. inspect's damaged-spill error: print every part first
            failure = failure or error
        text = captured.getvalue()
        merged[name] = json.loads(text) if text.strip() else None
    print(json.dumps({"spill": str(spill), "parts": merged}, ensure_ascii=False, indent=2))
    if failure is not None:
        raise failure


def _names(parts: dict[str, Path]) -> str:
    return ", ".join(parts) or "none (it is a spill)"
