"""The `spilleval` command: recompute metrics from a spill directory and inspect it."""

from __future__ import annotations

import contextlib
import json
import math
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_parts import per_part, per_part_pair
from .intervals import DEFAULT_RESAMPLES, DEFAULT_SEED
from .intervals.weights import MAX_RESAMPLES
from .stdout import TrimmedStdout

EXIT_CODES = (
    "Exit codes: 0 success; 1 unexpected error (one line, the full traceback written to a temporary file: please "
    "report it); 2 bad usage or bad input (an unknown option or metric, a damaged or partial spill, a file that "
    "exists): the one-line message names the problem and the fix."
)
app = typer.Typer(
    name="spilleval",
    help="Exact, memory-bounded evaluation: recompute and inspect spilled predictions.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain --help: no padded boxes (trailing spaces when piped), no <bool> metavars
)
console = Console(file=TrimmedStdout())
err_console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------- shared options
def flag(*names: str, help: str, **options) -> bool:
    """A --flag without a value: no `<bool>` metavar in the help."""
    return typer.Option(False, *names, help=help, metavar="", **options)


SpillDir = typer.Argument(..., exists=True, file_okay=False, metavar="SPILL_DIR",
                          help="A spill directory written by spilleval, or an evaluation directory holding "
                          "teacher_forced/ and generation/ (one section per part).")
JsonOpt = flag("--json", help="Print machine-readable JSON instead of a table.")
AllowPartialOpt = flag("--allow-partial", help="Read a partial spill (after a crash).")
QuietOpt = flag("--quiet", "-q", help="No progress bars.")
ForceOpt = flag("--force", help="Replace the output file if it exists.")
WorkersOpt = typer.Option(None, "--workers", "-w", min=1, metavar="N",
                          help="Worker processes (default: every usable core). Same results for any number.")
MaxTokensOpt = typer.Option(256, "--max-tokens", min=1, metavar="N", help="Tokens shown per sample (scores cover all).")
MetricsOpt = typer.Option(
    None, "--metrics", "-m", metavar="NAME[,NAME(key=value,...)]",
    help="Comma-separated metrics, repeatable (default: those recorded in the spill). A name or a result key "
    "(perplexity = nll, eval_bleu_precision_1 = bleu); parameters in parentheses, e.g. 'f1(labels=yes,no,maybe)' "
    "(values are JSON, or comma lists); a name alone keeps the parameters it was evaluated with. `spilleval metrics` "
    "lists them.",
)
MetricsFileOpt = typer.Option(
    None, "--metrics-file", exists=True, dir_okay=False, metavar="FILE",
    help="JSON or YAML file of metrics: a list of names or {name, params} specs, or a mapping name -> params.",
)
PluginOpt = typer.Option(
    None, "--plugin", metavar="MODULE|FILE.py",
    help="Import this module (from the current directory or the Python path) or .py file first: it may register "
    "custom metrics. Repeatable.",
)


def _load_plugins(plugins: list[str] | None) -> None:
    from .plugins import load_plugin

    for plugin in plugins or []:
        load_plugin(plugin)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"spilleval {__version__}")
        raise typer.Exit()


