"""Rich rendering of samples and spill comparisons for the terminal.

Wrong positions are coloured (reference: green, prediction: red, underlined); every sample also gets a plain
`wrong` line naming them, so the diff survives a colourless terminal, a log file or a pipe. A generated sample is
shown as text with every reference, the matched ones marked in words ("✓ matches").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ..spill import SpillReader
from .diff import SpillDiff
from .samples import SampleView, sample_views, samples_by_index, view_options
from .spill_scores import scores_of

_CONTROLS = [c for c in range(0x20) if chr(c) not in "\n\t"] + list(range(0x7F, 0xA0))
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in _CONTROLS}
_HAS_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _CONTROLS) + "]")
REFERENCE_STYLE = "bold green"
PREDICTION_STYLE = "bold red underline"
MAX_WRONG_LISTED = 8
MAX_COLUMN_CHARS = 300


def format_score(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if abs(value) < 1e15 and abs(value - round(value)) < 1e-9:  # 100.00000000000004 (sentence BLEU) reads 100
        return str(round(value))
    return f"{value:.4f}"


def interval_text(interval: dict[str, Any] | None) -> str:
    """`± half-width (95% CI)` of a results.json interval, "" without one."""
    if not interval:
        return ""
    half_width = (interval["high"] - interval["low"]) / 2
    return f"± {half_width:.3g} ({interval['level']:.0%} CI)"


def printable(text: str) -> str:
    """Stored text without terminal control characters: model output and dataset columns are untrusted, and an
    escape sequence in them would move the cursor or recolour the terminal. Each becomes a visible `\\x1b`."""
    return text.translate(_CONTROL_ESCAPES) if _HAS_CONTROL.search(text) else text


def visible(piece: str) -> tuple[str, str]:
    """(leading whitespace, body) of a decoded piece; a whitespace-only token gets a visible body."""
    piece = printable(piece)
    body = piece.lstrip()
    lead = piece[: len(piece) - len(body)]
    if not body:
        return "", piece.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"
    return lead, body


def token_line(view: SampleView, *, side: str) -> Text:
    """The reference or the prediction of a sample, with its wrong positions styled."""
    style = REFERENCE_STYLE if side == "reference" else PREDICTION_STYLE
    line = Text()
    for piece, right, _ in view.side(side):
        lead, body = visible(piece)
        line.append(lead)
        line.append(body, style=None if right else style)
    if view.hidden(side):
        line.append(f"  … {view.hidden(side)} more tokens", style="dim")
    return line


def wrong_summary(view: SampleView) -> Text:
    if not view.wrong_total:
        return Text("none", style="green")
    parts = [f"{view.wrong_total} of {max(view.length, view.pred_length)} tokens (predicted→expected):"]
    for position in view.wrong[:MAX_WRONG_LISTED]:
        pred, label = (visible(p[position])[1] if position < len(p) else "∅"
                       for p in (view.pred_pieces, view.label_pieces))
        parts.append(f"@{position} {pred!r}→{label!r}")
    if view.wrong_total > min(len(view.wrong), MAX_WRONG_LISTED):
        parts.append("…")
    return Text(" ".join(parts))


MATCH_MARKS = {"exact": "✓ matches", "normalized": "✓ matches after normalisation"}


def reference_lines(view: SampleView) -> Text:
    """Every reference of a generated sample, one a line, the ones the prediction matches marked."""
    text = Text()
    for i, ref in enumerate(view.references or []):
        if i:
            text.append("\n")
        text.append(f"{i + 1}. ", style="dim")
        text.append(_short(ref.text), style=REFERENCE_STYLE if ref.match else None)
        if ref.match:
            text.append(f"  {MATCH_MARKS[ref.match]}", style="green")
    return text


def score_line(scores: dict[str, float], highlight: str | None = None) -> Text:
    line = Text()
    for i, (name, value) in enumerate(scores.items()):
        if i:
            line.append(" · ", style="dim")
        line.append(f"{name} ")
        line.append(format_score(value), style="bold" if name == highlight else "cyan")
    return line


def print_sample(console: Console, view: SampleView, *, title: str | None = None,
                 highlight: str | None = None, predictions: Iterable[tuple[str, SampleView]] = (),
                 scores_label: str = "scores") -> None:
    """One sample: its scores, dataset columns, reference, prediction(s) and the list of wrong positions."""
    console.print(Rule(title or f"sample {view.sample_index}", align="left", style="blue"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row(scores_label, score_line(view.scores, highlight))
    for name, value in view.columns.items():
        grid.add_row(Text(name), Text(_short(value)))
    others = list(predictions) or [("prediction", view)]
    if view.references is not None:  # generated text: no position-by-position diff
        for label, other in others:
            grid.add_row(label, Text(other.prediction))
        for label, other in others:
            grid.add_row("references" if len(others) == 1 else f"references ({label})", reference_lines(other))
        console.print(grid)
        return
    grid.add_row("reference", token_line(view, side="reference"))
    for label, other in others:
        grid.add_row(label, token_line(other, side="prediction"))
    for label, other in others:
        grid.add_row("wrong" if len(others) == 1 else f"wrong ({label})", wrong_summary(other))
    console.print(grid)


def _short(value: Any) -> str:
    text = printable(str(value))
    return text if len(text) <= MAX_COLUMN_CHARS else text[:MAX_COLUMN_CHARS] + "…"


def metric_delta_table(title: str, metrics: dict[str, dict[str, Any]],
                       significance: dict[str, dict[str, Any]] | None = None) -> Table:
    """A, B, B − A and the scale per metric; with a paired test, the delta's interval and the p-value too."""
    from ..metrics.names import scale_of

    significance = significance or {}
    columns = ["metric", "A", "B", "B − A"] + ([f"{_level(significance)} CI of B − A", "p"] if significance else [])
    table = Table(*columns, "scale", title=title)
    for name, row in metrics.items():
        delta = row["delta"]
        shown = "-" if delta is None else f"{delta:+.6f}" if isinstance(delta, float) else f"{delta:+d}"
        cells = [escape(name), escape(_value(row["a"])), escape(_value(row["b"])), shown]  # from the spills
        if significance:
            test = significance.get(name)
            cells += [f"[{test['delta_low']:+.4g}, {test['delta_high']:+.4g}]", f"{test['p_value']:.3g}"] if test \
                else ["", ""]
        table.add_row(*cells, escape(scale_of(name)))
    return table


