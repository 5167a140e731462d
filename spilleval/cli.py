"""The `spilleval` command: recompute metrics from a spill directory and inspect it."""

from __future__ import annotations

import importlib
import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
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
    workers: Optional[int] = typer.Option(
        None, "--workers", "-w", min=1, help="Worker processes (default: every usable core). Same results for any."
    ),
    dask: Optional[str] = typer.Option(
        None, "--dask", help="Run on a Dask cluster: its scheduler address, or 'local' for a local one of --workers "
        "processes (pip install 'spilleval[dask]'). The spill must be at the same path on every worker."
    ),
) -> None:
    """Recompute metrics from the directory alone (tokenizer and metric settings are read from it)."""
    from .metrics import compute_from_spill
    from .metrics.parallel import usable_cores
    from .spill import SpillReader

    _load_plugins(plugin)
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    show_progress = not quiet and not as_json and sys.stderr.isatty()
    if dask is not None:
        from .metrics.cluster import DaskExecutor

        with DaskExecutor(dask, local_workers=workers or usable_cores()) as executor:
            results = compute_from_spill(spill_dir, names, allow_partial=allow_partial, progress=show_progress,
                                         executor=executor, workers=executor.workers)
    else:
        results = compute_from_spill(spill_dir, names, allow_partial=allow_partial, progress=show_progress,
                                     workers=workers)
    partial_note = None
    if allow_partial:
        completeness = SpillReader(spill_dir, allow_partial=True).completeness()
        if not completeness.complete:
            partial_note = (
                f"PARTIAL: computed on {completeness.committed} of {completeness.expected or '?'} samples "
                f"({completeness.missing_count} missing)"
            )
    if as_json:  # the shape of results.json: metrics under the keys the run reported them, and its provenance
        payload = _results_payload(SpillReader(spill_dir, allow_partial=True), results)
        if partial_note:
            payload["partial"] = True
            payload["note"] = partial_note
        console.print_json(json.dumps(payload))
        return
    if partial_note:
        console.print(f"[bold yellow]{partial_note}[/]")
    table = Table("metric", "value", title=escape(str(spill_dir)))
    for key, value in results.items():
        table.add_row(escape(key), escape(_fmt(value)))
    console.print(table)


def _results_payload(reader, results: dict) -> dict:
    """Recomputed `results` shaped as the spill's results.json: prefixed as the run reported them (a trainer's
    `eval_`), with the run's provenance when its results.json verifies."""
    from .spill.results import prefixed

    record = None
    try:
        record = reader.results_record()
    except Exception:  # noqa: BLE001 - a damaged results.json: the recomputed numbers stand alone
        record = None
    prefix = reader.manifest.extra.get("metric_key_prefix")
    return {"metrics": prefixed(results, prefix if isinstance(prefix, str) else None),
            "provenance": record["provenance"] if record else {}}


@app.command()
def inspect(spill_dir: Path = SpillDir, as_json: bool = JsonOpt) -> None:
    """Manifest, sample and token counts, bytes per supervised token, chunks and completeness; on a damaged spill,
    what is intact, what is not and how to recover (then the exit code is 2)."""
    from .spill import SpillFormatError
    from .spill.survey import survey

    state = survey(spill_dir)
    completeness, tokens, m = state.completeness, state.num_tokens, state.manifest
    info = {
        "manifest": m.to_json() if m is not None else None,
        "samples_committed": completeness.committed,
        "samples_expected": completeness.expected,
        "missing": completeness.missing_count,
        "missing_ranges": completeness.missing[:20],
        "complete": completeness.complete,
        "rows_on_disk": state.num_rows,
        "supervised_tokens": tokens,
        "chunks": len(state.chunks),
        "chunks_damaged": state.chunks_damaged,
        "bytes_on_disk": state.bytes_on_disk,
        "bytes_per_token": state.bytes_on_disk / tokens if tokens else None,
        "sealed": state.sealed,
        "results": state.results,
        "problems": state.problems,
        "notes": state.notes,
    }
    if as_json:
        _print_json(info)
    else:
        _print_state(spill_dir, state, info)
    if state.problems:
        raise SpillFormatError(
            f"{spill_dir} is damaged: {len(state.problems)} problem(s), listed "
            f"{'in the JSON above' if as_json else 'above'} with how to recover"
        )


