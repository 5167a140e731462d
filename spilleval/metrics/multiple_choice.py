"""Multiple choice by log-likelihood (MMLU, ARC, HellaSwag; ScienceQA, MMBench, SEED-Bench-style for VLMs).

Each choice of a question is one evaluated sample: the prompt (and image) unsupervised, the supervised tokens the
choice's continuation, so the sample's summed label log-probabilities are the choice's log-likelihood, what
lm-evaluation-harness's `loglikelihood(context, continuation)` request returns. Two dataset columns say how samples
make questions: `question_column` (an int or a string, the same for every choice of one question) and
`target_column` (true for the right choice; several may be right, as lm-evaluation-harness's multiple targets).
The choices of a question are in dataset order (sample index); a tie goes to the first, as `np.argmax`.

Per question, lm-evaluation-harness's `process_results` for `multiple_choice` (lm_eval/api/task.py), then the mean
over questions:
- `mc_accuracy` (its `acc`): the choice of highest log-likelihood is right;
- `mc_accuracy_norm` (`acc_norm`): the highest log-likelihood / len(choice string), in characters;
- `mc_accuracy_bytes` (`acc_bytes`): the highest log-likelihood / UTF-8 bytes of the choice string;
- `mc_accuracy_token_norm`: the highest log-likelihood / supervised tokens of the choice;
- `mc_questions`: the number of questions.
The choice string is `choice_column` when given: lm-evaluation-harness's `doc_to_choice` strings, without the
target delimiter (" ") that its continuation starts with. Without it, it is the decoded continuation
(skip_special_tokens=True), which keeps that delimiter when the tokenizer decodes a leading space: pass the strings
to get `acc_norm` exactly. A log-likelihood is the exact float64 sum of the choice's float32 label log-probs
(lm-evaluation-harness sums them in float32 on the device; the two can only disagree on choices that tie within
float32 rounding).

The choices of a question may be anywhere in the spill (other batches, chunks, ranks). One pass writes a row per
choice (question, sample index, log-likelihood, lengths, right) to an on-disk table (`ondisk.py`) whose B-tree
sorts it by question and index; one ordered scan then takes each question's argmaxes as running maxima, so memory
holds one row, however many questions and choices there are.
"""

from __future__ import annotations

import json
import math
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..batch import SampleBatch
from .base import BatchSize
from .inputs import MetricInputError, column_of
from .mapmerge import MapMergeMetric
from .registry import register

# result key -> the length the log-likelihood is divided by (None: not normalised)
NORMALISATIONS = {
    "mc_accuracy": None,
    "mc_accuracy_norm": "chars",
    "mc_accuracy_bytes": "bytes",
    "mc_accuracy_token_norm": "tokens",
}
KEY = (("question", "TEXT"), ("sample", "INTEGER"))
VALUES = (("loglikelihood", "REAL"), ("tokens", "INTEGER"), ("chars", "INTEGER"), ("bytes", "INTEGER"),
          ("is_right", "INTEGER"))
Row = tuple[str, int, float, int, int, int, int]