def _level(significance: dict[str, dict[str, Any]]) -> str:
    return f"{next(iter(significance.values()))['level']:.0%}"


def _value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def print_diff(console: Console, result: SpillDiff, reader_a: SpillReader, reader_b: SpillReader, *,
               max_tokens: int) -> None:
    """Metric deltas, flip counts, then each listed flipped sample with A's and B's prediction."""
    console.print(metric_delta_table(f"A = {result.a}\nB = {result.b}", result.metrics, result.significance))
    if result.significance:
        test = next(iter(result.significance.values()))
        how = "paired bootstrap" if test["test"] == "bootstrap" else "approximate randomization"
        console.print(f"p: {how} over {test['trials']:,} trials (seed {test['seed']}), as sacrebleu's "
                      "paired tests; a small p says B − A is unlikely to be chance.", highlight=False)
    if result.significance_note:
        console.print(f"[yellow]note:[/] {escape(result.significance_note)}", soft_wrap=True)
    only = ""
    if result.only_in_a or result.only_in_b:
        only = f"; only in A {result.only_in_a:,}, only in B {result.only_in_b:,}"
    console.print(
        f"{result.compared:,} samples in both: exactly right {result.right_in_a:,} in A, {result.right_in_b:,} in B; "
        f"[red]right → wrong {result.right_to_wrong_count:,}[/], "
        f"[green]wrong → right {result.wrong_to_right_count:,}[/]{only}"
    )
    for label, indices, wrong_side in (("right in A → wrong in B", result.right_to_wrong, "B"),
                                       ("wrong in A → right in B", result.wrong_to_right, "A")):
        if not indices:
            continue
        views = {side: _views(reader, indices, max_tokens) for side, reader in (("A", reader_a), ("B", reader_b))}
        for view_a, view_b in zip(views["A"], views["B"]):
            print_sample(console, view_b if wrong_side == "B" else view_a, scores_label=f"scores ({wrong_side})",
                         title=f"sample {view_a.sample_index}: {label}", predictions=[("A", view_a), ("B", view_b)])


def _views(reader: SpillReader, indices: list[int], max_tokens: int) -> list[SampleView]:
    batch, scores = samples_by_index(reader, indices, scores_of(reader).defaults(corpus_pass=False))
    return sample_views(batch, scores, reader.display_tokenizer, max_tokens=max_tokens,
                        **view_options(reader))
