"""The worst samples of each evaluation where people already look: W&B and TensorBoard, through `report_to`.

`SpillingTrainer(log_samples=N)` adds a `SampleLoggingCallback`. After each evaluation (its `on_evaluate` runs once
the trainer has logged the metrics, so transformers' `WandbCallback` and `TensorBoardCallback` are set up) it makes
one bounded pass over each spill the evaluation wrote (`spilleval.report.scan`: a heap of N rows and a histogram per
score, never the whole eval set) and logs, into the same W&B run and TensorBoard writer as the metrics, at the same
global step:
* the N worst samples by a per-sample score (decoded prediction and reference, every per-sample score, the dataset
  columns spilled with them): a `wandb.Table` and a TensorBoard text (a markdown table), key `eval/worst_samples`;
* the per-sample score histograms of `spilleval report`: `wandb.Image`s and TensorBoard figures, keys
  `eval/histogram_<score>`.
A generation spill's keys carry its metrics' prefix, as the trainer logs them: `eval/gen_worst_samples`.
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .report.history import PARTS
from .report.samples import SampleView, ranked_views
from .report.scan import ScoreHistogram, ScoreHistograms, WorstSamples, scan
from .report.scores import default_scores, resolve_scores
from .spill import SpillReader
from .spill.manifest import MANIFEST_NAME

MAX_TEXT_CHARS = 2000  # per decoded side in a logged table: a runaway generation stays readable
# report_to name -> (modules any of which serves it, the extra that installs one)
BACKENDS = {"wandb": (("wandb",), "wandb"), "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard")}


class MissingLoggerError(ImportError):
    """`log_samples` with a `report_to` integration whose library is not installed."""


def check_sample_logging(report_to: list[str] | str | None, log_samples: int) -> None:
    """Fail at construction, not after the first evaluation: `log_samples` needs W&B or TensorBoard in `report_to`,
    and their libraries."""
    if log_samples < 0:
        raise ValueError(f"log_samples={log_samples} must be 0 (off) or the number of worst samples to log")
    if not log_samples:
        return
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    targets = [name for name in names if name in BACKENDS]
    if not targets:
        raise ValueError(
            f"log_samples={log_samples} logs the worst samples to W&B or TensorBoard, but report_to={names} names "
            "neither: pass TrainingArguments(report_to=['wandb']) or ['tensorboard'], or log_samples=0."
        )
    for name in targets:
        modules, extra = BACKENDS[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            raise MissingLoggerError(
                f"log_samples={log_samples} with report_to including {name!r} needs the {modules[0]} package, which "
                f"is not installed: pip install 'spilleval[{extra}]' (or pip install {modules[0]})."
            )


# ----------------------------------------------------------------------------------------------- gathering
@dataclass
class EvalSamples:
    """What one spill contributes: its worst samples and score histograms, under its metrics' prefix."""

    prefix: str  # "eval", "eval_gen": the prefix of the metrics the trainer logged for this spill
    by: str
    views: list[SampleView]
    histograms: list[ScoreHistogram]

    def key(self, name: str) -> str:
        """The logged key, as transformers rewrites metric keys: `eval_gen` -> `eval/gen_worst_samples`."""
        group, _, rest = self.prefix.partition("_")
        return f"{group}/{rest + '_' if rest else ''}{name}"

    def columns(self) -> list[str]:
        scores = list(self.views[0].scores) if self.views else []
        extra = list(self.views[0].columns) if self.views else []
        return ["rank", "sample_index", *scores, "reference", "prediction", *extra]

    def rows(self) -> list[list[Any]]:
        return [[rank, view.sample_index, *view.scores.values(), _clip(view.reference), _clip(view.prediction),
                 *[_clip(str(value)) for value in view.columns.values()]]
                for rank, view in enumerate(self.views, 1)]


def spills_of_evaluation(spill_dir: Path) -> list[Path]:
    """The spill itself, or its parts (`teacher_forced/`, `generation/`) when the evaluation generated."""
    if (spill_dir / MANIFEST_NAME).exists():
        return [spill_dir]
    return [spill_dir / part for part in PARTS if (spill_dir / part / MANIFEST_NAME).exists()]


