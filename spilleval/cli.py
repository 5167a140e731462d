"""The `spilleval` command: recompute metrics from a spill directory and inspect it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="spilleval",
    help="Exact, memory-bounded evaluation: recompute and inspect spilled predictions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SpillDir = typer.Argument(..., exists=True, file_okay=False, help="A spill directory written by spilleval.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
PluginOpt = typer.Option(None, "--plugin", help="Import this module first (it may register custom metrics).")


def _load_plugins(plugins: Optional[list[str]]) -> None:
    for module in plugins or []:
        importlib.import_module(module)


def _fmt(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


@app.command()
def compute(
    spill_dir: Path = SpillDir,
    metrics: Optional[str] = typer.Option(
        None, "--metrics", "-m", help="Comma-separated metric names (default: those recorded in the spill)."
    ),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Compute on a partial spill (after a crash)."),
    as_json: bool = JsonOpt,
    plugin: Optional[list[str]] = PluginOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Recompute metrics from the directory alone (tokenizer and metric settings are read from it)."""
    from .metrics import compute_from_spill
    from .spill import SpillReader

    _load_plugins(plugin)
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    show_progress = not quiet and not as_json and sys.stderr.isatty()
    results = compute_from_spill(spill_dir, names, allow_partial=allow_partial, progress=show_progress)
    partial_note = None
    if allow_partial:
        completeness = SpillReader(spill_dir, allow_partial=True).completeness()
        if not completeness.complete:
            partial_note = (
                f"PARTIAL: computed on {completeness.committed} of {completeness.expected or '?'} samples "
                f"({completeness.missing_count} missing)"
            )
    if as_json:
        payload = {"metrics": results}
        if partial_note:
            payload["partial"] = True
            payload["note"] = partial_note
        console.print_json(json.dumps(payload))
        return
    if partial_note:
        console.print(f"[bold yellow]{partial_note}[/]")
    table = Table("metric", "value", title=str(spill_dir))
    for key, value in results.items():
        table.add_row(key, _fmt(value))
    console.print(table)


@app.command()
def inspect(spill_dir: Path = SpillDir, as_json: bool = JsonOpt) -> None:
    """Manifest, sample and token counts, bytes per supervised token, chunks and completeness."""
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=True)
    completeness = reader.completeness()
    tokens = reader.num_tokens
    info = {
        "manifest": reader.manifest.to_json(),
        "samples_committed": completeness.committed,
        "samples_expected": completeness.expected,
        "missing": completeness.missing_count,
        "missing_ranges": completeness.missing[:20],
        "complete": completeness.complete,
        "rows_on_disk": reader.num_rows,
        "supervised_tokens": tokens,
        "chunks": len(reader.chunks),
        "bytes_on_disk": reader.bytes_on_disk,
        "bytes_per_token": reader.bytes_on_disk / tokens if tokens else None,
        "results": reader.results(),
    }
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    m = reader.manifest
    table = Table(show_header=False, title=f"spill {spill_dir}")
    for key, value in [
        ("status", "complete" if completeness.complete else "[bold yellow]PARTIAL[/]"),
        ("task", m.task),
        ("schema version", m.schema_version),
        ("vocab size / id dtype", f"{m.vocab_size} / {m.id_dtype}"),
        ("world size", m.world_size),
        ("samples", f"{completeness.committed} of {completeness.expected if completeness.expected else '?'}"),
        ("missing samples", _missing_text(completeness)),
        ("supervised tokens", f"{tokens:,}"),
        ("chunks", len(reader.chunks)),
        ("bytes on disk", f"{reader.bytes_on_disk:,}"),
        ("bytes / supervised token", _fmt(info["bytes_per_token"]) if tokens else "-"),
        ("label log-probs", "yes" if m.has_logprob else "no"),
        ("metrics", ", ".join(s["name"] for s in m.metrics) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
    ]:
        table.add_row(key, str(value))
    console.print(table)
    if info["results"]:
        results = Table("metric", "live value", title="results of the run")
        for key, value in info["results"].items():
            results.add_row(key, _fmt(value))
        console.print(results)


def _missing_text(completeness) -> str:
    if not completeness.missing:
        return "none" if completeness.expected is not None else "unknown (dataset length not recorded)"
    shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in completeness.missing[:10])
    more = " ..." if len(completeness.missing) > 10 else ""
    return f"{completeness.missing_count} ({shown}{more})"


def main() -> None:
    """Console entry point: errors print one clear line instead of a traceback."""
    from .errors import USER_ERRORS

    try:
        app()
    except USER_ERRORS as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
