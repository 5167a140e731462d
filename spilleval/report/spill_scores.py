"""Which per-sample scores a spill offers, which ones every command shows, and what `worst` ranks by.

A teacher-forced spill gets the token scores (`scores.py`). A generation spill (manifest task "generation") gets
the text scores of `text_scores.py` instead: its generated rows are not aligned with the reference ids, so a
position-by-position score (`token_accuracy`) is refused there, as `compute` refuses the token metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..metrics.runner import GENERATION_TASK
from .scores import SampleScore, ScoreError, available_scores, default_scores
from .text_scores import (
    DEFAULT_RANKING,
    DEFAULT_TEXT_SCORES,
    TextScores,
    check_available,
    installed,
)

if TYPE_CHECKING:
    from ..spill import SpillReader

TEACHER_FORCED_RANKING = "token_accuracy"
UNDECODED_GENERATION_SCORES = ("exact_match", "token_f1", "length")  # a generation spill without tokenizer/


class SpillScores:
    """The per-sample scores of one spill; its text scores share one CIDEr corpus pass."""

    def __init__(self, reader: "SpillReader") -> None:
        self.reader = reader
        self.generation = reader.manifest.task == GENERATION_TASK
        self.has_logprob = reader.manifest.has_logprob
        self._text: dict[str, SampleScore] | None = None

    @property
    def text(self) -> dict[str, SampleScore]:
        if self._text is None:
            self._text = TextScores(self.reader).all()
        return self._text

    def known(self) -> list[str]:
        return list(available_scores()) + [n for n in DEFAULT_TEXT_SCORES if n not in available_scores()]

    def resolve(self, names: Iterable[str]) -> list[SampleScore]:
        """Scores by name, failing before any pass when one is unknown or cannot run on this spill."""
        out = []
        for name in names:
            if name in DEFAULT_TEXT_SCORES:
                score = self._text_score(name)
            elif name not in available_scores():
                raise ScoreError(f"unknown per-sample score {name!r}. Known: {', '.join(self.known())}")
            else:
                score = available_scores()[name]
                self._check_base(score)
            out.append(score)
        return out

    def defaults(self, *, corpus_pass: bool = True) -> list[SampleScore]:
        """What every command shows. Generation: the text scores whose library is installed (`cider` only with
        `corpus_pass`: it reads the whole spill first) and the reference length; without a tokenizer to decode
        with, the scores of the ids that do not compare positions."""
        if not self.generation:
            return default_scores(has_logprob=self.has_logprob)
        if not self.decodes:
            return [available_scores()[n] for n in UNDECODED_GENERATION_SCORES]
        names = [n for n in DEFAULT_TEXT_SCORES if corpus_pass or n != "cider"]
        return [s for s in (self.text[n] for n in names) if installed(s)] + [available_scores()["length"]]

    def ranking(self) -> str:
        """The score `worst` and `report` rank by when none is named."""
        if not self.generation:
            return TEACHER_FORCED_RANKING
        return DEFAULT_RANKING if self.decodes else UNDECODED_GENERATION_SCORES[1]

    @property
    def decodes(self) -> bool:
        """Whether the spill has a tokenizer to decode text with."""
        return self.reader.tokenizer is not None

    def with_defaults(self, by: str | None, *, corpus_pass: bool = True) -> tuple[SampleScore, list[SampleScore]]:
        """(the ranking score, the defaults with it added)."""
        score = self.resolve([by or self.ranking()])[0]
        scores = self.defaults(corpus_pass=corpus_pass)
        return score, scores + ([score] if score not in scores else [])

    def _text_score(self, name: str) -> SampleScore:
        self.reader.require_tokenizer()
        score = self.text[name]
        check_available(score)
        return score

    def _check_base(self, score: SampleScore) -> None:
        if score.positional and self.generation:
            raise ScoreError(
                f"per-sample score {score.name!r} compares ids position by position, which generated ids are not: "
                f"rank a generation spill by a text score ({', '.join(DEFAULT_TEXT_SCORES)})"
            )
        if score.needs_logprob and not self.has_logprob:
            raise ScoreError(
                f"per-sample score {score.name!r} needs label log-probabilities, but this spill was written without "
                "them: evaluate with keep_logprob=True, or pick another score (token_accuracy, token_f1, ...)"
            )
        if score.needs_text:
            self.reader.require_tokenizer()


def scores_of(reader: "SpillReader") -> SpillScores:
    """The per-sample scores of this reader's spill. Take the ranking score and the defaults from one object
    (`with_defaults`), so that the CIDEr corpus pass runs once."""
    return SpillScores(reader)