def gather(spill: Path, n: int, *, by: str = "token_accuracy") -> EvalSamples:
    """The n worst samples by `by` and the histogram of every default score, in one bounded pass over the spill."""
    reader = SpillReader(spill)
    has_logprob = reader.manifest.has_logprob
    worst_score = resolve_scores([by], has_logprob=has_logprob, has_tokenizer=reader.tokenizer is not None)[0]
    scores = default_scores(has_logprob=has_logprob)
    scores += [worst_score] if worst_score not in scores else []
    histograms, worst = ScoreHistograms(scores), WorstSamples(worst_score, n)
    scan(reader, scores, [histograms, worst], desc="logging samples")
    prefix = reader.manifest.extra.get("metric_key_prefix")
    return EvalSamples(prefix=prefix if isinstance(prefix, str) and prefix else "eval", by=by,
                       views=ranked_views(worst.result(), reader.tokenizer),
                       histograms=[h for h in histograms.by_name.values() if h.samples])


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + f"… ({len(text):,} characters)"


# ----------------------------------------------------------------------------------------------- sinks
def log_to_wandb(wandb: Any, samples: EvalSamples, step: int) -> None:
    """One `wandb.log` with the table and the histograms, stepped like `WandbCallback`'s own logs."""
    import matplotlib.pyplot as plt

    from .report.figures import histogram_caption, histogram_figure

    payload: dict[str, Any] = {
        samples.key("worst_samples"): wandb.Table(columns=samples.columns(), data=samples.rows()),
    }
    for histogram in samples.histograms:
        fig = histogram_figure(histogram)
        try:
            payload[samples.key(f"histogram_{histogram.score.name}")] = wandb.Image(
                fig, caption=histogram_caption(histogram))
        finally:
            plt.close(fig)
    wandb.log({**payload, "train/global_step": step})


def log_to_tensorboard(writer: Any, samples: EvalSamples, step: int) -> None:
    """The table as markdown text and each histogram as a figure, at the global step."""
    from .report.figures import histogram_figure

    writer.add_text(samples.key("worst_samples"), markdown_table(samples), global_step=step)
    for histogram in samples.histograms:
        writer.add_figure(samples.key(f"histogram_{histogram.score.name}"), histogram_figure(histogram),
                          global_step=step, close=True)
    writer.flush()


def markdown_table(samples: EvalSamples) -> str:
    """The worst samples as a markdown table (TensorBoard's text plugin renders it)."""
    columns = samples.columns()
    lines = [f"worst {len(samples.views)} samples by {samples.by}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in samples.rows():
        lines.append("| " + " | ".join(_markdown_cell(value) for value in row) + " |")
    return "\n".join(lines)


def _markdown_cell(value: Any) -> str:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>") or " "


# ----------------------------------------------------------------------------------------------- the callback
class SampleLoggingCallback(TrainerCallback):
    """After each evaluation, the worst `n` samples and the score histograms of its spill(s) to the W&B run and the
    TensorBoard writer of the trainer's `report_to` integrations (on the main process)."""

    def __init__(self, spill_dir: Callable[[], Path | None], callbacks: Callable[[], list[Any]], n: int,
                 by: str = "token_accuracy") -> None:
        self._spill_dir, self._callbacks, self.n, self.by = spill_dir, callbacks, n, by

    @classmethod
    def for_trainer(cls, trainer: Any, n: int, by: str = "token_accuracy") -> "SampleLoggingCallback":
        """Reads the trainer's latest spill and callbacks through a weak reference (no cycle keeps it alive)."""
        ref = weakref.ref(trainer)
        return cls(lambda: getattr(ref(), "last_spill_dir", None),
                   lambda: list(ref().callback_handler.callbacks) if ref() is not None else [], n, by)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not self.n:
            return
        spill_dir = self._spill_dir()
        sinks = active_sinks(self._callbacks())
        if spill_dir is None or not sinks:
            return
        for spill in spills_of_evaluation(Path(spill_dir)):
            samples = gather(spill, self.n, by=self.by)
            for log in sinks:
                log(samples, int(state.global_step))


def active_sinks(callbacks: list[Any]) -> list[Callable[[EvalSamples, int], None]]:
    """The W&B and TensorBoard integrations among the trainer's callbacks that have a run / writer open."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    sinks: list[Callable[[EvalSamples, int], None]] = []
    for callback in callbacks:
        if isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None \
                and getattr(callback._wandb, "run", None) is not None:
            sinks.append(lambda samples, step, wandb=callback._wandb: log_to_wandb(wandb, samples, step))
        elif isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            sinks.append(lambda samples, step, writer=callback.tb_writer: log_to_tensorboard(writer, samples, step))
    return sinks
