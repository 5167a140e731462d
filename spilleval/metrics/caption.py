"""CIDEr-D, a corpus metric: document frequencies over every reference of the corpus first, then the scores.

Both passes reuse pycocoevalcap's `CiderScorer` (the CIDEr-D of the COCO caption evaluation: clipped tf-idf
n-gram cosine, Gaussian length penalty, sigma 6). Pass 1 counts, for each n-gram, the samples whose references
contain it, in an on-disk table (`ondisk.py`), so memory does not grow with the corpus. Pass 2 scores one batch
at a time with a `CiderScorer` given those corpus document frequencies and the corpus size, so each per-sample
score is the one pycocoevalcap computes on the whole corpus, and the result equals
`pycocoevalcap.cider.cider.Cider().compute_score(gts, res)[0]`.

Tokenization: pycocoevalcap splits captions on whitespace; its `PTBTokenizer` (which needs Java) is not applied.
Captions are lowercased (`lowercase=True`) and split on whitespace on both sides; to reproduce the number, pass
the same lowercased strings to `Cider().compute_score`.

pycocoevalcap is an optional extra (`pip install 'spilleval[cider]'`), imported when the metric is built.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Iterator

from .base import BatchSize, CorpusMetric, NgramOrder
from .deps import require
from .inputs import references_of
from .ondisk import ScratchStore
from .registry import register
from .sums import ExactSum

if TYPE_CHECKING:
    from ..spill import SpillReader

Ngram = tuple[str, ...]


class _CorpusSizedList(list):
    """`CiderScorer.compute_cider` sets its idf offset to log(len(crefs)), the number of images. Scoring one batch
    needs the corpus's number, so the batch's reference list reports the corpus size as its length."""

    def __init__(self, corpus_size: int) -> None:
        super().__init__()
        self.corpus_size = corpus_size

    def __len__(self) -> int:
        return self.corpus_size


@register("cider")
class Cider(CorpusMetric):
    """CIDEr-D (pycocoevalcap's scale, about 0-10) over decoded predictions and their references."""

    scale = "0–10 (pycocoevalcap; papers print ×100)"

    needs_text = True

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
        self.scorer_module = require("pycocoevalcap.cider.cider_scorer", self.name)

    def params(self) -> dict[str, Any]:
        return {
            "references_column": self.references_column,
            "lowercase": self.lowercase,
            "n": self.n,
            "sigma": self.sigma,
            "batch_size": self.batch_size,
        }

    def compute(self, reader: "SpillReader") -> dict[str, float]:
        with CiderCorpus(reader.path, self.scorer_module, n=self.n, sigma=self.sigma) as corpus:
            for _, refs in self._captions(reader):
                corpus.count(refs)
            if not corpus.images:
                return {"cider": 0.0}
            total = ExactSum()
            for hyps, refs in self._captions(reader):
                total.add(corpus.score(hyps, refs))
            return {"cider": total.value / corpus.images}

    def _captions(self, reader: "SpillReader") -> Iterator[tuple[list[str], list[list[str]]]]:
        """(predictions, references) per batch, lowercased when asked."""
        fold = str.lower if self.lowercase else (lambda s: s)
        for batch in reader.iter_batches(self.batch_size, decode=True, with_arrays=False):
            refs = references_of(batch, self.references_column, self.name)
            yield [fold(p) for p in batch.pred_text or []], [[fold(r) for r in rs] for rs in refs]


class CiderCorpus:
    """CIDEr-D document frequencies of a corpus, on disk, and the per-sample scores they give.

    `count` every batch's references first (pass 1), then `score` batches (pass 2): each value is the per-image
    score pycocoevalcap's `Cider().compute_score` returns for that sample on the whole corpus. Memory: one batch and
    SQLite's page cache; the document frequencies live in a scratch table next to the spill.
    """

    def __init__(self, near: Any, scorer_module: Any, *, n: int = 4, sigma: float = 6.0) -> None:
        self.scorer_module, self.n, self.sigma = scorer_module, n, sigma
        self.store = ScratchStore(near)
        self.document_frequency = self.store.counter("document_frequency")
        self.images = 0

    def count(self, refs: list[list[str]]) -> None:
        """Pass 1: add one batch's references (one list per sample) to the document frequencies."""
        in_documents: Counter[str] = Counter()
        for sample_refs in refs:
            in_documents.update({_key(g) for ref in self.scorer_module.cook_refs(sample_refs, self.n) for g in ref})
        self.document_frequency.add(in_documents.items())
        self.images += len(refs)

    def score(self, hyps: list[str], refs: list[list[str]]) -> list[float]:
        """Pass 2: the CIDEr-D of each sample of one batch, against the whole corpus's document frequencies."""
        scorer = self.scorer_module.CiderScorer(n=self.n, sigma=self.sigma)
        scorer.crefs = _CorpusSizedList(self.images)
        for hyp, sample_refs in zip(hyps, refs):
            scorer += (hyp, sample_refs)
        needed = {g for test in scorer.ctest for g in test} | {g for c in scorer.crefs for r in c for g in r}
        ngram_of = {_key(g): g for g in needed}
        counts = self.document_frequency.get(ngram_of)
        scorer.document_frequency = defaultdict(float, {ngram_of[k]: float(c[0]) for k, c in counts.items()})
        return [float(x) for x in scorer.compute_cider()]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "CiderCorpus":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(ngram: Ngram) -> str:
    """An n-gram as one string: words come from str.split(), so none contains a space and the join is unique."""
    return " ".join(ngram)
