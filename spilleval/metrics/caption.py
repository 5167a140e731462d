"""CIDEr-D, a corpus metric: document frequencies over every reference of the corpus first, then the scores.

It equals pycocoevalcap's `Cider().compute_score(gts, res)[0]` (the CIDEr-D of the COCO caption evaluation:
clipped tf-idf n-gram cosine, Gaussian length penalty, sigma 6): each sample's score is the one pycocoevalcap's
`CiderScorer` computes for it on the whole corpus, to the bit (`cider_vectors.py` does its arithmetic in numpy, in
its order), and the corpus score is their exactly rounded mean. Two map/merge passes (`mapmerge.py`): pass 1
counts, for each n-gram, the samples whose references contain it, into an on-disk table (`ngram_table.py`), so
memory does not grow with the corpus (each task writes its rows as a sorted run, the parent merges the runs);
pass 2 scores each batch with the corpus document frequencies and the corpus size, read from that table, in any
process.

Tokenization: pycocoevalcap splits captions on whitespace; its `PTBTokenizer` (which needs Java) is not applied.
Captions are lowercased (`lowercase=True`) and split on whitespace on both sides; to reproduce the number, pass
the same lowercased strings to `Cider().compute_score`. Like pycocoevalcap, it counts 1- to 4-grams; `n` above 4
averages over `n` orders of which those above 4 score 0, as `CiderScorer(n=n)` does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ..batch import SampleBatch
from . import exact_sum
from .base import BatchSize, NgramOrder
from .cider_vectors import cider_scores, document_frequencies
from .inputs import references_of
from .mapmerge import MapMergeMetric, scratch_dir
from .ngram_table import NgramCounts, NgramCountWriter, write_runs
from .registry import register

DOCUMENT_FREQUENCY, SCORES = 0, 1  # the two passes


@register("cider")
class Cider(MapMergeMetric):
    """CIDEr-D (pycocoevalcap's scale, about 0-10) over decoded predictions and their references."""

    scale = "0–10 (pycocoevalcap; papers print ×100)"
    needs_text = True
    passes = 2

    def __init__(
        self,
        references_column: str | None = None,
        lowercase: bool = True,
        n: NgramOrder = 4,
        sigma: float = 6.0,
        batch_size: BatchSize = 1024,
    ) -> None:
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.lowercase = lowercase
        self.n = n
        self.sigma = sigma
        self.batch_size = batch_size

    def params(self) -> dict[str, Any]:
        return {
            "references_column": self.references_column,
            "lowercase": self.lowercase,
            "n": self.n,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
        }

    # ------------------------------------------------------------------------------------------- parent
    def start(self, near: Path) -> None:
        self._runs = self.scratch_directory(near)
        self._writer = NgramCountWriter(self._runs / "document_frequency", pool=self.pool)
        self._images = 0
        self._total = exact_sum.zeros()

    def context(self, pass_index: int) -> Any:
        if pass_index == SCORES:
            return {"runs": [str(p) for p in self._writer.finish()], "corpus_size": self._images}
        return {"scratch": str(self._runs)}

    def merge(self, pass_index: int, partial: Any) -> None:
        if pass_index == DOCUMENT_FREQUENCY:
            images, runs = partial
            self._images += images
            for run in runs:
                self._writer.adopt(run)
        else:
            self._total = exact_sum.merge(self._total, partial)

    def finish(self) -> dict[str, float]:
        if not self._images:
            return {"cider": 0.0}
        return {"cider": exact_sum.value(self._total) / self._images}

    # ------------------------------------------------------------------------------------------- any process
    def map(self, pass_index: int, batch: SampleBatch, context: Any) -> Any:
        if pass_index == DOCUMENT_FREQUENCY:  # the references alone: the predictions are not decoded
            refs = self._references(batch)
            return (len(refs), *document_frequencies(refs))
        hyps, refs = self._predictions(batch), self._references(batch)
        if not len(hyps):
            return exact_sum.zeros()
        table = _open_table(context["runs"])
        scores = cider_scores(hyps, refs, table.get, corpus_size=context["corpus_size"], n=self.n, sigma=self.sigma)
        return exact_sum.add(exact_sum.zeros(), scores)

    def reduce_task(self, pass_index: int, partials: list[Any], context: Any) -> list[Any]:
        """Pass 1: (images, runs) of the task, its document-frequency rows written as sorted runs (a sample's
        n-grams count once, in its batch; a sample is in one task only, so the parent's sums are the corpus's).
        Pass 2: the task's exact sum."""
        if pass_index == DOCUMENT_FREQUENCY:
            runs = write_runs(context["scratch"], (partial[1:] for partial in partials))
            return [(sum(partial[0] for partial in partials), runs)]
        return [functools.reduce(exact_sum.merge, partials, exact_sum.zeros())]

    def _predictions(self, batch: SampleBatch) -> list[str]:
        return [p.lower() for p in batch.pred_text or []] if self.lowercase else list(batch.pred_text or [])

    def _references(self, batch: SampleBatch) -> list[list[str]]:
        refs = references_of(batch, self.references_column, self.name)
        return [[r.lower() for r in rs] for rs in refs] if self.lowercase else refs


_OPEN: dict[tuple[str, ...], NgramCounts] = {}


def _open_table(runs: list[str]) -> NgramCounts:
    """The document-frequency table of a pass, memory-mapped once per process (the last one only)."""
    key = tuple(runs)
    if key not in _OPEN:
        _OPEN.clear()
        _OPEN[key] = NgramCounts(runs)
    return _OPEN[key]


class CiderCorpus:
    """CIDEr-D document frequencies of a whole spill and the per-sample scores they give, for the per-sample `cider`
    score of `spilleval worst/report` (`report/text_scores.py`): `count` every batch's references first, then
    `score` batches; each value is the per-image score pycocoevalcap's `Cider().compute_score` gives that sample on
    the whole corpus (the same arithmetic as the `cider` metric). Memory: one batch; the document frequencies live
    in memory-mapped sorted runs in a scratch directory next to the spill."""

    def __init__(self, near: Any, *, n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        self._scratch = scratch_dir(near)
        self._writer = NgramCountWriter(Path(self._scratch.name) / "document_frequency")
        self._table: NgramCounts | None = None
        self.images = 0

    def count(self, refs: list[list[str]]) -> None:
        """Pass 1: add one batch's references (one list per sample) to the document frequencies."""
        self._writer.add(*document_frequencies(refs))
        self.images += len(refs)

    def score(self, hyps: list[str], refs: list[list[str]]) -> list[float]:
        """Pass 2: the CIDEr-D of each sample of one batch, against the whole corpus's document frequencies."""
        if self._table is None:
            self._table = NgramCounts([str(p) for p in self._writer.finish()])
        scores = cider_scores(hyps, refs, self._table.get, corpus_size=self.images, n=self.n, sigma=self.sigma)
        return [float(x) for x in scores]

    def close(self) -> None:
        self._table = None
        self._scratch.cleanup()

    def __enter__(self) -> "CiderCorpus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
