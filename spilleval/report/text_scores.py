"""Per-sample scores of generated text against every reference of the sample: what `worst`, `report` and `show`
rank and plot on a generation spill (captioning, VQA), where position-by-position token scores mean nothing.

Each score is the reference library's sentence-level score, on the text the corpus metrics read (the decoded
prediction, skip_special_tokens=True, and the references: the spill's references column, else the decoded label):

- `sentence_bleu`, `sentence_chrf` (0-100): `sacrebleu.sentence_bleu` / `sentence_chrf` with the references.
- `rougeL` (0-1): rouge-score's ROUGE-L F-measure, the best reference (`RougeScorer.score_multi`).
- `squad_exact_match`, `squad_f1` (0-100): the SQuAD v1.1 script's scores, maximum over the references.
- `answer_exact_match` (0/1): the prediction equals one of the references, surrounding whitespace stripped.
- `cider` (about 0-10): pycocoevalcap's per-image CIDEr-D, lowercased and split on whitespace like the `cider`
  metric. Its idf needs the whole corpus's document frequencies: the first batch it scores starts a pass over the
  spill that counts them into on-disk sorted runs (`CiderCorpus`), so memory stays one batch.

Memory: a decode window, CIDEr's scratch table on disk and SQLite's cache, and sacrebleu's tokenizer caches
(`lru_cache(maxsize=2**16)` lines each: a fixed bound of tens of MiB). Measured: peak RSS of `worst --by cider` 513
MiB on 2,000 captions, 578 MiB on 60,000 (4,096-row chunks), most of the difference those caches filling up.

Where a corpus metric has the same name, the mean of the per-sample score is that metric (e.g. `squad_f1`,
`rougeL`, `cider`); sentence BLEU and chrF average differently from corpus BLEU and chrF, hence their names.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..batch import SampleBatch
from ..metrics.deps import require
from ..metrics.inputs import references_of
from ..metrics.squad import best_scores
from .scores import SampleScore, ScoreError

if TYPE_CHECKING:
    from ..spill import SpillReader

CIDER_PASS_BATCH = 1024  # samples decoded at a time while counting CIDEr's document frequencies
DEFAULT_TEXT_SCORES = ("squad_f1", "squad_exact_match", "answer_exact_match", "sentence_bleu", "sentence_chrf",
                       "rougeL", "cider")
DEFAULT_RANKING = "squad_f1"  # `worst` and `report` on a generation spill: cheap, and fits answers and captions


def references_column(reader: "SpillReader") -> str | None:
    """The dataset column holding each sample's references: the generation evaluation's `references_column`, else
    the one a recorded metric reads; None: the decoded label is the single reference."""
    generation = reader.manifest.extra.get("generation")
    if isinstance(generation, dict) and isinstance(generation.get("references_column"), str):
        return generation["references_column"]
    for spec in reader.manifest.metrics:
        column = (spec.get("params") or {}).get("references_column")
        if isinstance(column, str):
            return column
    return None


def sample_references(batch: SampleBatch, column: str | None) -> list[list[str]]:
    """Every reference of every sample of a decoded batch (as the text metrics read them)."""
    return references_of(batch, column, "per-sample text scores")


class TextScores:
    """The text scores of one spill, bound to its references column (and, for CIDEr, to its corpus)."""

    def __init__(self, reader: "SpillReader") -> None:
        self.reader = reader
        self.column = references_column(reader)
        self._cider: Any = None

    def all(self) -> dict[str, SampleScore]:
        make = lambda name, fn, **kw: SampleScore(name, self._scorer(fn), needs_text=True, **kw)  # noqa: E731
        return {s.name: s for s in (
            make("squad_f1", _squad_f1, higher_is_better=True, resolution=0.01, upper=100.0,
                 description="SQuAD token F1 of the prediction and its best reference (0-100)"),
            make("squad_exact_match", _squad_exact_match, higher_is_better=True, resolution=100.0, upper=100.0,
                 description="100 when the prediction equals a reference after SQuAD normalisation (case, "
                             "punctuation, articles, spaces)"),
            make("answer_exact_match", _answer_exact_match, higher_is_better=True, resolution=1.0,
                 description="1 when the prediction equals one of the references (surrounding spaces stripped)"),
            make("sentence_bleu", _sentence_bleu, higher_is_better=True, resolution=0.01, upper=100.0,
                 description="sacrebleu.sentence_bleu against every reference (0-100)"),
            make("sentence_chrf", _sentence_chrf, higher_is_better=True, resolution=0.01, upper=100.0,
                 description="sacrebleu.sentence_chrf against every reference (0-100)"),
            make("rougeL", _rouge_l, higher_is_better=True,
                 description="ROUGE-L F-measure against the best reference (rouge-score)"),
            SampleScore("cider", self._cider_scores, higher_is_better=True, needs_text=True, upper=10.0,
                        description="CIDEr-D of the sample with the corpus's document frequencies (pycocoevalcap, "
                                    "lowercased, whitespace tokens; a pass over the spill first)"),
        )}

    def _scorer(self, fn: Callable[[list[str], list[list[str]]], list[float]]) -> Callable[[SampleBatch], np.ndarray]:
        def compute(batch: SampleBatch) -> np.ndarray:
            return np.asarray(fn(_predictions(batch), sample_references(batch, self.column)), dtype=np.float64)

        return compute

    def _cider_scores(self, batch: SampleBatch) -> np.ndarray:
        if self._cider is None:
            self._cider = self._count_cider_corpus()
        if not self._cider.images:
            return np.zeros(len(batch))
        refs = [[r.lower() for r in rs] for rs in sample_references(batch, self.column)]
        return np.asarray(self._cider.score([p.lower() for p in _predictions(batch)], refs), dtype=np.float64)

    def _count_cider_corpus(self) -> Any:
        """Pass 1 of CIDEr-D: the document frequencies of every reference of the spill, in a scratch table."""
        from ..metrics.caption import CiderCorpus

        corpus = CiderCorpus(self.reader.path)
        weakref.finalize(self, corpus.close)  # the scratch table lives as long as these scores
        columns = [self.column] if self.column else []
        for batch in self.reader.iter_batches(CIDER_PASS_BATCH, decode=True, columns=columns, with_arrays=False,
                                              with_logprob=False):
            corpus.count([[r.lower() for r in rs] for rs in sample_references(batch, self.column)])
        return corpus


def check_available(score: SampleScore) -> None:
    """Import the reference library a text score needs, or raise the error naming the extra to install."""
    module = {"rougeL": "rouge_score.rouge_scorer"}.get(score.name)
    if module is not None:
        require(module, score.name)


def installed(score: SampleScore) -> bool:
    try:
        check_available(score)
    except ImportError:
        return False
    return True


def _predictions(batch: SampleBatch) -> list[str]:
    if batch.pred_text is None:
        raise ScoreError("per-sample text scores need decoded text: the batch was not decoded")
    return batch.pred_text


# ----------------------------------------------------------------------------------------------- the scorers
def _squad_f1(preds: list[str], refs: list[list[str]]) -> list[float]:
    return (100.0 * best_scores(preds, refs)[1]).tolist()


def _squad_exact_match(preds: list[str], refs: list[list[str]]) -> list[float]:
    return (100.0 * best_scores(preds, refs)[0]).tolist()


def answer_matches(prediction: str, refs: list[str]) -> list[bool]:
    """Per reference: does the prediction equal it, surrounding whitespace stripped (what `answer_exact_match`
    counts, and what the report marks as matched)."""
    answer = prediction.strip()
    return [answer == r.strip() for r in refs]


def _answer_exact_match(preds: list[str], refs: list[list[str]]) -> list[float]:
    return [float(any(answer_matches(p, rs))) for p, rs in zip(preds, refs)]


def _sentence_bleu(preds: list[str], refs: list[list[str]]) -> list[float]:
    bleu = _sacrebleu_metric("BLEU", effective_order=True)  # sacrebleu.sentence_bleu's settings
    return [bleu.sentence_score(p, rs).score for p, rs in zip(preds, refs)]


def _sentence_chrf(preds: list[str], refs: list[list[str]]) -> list[float]:
    chrf = _sacrebleu_metric("CHRF")
    return [chrf.sentence_score(p, rs).score for p, rs in zip(preds, refs)]


def _rouge_l(preds: list[str], refs: list[list[str]]) -> list[float]:
    scorer = _rouge_scorer()
    return [scorer.score_multi(rs, p)["rougeL"].fmeasure for p, rs in zip(preds, refs)]


_CACHE: dict[tuple, Any] = {}


def _sacrebleu_metric(name: str, **options: Any) -> Any:
    key = (name, tuple(sorted(options.items())))
    if key not in _CACHE:
        _CACHE[key] = getattr(require("sacrebleu.metrics", "sentence_" + name.lower()), name)(**options)
    return _CACHE[key]


def _rouge_scorer() -> Any:
    if "rougeL" not in _CACHE:
        _CACHE["rougeL"] = require("rouge_score.rouge_scorer", "rougeL").RougeScorer(["rougeL"])
    return _CACHE["rougeL"]