@register("mc_accuracy")
class MultipleChoiceAccuracy(MapMergeMetric):
    """mc_accuracy, mc_accuracy_norm, mc_accuracy_bytes, mc_accuracy_token_norm and mc_questions (see the module
    docstring); needs keep_logprob=True."""

    outputs = ("mc_accuracy", "mc_accuracy_norm", "mc_accuracy_bytes", "mc_accuracy_token_norm", "mc_questions")
    scale = "0–1"
    scales = {"mc_questions": "count"}

    needs_logprob = True
    binary_mean_outputs = dict.fromkeys(NORMALISATIONS, "mc_questions")  # right or not, per question

    def __init__(
        self,
        question_column: str = "question_id",
        target_column: str = "choice_target",
        choice_column: str | None = None,
        batch_size: BatchSize = 4096,
    ) -> None:
        self.question_column = question_column
        self.target_column = target_column
        self.choice_column = choice_column
        self.batch_size = batch_size
        self.needs_columns = tuple(c for c in (question_column, target_column, choice_column) if c)
        self.needs_text = choice_column is None

    def params(self) -> dict[str, Any]:
        return {
            "question_column": self.question_column,
            "target_column": self.target_column,
            "choice_column": self.choice_column,
            "batch_size": self.batch_size,
        }

    def start(self, near: Path) -> None:
        self._table = self.scratch(near).rows("choices", key=KEY, values=VALUES)

    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> list[Row]:
        return self.choice_rows(batch)

    def merge(self, pass_index: int, partial: list[Row]) -> None:
        self._table.add(partial)

    def finish(self) -> dict[str, float]:
        right, questions = score_questions(self._table.scan_rows(), self._question_without_answer)
        if questions == 0:
            return {**{key: math.nan for key in NORMALISATIONS}, "mc_questions": 0}
        return {**{key: right[key] / questions for key in NORMALISATIONS}, "mc_questions": questions}

    def choice_rows(self, batch: SampleBatch) -> list[Row]:
        """One row per sample of the batch: its question, index, log-likelihood, lengths and whether it is right."""
        questions = column_of(batch, self.question_column, self.name)
        targets = column_of(batch, self.target_column, self.name)
        choices = column_of(batch, self.choice_column, self.name) if self.choice_column else batch.label_text
        if choices is None:
            raise MetricInputError(f"metric {self.name!r} needs the decoded continuations: the batch was not decoded")
        rows = []
        for i, (question, target, choice, tokens) in enumerate(zip(questions, targets, choices,
                                                                  batch.lengths.tolist())):
            sample = int(batch.sample_index[i])
            if tokens == 0:
                raise MetricInputError(
                    f"metric {self.name!r}: sample {sample} (a choice of question {question!r}) has no supervised "
                    "token, so its continuation has no log-likelihood. Supervise the choice's tokens (labels != -100)."
                )
            if not isinstance(choice, str):
                raise MetricInputError(
                    f"metric {self.name!r}: column {self.choice_column!r} of sample {sample} holds "
                    f"{type(choice).__name__}, not the choice's string"
                )
            loglikelihood = math.fsum(batch.logprob_row(i).astype(np.float64).tolist())
            rows.append((self._question_key(question, sample), sample, loglikelihood, tokens, len(choice),
                         len(choice.encode("utf-8")), int(self._is_right(target, sample))))
        return rows

    def _question_key(self, value: Any, sample: int) -> str:
        """The question as a sortable string key that keeps ints and strings apart (1 and "1" are two questions)."""
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return json.dumps(value)
        raise MetricInputError(
            f"metric {self.name!r}: column {self.question_column!r} of sample {sample} holds {value!r}; a question "
            "id is an int or a string, the same for every choice of one question."
        )

    def _is_right(self, value: Any, sample: int) -> bool:
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise MetricInputError(
            f"metric {self.name!r}: column {self.target_column!r} of sample {sample} holds {value!r}; it marks the "
            "right choice with True (or 1) and the others with False (or 0)."
        )

    def _question_without_answer(self, question: str) -> MetricInputError:
        return MetricInputError(
            f"metric {self.name!r}: no choice of question {json.loads(question)!r} is marked right in column "
            f"{self.target_column!r}. Mark its right choice with True."
        )


def score_questions(rows: Iterable[Row], no_answer: Callable[[str], Exception]) -> tuple[dict[str, int], int]:
    """(right answers per result key, questions) from rows sorted by (question, sample index): the consecutive
    rows of a question are its choices in dataset order."""
    right = dict.fromkeys(NORMALISATIONS, 0)
    questions = 0
    for question, choices in groupby(rows, key=lambda row: row[0]):
        best: dict[str, tuple[float, int]] = {}
        any_right = False
        for _, _, loglikelihood, tokens, chars, nbytes, is_right in choices:
            lengths = {"tokens": tokens, "chars": chars, "bytes": nbytes}
            any_right |= bool(is_right)
            for key, length in NORMALISATIONS.items():
                value = loglikelihood if length is None else numpy_divide(loglikelihood, lengths[length])
                if key not in best or argmax_prefers(value, best[key][0]):
                    best[key] = (value, is_right)
        if not any_right:
            raise no_answer(question)
        questions += 1
        for key, (_, is_right) in best.items():
            right[key] += is_right
    return right, questions


def argmax_prefers(value: float, best: float) -> bool:
    """Whether `np.argmax` moves from `best` (an earlier element) to `value`: a strictly greater value, or the
    first NaN (NaN counts as the maximum); on ties the earlier element stays."""
    if math.isnan(best):
        return False
    return math.isnan(value) or value > best


def numpy_divide(numerator: float, length: int) -> float:
    """`numpy.float64(numerator) / length`, division by zero included (+-inf, or NaN for 0 / 0), without warnings."""
    if length:
        return numerator / length
    if numerator == 0 or math.isnan(numerator):
        return math.nan
    return math.copysign(math.inf, numerator)