def _print_state(spill_dir: Path, state, info: dict) -> None:
    completeness, tokens, m = state.completeness, state.num_tokens, state.manifest
    status = "complete" if completeness.complete else "[bold yellow]PARTIAL[/]"
    if state.problems:
        status = f"[bold red]DAMAGED[/] ({len(state.problems)} problem(s), below)"
    rows = [("status", status)]
    if m is None:
        rows.append(("manifest", "[bold red]unreadable[/] (see below)"))
    else:
        rows += [
            ("task", escape(m.task)),
            ("schema version", m.schema_version),
            ("vocab size / id dtype", f"{m.vocab_size} / {m.id_dtype}"),
            ("world size", m.world_size),
        ]
    rows += [
        ("samples", f"{completeness.committed} of {completeness.expected if completeness.expected else '?'}"),
        ("missing samples", _missing_text(completeness)),
        ("supervised tokens", f"{tokens:,}"),
        ("chunks", f"{len(state.chunks)}" + (f" intact, {state.chunks_damaged} damaged" if state.chunks_damaged
                                             else "")),
        ("bytes on disk", f"{state.bytes_on_disk:,}"),
        ("bytes / supervised token", _fmt(info["bytes_per_token"]) if tokens else "-"),
        ("sealed (integrity.json)", "yes" if state.sealed else "no"),
    ]
    if m is not None:
        rows += [
            ("label log-probs", "yes" if m.has_logprob else "no"),
            ("metrics", escape(", ".join(s["name"] for s in m.metrics)) or "-"),
            ("versions", escape(", ".join(f"{k} {v}" for k, v in m.versions.items()))),
        ]
    table = Table(show_header=False, title=escape(f"spill {spill_dir}"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if state.results:
        results = Table("metric", "live value", title="results of the run")
        for key, value in state.results.items():
            results.add_row(escape(key), escape(_fmt(value)))
        console.print(results)
    for note in state.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    for problem in state.problems:
        console.print(f"[bold red]damaged:[/] {escape(problem)}", soft_wrap=True)


def _missing_text(completeness) -> str:
    if not completeness.missing:
        return "none" if completeness.expected is not None else "unknown (dataset length not recorded)"
    shown = ", ".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in completeness.missing[:10])
    more = " ..." if len(completeness.missing) > 10 else ""
    return f"{completeness.missing_count} ({shown}{more})"


# ---------------------------------------------------------------------------------- inspecting predictions
AllowPartialOpt = typer.Option(False, "--allow-partial", help="Read a partial spill (after a crash).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
MaxTokensOpt = typer.Option(256, "--max-tokens", min=1, help="Tokens shown per sample (scores cover all).")


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    parquet = "parquet"


def _print_json(payload: dict) -> None:
    """Strict JSON on stdout (NaN becomes null), not wrapped or coloured."""
    print(json.dumps(_json_safe(payload), ensure_ascii=False, indent=2))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _parse_indices(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of sample indices, e.g. 3,17")
    return indices


@app.command()
def show(
    spill_dir: Path = SpillDir,
    n: int = typer.Option(5, "-n", min=1, help="How many samples (in stored order)."),
    index: Optional[str] = typer.Option(None, "--index", "-i", help="Comma-separated sample indices, e.g. 3,17."),
    only_wrong: bool = typer.Option(False, "--only-wrong", help="Only samples with a wrong token."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Decoded prediction against reference per sample, wrong tokens highlighted, with the sample's scores."""
    from .report import default_scores, first_samples, sample_views, samples_by_index
    from .report.scan import show_progress
    from .report.terminal import print_sample
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    scores = default_scores(has_logprob=reader.manifest.has_logprob)
    if index is not None:
        batch, values = samples_by_index(reader, _parse_indices(index), scores, only_wrong=only_wrong)
    else:
        progress = show_progress(quiet) and not as_json
        batch, values = first_samples(reader, scores, n, only_wrong=only_wrong, progress_bar=progress)
    views = sample_views(batch, values, reader.tokenizer, max_tokens=max_tokens) if batch is not None else []
    if as_json:
        _print_json({"spill": str(spill_dir), "samples": [v.to_json() for v in views]})
        return
    for view in views:
        print_sample(console, view)
    if not views:
        console.print("no sample matched" + (" (every sample is exactly right)" if only_wrong else ""))


@app.command()
def worst(
    spill_dir: Path = SpillDir,
    by: str = typer.Option("token_accuracy", "--by", help="Per-sample score to rank by (see --help for names)."),
    n: int = typer.Option(10, "-n", min=1, help="How many samples."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The N samples with the worst per-sample score, in one bounded pass (a heap of N samples).

    Scores: token_accuracy, exact_match, token_f1, nll (needs log-probs), length (worst = longest),
    text_exact_match (decodes every sample).
    """
    from .report import WorstSamples, default_scores, resolve_scores, scan
    from .report.samples import ranked_views
    from .report.scan import show_progress
    from .report.terminal import format_score, print_sample
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    has_logprob = reader.manifest.has_logprob
    score = resolve_scores([by], has_logprob=has_logprob, has_tokenizer=reader.tokenizer is not None)[0]
    scores = default_scores(has_logprob=has_logprob)
    scores += [score] if score not in scores else []
    heap = WorstSamples(score, n)
    scan(reader, scores, [heap], progress_bar=show_progress(quiet) and not as_json, desc=f"worst by {by}")
    views = ranked_views(heap.result(), reader.tokenizer, max_tokens=max_tokens)
    if as_json:
        samples = [{"rank": rank, **view.to_json()} for rank, view in enumerate(views, 1)]
        _print_json({"spill": str(spill_dir), "by": by, "higher_is_better": score.higher_is_better,
                     "undefined_skipped": heap.skipped_undefined, "samples": samples})
        return
    direction = "lowest" if score.higher_is_better else "highest"
    console.print(f"[bold]{len(views)} worst samples by {by}[/] ({direction} first) in {spill_dir}")
    for rank, view in enumerate(views, 1):
        title = f"#{rank}  sample {view.sample_index}  {by} {format_score(view.scores[by])}"
        print_sample(console, view, title=title, highlight=by)
    if heap.skipped_undefined:
        console.print(f"[dim]{heap.skipped_undefined} sample(s) without a defined {by} were skipped[/]")


@app.command()
def diff(
    dir_a: Path = typer.Argument(..., exists=True, file_okay=False, help="Spill A (e.g. the older checkpoint)."),
    dir_b: Path = typer.Argument(..., exists=True, file_okay=False, help="Spill B of the same eval set."),
    limit: int = typer.Option(5, "--limit", min=0, help="Flipped samples listed per direction."),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute metrics instead of reading results.json."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Two spills of the same eval set: metric deltas (B − A) and samples that flipped right↔wrong."""
    from .report import diff_spills
    from .report.scan import show_progress
    from .report.terminal import print_diff
    from .spill import SpillReader

    reader_a = SpillReader(dir_a, allow_partial=allow_partial)
    reader_b = SpillReader(dir_b, allow_partial=allow_partial)
    result = diff_spills(reader_a, reader_b, limit=limit, recompute=recompute,
                         progress_bar=show_progress(quiet) and not as_json)
    if as_json:
        _print_json(result.to_json())
        return
    print_diff(console, result, reader_a, reader_b, max_tokens=max_tokens)


@app.command()
def export(
    spill_dir: Path = SpillDir,
    fmt: ExportFormat = typer.Option(ExportFormat.jsonl, "--format", "-f", help="Output format."),
    output: Optional[str] = typer.Option(
        None, "--output", "-o", help="File to write, or - for stdout (jsonl). Default: <spill dir name>.<format>."
    ),
    decode: bool = typer.Option(False, "--decode", help="Add decoded prediction / reference text columns."),
    with_scores: bool = typer.Option(False, "--scores", help="Add per-sample score columns."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Stream every sample out as JSON Lines or Parquet, one window at a time (stored order; see sample_index)."""
    from .report import default_scores, export_spill
    from .report.scan import show_progress
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    destination = output or f"{Path(spill_dir).resolve().name}.{fmt.value}"
    scores = default_scores(has_logprob=reader.manifest.has_logprob) if with_scores else []
    summary = export_spill(reader, destination, fmt.value, decode=decode, scores=scores, overwrite=force,
                           progress_bar=show_progress(quiet))
    size = f" ({summary.bytes:,} bytes)" if summary.bytes is not None else ""
    (err_console if destination == "-" else console).print(
        f"exported {summary.rows:,} samples to {summary.path}{size}", highlight=False
    )


@app.command()
def report(
    spill_dir: Path = SpillDir,
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="The HTML file to write."),
    by: str = typer.Option("token_accuracy", "--by", help="Per-sample score for the worst samples."),
    n: int = typer.Option(20, "-n", min=1, help="How many worst samples to show."),
    recompute: bool = typer.Option(False, "--recompute", help="Recompute metrics instead of reading results.json."),
    max_tokens: int = MaxTokensOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """A self-contained static HTML page: metrics, per-sample score histograms, worst samples, manifest."""
    from .report.html import build_report, write_report
    from .report.scan import show_progress
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    data = build_report(reader, by=by, n=n, recompute=recompute, max_tokens=max_tokens,
                        progress_bar=show_progress(quiet))
    path = write_report(data, output)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)


def main() -> None:
    """Console entry point: errors print one clear line instead of a traceback."""
    from .errors import USER_ERRORS

    try:
        app()
    except USER_ERRORS as e:
        # one line whatever the terminal width; the message is plain text, never rich markup
        err_console.print("[bold red]error:[/]", escape(str(e)), soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