def _fmt(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


class PairedTestKind(str, Enum):
    bootstrap = "bootstrap"
    randomization = "randomization"
    none = "none"


@app.callback()
def _app(
    version: bool = flag("--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Exact, memory-bounded evaluation: recompute and inspect spilled predictions."""


@app.command()
@per_part(console)
def compute(
    spill_dir: Path = SpillDir,
    metrics: list[str] | None = MetricsOpt,
    metrics_file: Path | None = MetricsFileOpt,
    allow_partial: bool = AllowPartialOpt,
    as_json: bool = JsonOpt,
    plugin: list[str] | None = PluginOpt,
    quiet: bool = QuietOpt,
    bootstrap: int = typer.Option(
        DEFAULT_RESAMPLES, "--bootstrap", min=0, max=MAX_RESAMPLES, metavar="N",
        help="Bootstrap resamples for the 95% confidence intervals (0: none). Per-sample means use the analytic "
             "standard error instead. The replicates come from the metrics' own pass, on the same workers.",
    ),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", metavar="N", help="Seed of the bootstrap weights."),
    workers: int | None = WorkersOpt,
    dask: str | None = typer.Option(
        None, "--dask", metavar="ADDRESS|local",
        help="Run on a Dask cluster: its scheduler address, or 'local' for a local one of --workers processes "
        "(pip install 'spilleval[dask]'). The spill must be at the same path on every worker.",
    ),
) -> None:
    """Recompute metrics from the directory alone (tokenizer and metric settings are read from it), with 95%
    confidence intervals."""
    from .intervals import compute_with_intervals
    from .metrics import compute_from_spill
    from .metrics.names import parse_metrics, scale_of
    from .metrics.pool import usable_cores
    from .progress import wanted
    from .report.terminal import interval_text
    from .spill import SpillReader

    _load_plugins(plugin)
    specs = parse_metrics(",".join(metrics) if metrics else None, metrics_file)  # -m a -m b is -m a,b
    progress = wanted(quiet) and not as_json
    intervals = {}
    with contextlib.ExitStack() as stack:
        executor = None
        if dask is not None:
            from .metrics.cluster import DaskExecutor

            executor = stack.enter_context(DaskExecutor(dask, local_workers=workers or usable_cores()))
            workers = executor.workers
        if bootstrap:  # one sweep: the metrics, and the replicates of the streaming metrics' per-sample states
            reader = SpillReader(spill_dir, allow_partial=allow_partial)
            results, report = compute_with_intervals(reader, specs, resamples=bootstrap, seed=seed, progress=progress,
                                                     workers=workers, executor=executor)
            intervals = report.to_json()
        else:
            results = compute_from_spill(spill_dir, specs, allow_partial=allow_partial, progress=progress,
                                         workers=workers, executor=executor)
    partial_note = None
    if allow_partial:
        completeness = SpillReader(spill_dir, allow_partial=True).completeness()
        if not completeness.complete:
            partial_note = (
                f"PARTIAL: computed on {completeness.committed} of {completeness.expected or '?'} samples "
                f"({completeness.missing_count} missing)"
            )
    if as_json:  # the shape of results.json: metrics under the keys the run reported them, and its provenance
        payload = _results_payload(SpillReader(spill_dir, allow_partial=True), results, intervals)
        if partial_note:
            payload["partial"] = True
            payload["note"] = partial_note
        console.print_json(json.dumps(payload))
        return
    if partial_note:
        console.print(f"[bold yellow]{partial_note}[/]")
    table = Table("metric", "value", *(["95% CI"] if intervals else []), "scale", title=escape(str(spill_dir)))
    for key, value in results.items():
        table.add_row(escape(key), escape(_fmt(value)), *([interval_text(intervals.get(key))] if intervals else []),
                      escape(scale_of(key)))
    console.print(table)


@app.command("metrics")
def list_metrics(
    plugin: list[str] | None = PluginOpt,
    as_json: bool = JsonOpt,
) -> None:
    """The metrics that can be named: their result keys, scale and kind (streaming or corpus), and what they are."""
    from .metrics import CorpusMetric, available_metrics

    _load_plugins(plugin)
    rows = []
    for name, cls in available_metrics().items():
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        rows.append({"name": name, "result_keys": list(cls.result_keys()),
                     "scales": {key: cls.scale_of(key) for key in cls.result_keys()},
                     "kind": "corpus" if issubclass(cls, CorpusMetric) else "streaming", "description": summary})
    if as_json:
        _print_json({"metrics": rows})
        return
    table = Table("name", "result keys", "scale", "kind", "what it is", title="metrics")
    for row in rows:
        scales = dict.fromkeys(row["scales"].values())
        table.add_row(escape(row["name"]), escape(", ".join(row["result_keys"])),
                      escape("; ".join(s for s in scales if s) or "-"), row["kind"], escape(row["description"]))
    console.print(table)


def _results_payload(reader, results: dict, intervals: dict) -> dict:
    """Recomputed `results` shaped as the spill's results.json: prefixed as the run reported them (a trainer's
    `eval_`), with the run's provenance when its results.json verifies."""
    from .spill.results import prefixed

    record = None
    try:
        record = reader.results_record()
    except Exception:  # noqa: BLE001 - a damaged results.json: the recomputed numbers stand alone
        record = None
    prefix = reader.manifest.extra.get("metric_key_prefix")
    prefix = prefix if isinstance(prefix, str) else None
    payload = {"metrics": prefixed(results, prefix), "provenance": record["provenance"] if record else {}}
    if intervals:
        payload["intervals"] = prefixed(intervals, prefix)
    return payload


@app.command()
@per_part(console)
def inspect(spill_dir: Path = SpillDir, as_json: bool = JsonOpt) -> None:
    """Manifest, sample and token counts, bytes per supervised token, chunks and completeness; on a damaged spill,
    what is intact, what is not and how to recover (then the exit code is 2)."""
    from .spill import SpillFormatError
    from .spill.survey import survey

    _require_spill(spill_dir)
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
        "results": _in_spec_order(state.results, m),
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


def _require_spill(spill_dir: Path) -> None:
    """A directory with neither a manifest nor shards is no spill (not a damaged one): say so, naming the latest
    spill it holds when it is a directory of spills (a trainer's output_dir)."""
    from .spill.manifest import MANIFEST_NAME, SHARDS_DIR, load_manifest

    if not (spill_dir / MANIFEST_NAME).exists() and not (spill_dir / SHARDS_DIR).exists():
        load_manifest(spill_dir)  # raises SpillFormatError: not a spill directory; it holds the spills ...


def _in_spec_order(results: dict | None, manifest) -> dict | None:
    from .metrics.names import in_spec_order

    if not results or manifest is None:
        return results
    return in_spec_order(results, [spec["name"] for spec in manifest.metrics])


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
            ("dataset columns", escape(", ".join(m.columns)) or "-"),
            ("metrics", escape(", ".join(s["name"] for s in m.metrics)) or "-"),
            ("versions", escape(", ".join(f"{k} {v}" for k, v in m.versions.items()))),
        ]
    table = Table(show_header=False, title=escape(f"spill {spill_dir}"))
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    if state.results:
        from .metrics.names import scale_of
        from .report.terminal import interval_text

        ci = ["95% CI"] if state.intervals else []
        results = Table("metric", "live value", *ci, "scale", title="results of the run")
        for key, value in state.results.items():
            results.add_row(escape(key), escape(_fmt(value)), *([interval_text(state.intervals.get(key))] if ci else []),
                            escape(scale_of(key)))
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
@per_part(console)
def show(
    spill_dir: Path = SpillDir,
    n: int = typer.Option(5, "-n", min=1, metavar="N", help="How many samples (in stored order)."),
    index: str | None = typer.Option(None, "--index", "-i", metavar="I,J,...",
                                        help="Comma-separated sample indices, e.g. 3,17."),
    only_wrong: bool = flag("--only-wrong", help="Only samples with a wrong token."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Decoded prediction against reference per sample, wrong tokens highlighted, with the sample's scores (a
    generation spill: the generated text and every reference, the matched ones marked)."""
    from .report import first_samples, sample_views, samples_by_index
    from .report.samples import view_options
    from .report.scan import show_progress
    from .report.spill_scores import scores_of
    from .report.terminal import print_sample
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    scores = scores_of(reader).defaults(corpus_pass=False)  # no pass over the whole spill for a few samples
    if index is not None:
        batch, values = samples_by_index(reader, _parse_indices(index), scores, only_wrong=only_wrong)
    else:
        progress = show_progress(quiet) and not as_json
        batch, values = first_samples(reader, scores, n, only_wrong=only_wrong, progress_bar=progress)
    views = sample_views(batch, values, reader.display_tokenizer, max_tokens=max_tokens,
                         **view_options(reader)) if batch is not None else []
    if as_json:
        _print_json({"spill": str(spill_dir), "samples": [v.to_json() for v in views]})
        return
    for view in views:
        print_sample(console, view)
    if not views:
        console.print("no sample matched" + (" (every sample is exactly right)" if only_wrong else ""))


@app.command()
@per_part(console)
def worst(
    spill_dir: Path = SpillDir,
    by: str | None = typer.Option(
        None, "--by", metavar="SCORE",
        help="Per-sample score to rank by (default: token_accuracy; squad_f1 on a generation spill).",
    ),
    n: int = typer.Option(10, "-n", min=1, metavar="N", help="How many samples."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """The N samples with the worst per-sample score, in one bounded pass (a heap of N samples).

    Scores: token_accuracy, exact_match, token_f1, nll (needs log-probs), length (worst = longest),
    text_exact_match (decodes every sample). Generation spills (text against every reference): squad_f1,
    squad_exact_match, answer_exact_match, sentence_bleu, sentence_chrf, rougeL, cider (a corpus pass first).
    """
    from .report import WorstSamples, scan
    from .report.samples import ranked_views, view_options
    from .report.scan import show_progress
    from .report.spill_scores import scores_of
    from .report.terminal import format_score, print_sample
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    score, scores = scores_of(reader).with_defaults(by)
    by = score.name
    heap = WorstSamples(score, n)
    scan(reader, scores, [heap], progress_bar=show_progress(quiet) and not as_json, desc=f"worst by {by}")
    views = ranked_views(heap.result(), reader.display_tokenizer, max_tokens=max_tokens,
                         **view_options(reader))
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
@per_part_pair(console)
def diff(
    dir_a: Path = typer.Argument(..., exists=True, file_okay=False, metavar="SPILL_A",
                                 help="Spill A (e.g. the older checkpoint)."),
    dir_b: Path = typer.Argument(..., exists=True, file_okay=False, metavar="SPILL_B",
                                 help="Spill B of the same eval set."),
    limit: int = typer.Option(5, "--limit", min=0, metavar="N", help="Flipped samples listed per direction."),
    recompute: bool = flag("--recompute", help="Recompute metrics instead of reading results.json."),
    max_tokens: int = MaxTokensOpt,
    as_json: bool = JsonOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
    test: PairedTestKind = typer.Option(
        PairedTestKind.bootstrap, "--test", metavar="bootstrap|randomization|none",
        help="Paired significance test of B − A: bootstrap (as sacrebleu --paired-bs), randomization (approximate "
             "randomization, as sacrebleu --paired-ar) or none.",
    ),
    trials: int = typer.Option(DEFAULT_RESAMPLES, "--trials", min=1, max=MAX_RESAMPLES, metavar="N",
                               help="Resamples (bootstrap) or shuffles (randomization) of the paired test."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", metavar="N", help="Seed of the paired test's draws."),
    workers: int | None = WorkersOpt,
) -> None:
    """Two spills of the same eval set: metric deltas (B − A) with a paired significance test, and samples that
    flipped right↔wrong."""
    from .report import diff_spills
    from .report.scan import show_progress
    from .report.terminal import print_diff
    from .spill import SpillReader

    reader_a = SpillReader(dir_a, allow_partial=allow_partial)
    reader_b = SpillReader(dir_b, allow_partial=allow_partial)
    result = diff_spills(reader_a, reader_b, limit=limit, recompute=recompute,
                         progress_bar=show_progress(quiet) and not as_json,
                         test=None if test is PairedTestKind.none else test.value, trials=trials, seed=seed,
                         workers=workers)
    if as_json:
        _print_json(result.to_json())
        return
    print_diff(console, result, reader_a, reader_b, max_tokens=max_tokens)


@app.command()
@per_part(console, output="output")
def export(
    spill_dir: Path = SpillDir,
    fmt: ExportFormat = typer.Option(ExportFormat.jsonl, "--format", "-f", help="Output format."),
    output: str | None = typer.Option(
        None, "--output", "-o", metavar="PATH",
        help="File to write, or - for stdout (jsonl). Default: <spill dir name>.<format>.",
    ),
    decode: bool = flag("--decode", help="Add decoded prediction / reference text columns."),
    with_scores: bool = flag("--scores", help="Add per-sample score columns."),
    force: bool = ForceOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Stream every sample out as JSON Lines or Parquet, one window at a time (stored order; see sample_index)."""
    from .report import export_spill
    from .report.scan import show_progress
    from .report.spill_scores import scores_of
    from .spill import SpillReader

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    destination = output or f"{Path(spill_dir).resolve().name}.{fmt.value}"
    scores = scores_of(reader).defaults() if with_scores else []
    summary = export_spill(reader, destination, fmt.value, decode=decode, scores=scores, overwrite=force,
                           progress_bar=show_progress(quiet))
    size = f" ({summary.bytes:,} bytes)" if summary.bytes is not None else ""
    (err_console if destination == "-" else console).print(
        f"exported {summary.rows:,} samples to {summary.path}{size}", highlight=False
    )


@app.command()
@per_part(console, output="output")
def report(
    spill_dir: Path = SpillDir,
    output: Path = typer.Option(Path("report.html"), "--output", "-o", metavar="PATH", help="The HTML file to write."),
    by: str | None = typer.Option(
        None, "--by", metavar="SCORE",
        help="Per-sample score for the worst samples (default: token_accuracy; squad_f1 on generation).",
    ),
    n: int = typer.Option(20, "-n", min=1, metavar="N", help="How many worst samples to show."),
    recompute: bool = flag("--recompute", help="Recompute metrics instead of reading results.json."),
    max_tokens: int = MaxTokensOpt,
    force: bool = ForceOpt,
    allow_partial: bool = AllowPartialOpt,
    quiet: bool = QuietOpt,
) -> None:
    """A self-contained static HTML page: metrics, per-sample score histograms, worst samples, manifest."""
    from .report import ExportError
    from .report.html import build_report, write_report
    from .report.scan import show_progress
    from .spill import SpillReader

    if output.exists() and not force:  # before the pass over the spill, not after it
        raise ExportError(f"{output} already exists: choose another -o path, or pass --force to replace it")
    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    data = build_report(reader, by=by, n=n, recompute=recompute, max_tokens=max_tokens,
                        progress_bar=show_progress(quiet))
    path = write_report(data, output)
    console.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False, soft_wrap=True)


@app.command()
def history(
    run_dir: Path = typer.Argument(..., exists=True, file_okay=False, metavar="RUN_DIR",
                                   help="A run's output directory, holding its spill-<prefix>-step-<N> spills."),
    plot: Path | None = typer.Option(None, "--plot", metavar="PATH",
                                     help="Also write the metrics against the step as an image."),
    recompute: bool = flag("--recompute", help="Recompute every spill's metrics from its chunks."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Every evaluation of a run, ordered by global step: metric against step, ± the CI's half-width when
    results.json has one. Reads results.json and the manifests only, unless --recompute."""
    from .report.history import history_tables, run_history
    from .report.scan import show_progress

    result = run_history(run_dir, recompute=recompute, progress_bar=show_progress(quiet) and not as_json)
    written = None
    if plot is not None:
        from .report.history_plot import write_history_plot

        written = write_history_plot(result, plot)
    if as_json:
        _print_json({**result.to_json(), "plot": str(written) if written else None})
        return
    for table in history_tables(result):
        console.print(table)
    if written:
        console.print(f"wrote {written} ({written.stat().st_size:,} bytes)", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: every error is one line on stderr, never a traceback; the exit code says which kind
    (`EXIT_CODES`)."""
    from .crash import EXIT_BAD_INPUT, EXIT_UNEXPECTED, error_message, write_traceback
    from .errors import USER_ERRORS

    try:
        app()
    except USER_ERRORS as e:
        _error_line(error_message(e))
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as e:  # noqa: BLE001 - a bug (ours or a plugin's): say where the traceback is
        path = write_traceback(e)
        _error_line(f"unexpected {type(e).__name__}: {error_message(e)} (full traceback in {path}; please "
                    "include it when you report this)")
        raise SystemExit(EXIT_UNEXPECTED) from None


def _error_line(message: str) -> None:
    # one line whatever the terminal width; the message is plain text, never rich markup
    err_console.print("[bold red]error:[/]", escape(message), soft_wrap=True)


if __name__ == "__main__":
    main()
