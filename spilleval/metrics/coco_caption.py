"""The COCO caption suite: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as pycocoevalcap's `COCOEvalCap` computes them.

`COCOEvalCap.evaluate` lowercases and tokenizes every caption with Stanford's PTBTokenizer (a Java program bundled
in pycocoevalcap) and drops punctuation tokens, then scores the tokenized captions with pycocoevalcap's `Bleu(4)`,
`Meteor` (a Java program), `Rouge` and `Cider`. This metric runs the same code on the spill in bounded memory:

- PTB tokenization, one batch of captions at a time (the tokenizer works line by line, so batching does not change
  a caption's tokens); the jar is invoked with COCOEvalCap's arguments, its input file written next to the spill
  instead of into pycocoevalcap's package directory.
- BLEU: per sample, `cook_test` against `cook_refs` (closest reference length), summed over the corpus as integers;
  the corpus score is `BleuScorer.compute_score` of those sums, which is what it computes from every sample.
- METEOR: per sample the jar's statistics (`SCORE` line), kept on disk; the corpus score is the jar's answer to
  one `EVAL` line holding every sample's statistics, which is what `Meteor.compute_score` sends (streamed to the
  jar from disk here). The jar does not aggregate them as a plain sum, so the line is sent whole: the JVM holds it
  in memory. pycocoevalcap starts that JVM with `-Xmx2G`, so the metric refuses spills of more than
  `MAX_METEOR_SAMPLES` (1,000,000) samples rather than run the JVM out of memory; this process stays bounded.
- ROUGE-L: the mean of `Rouge.calc_score` per sample (an exact sum; `COCOEvalCap` takes numpy's mean).
- CIDEr-D: `CiderCorpus` (the `cider` metric's two passes) on the tokenized captions, which a scratch table on disk
  keeps between the passes.

SPICE, the fifth score of `COCOEvalCap`, is not part of the suite: it needs Stanford CoreNLP models downloaded at
first use. The whitespace-tokenized `cider` metric stays as it is, under its own name.

Needs Java on PATH (the `java` command) and pycocoevalcap (`pip install 'spilleval[cider]'`); both are checked when
the metric is built. Keys: coco_bleu_1 .. coco_bleu_4, coco_meteor, coco_rouge_l (0-1), coco_cider (about 0-10).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .base import BatchSize, CorpusMetric, MetricConfigError
from .caption import CiderCorpus
from .deps import require
from .inputs import MetricInputError, references_of
from .ondisk import ScratchStore
from .registry import register
from .sums import ExactSum

if TYPE_CHECKING:
    from ..spill import SpillReader

BLEU_ORDER = 4
PYCOCOEVALCAP_MODULES = {
    "ptb": "pycocoevalcap.tokenizer.ptbtokenizer",
    "bleu": "pycocoevalcap.bleu.bleu_scorer",
    "rouge": "pycocoevalcap.rouge.rouge",
    "meteor": "pycocoevalcap.meteor.meteor",
}
MAX_METEOR_SAMPLES = 1_000_000  # one EVAL line of ~75 bytes per sample in METEOR's JVM (-Xmx2G)
PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"


def require_java(metric: str) -> str:
    """The `java` command pycocoevalcap runs, or a MetricConfigError saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise MetricConfigError(
            f"metric {metric!r} runs pycocoevalcap's PTB tokenizer and METEOR, which are Java programs, but there is "
            "no `java` command on PATH: install a Java runtime (e.g. apt-get install default-jre-headless, or "
            "conda install openjdk), or use the whitespace-tokenized 'cider', 'bleu' and 'rouge' metrics."
        )
    return java


@register("coco_caption")
class CocoCaption(CorpusMetric):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D on PTB-tokenized captions, equal to pycocoevalcap's COCOEvalCap."""

    needs_text = True

    def __init__(self, references_column: str | None = None, batch_size: BatchSize = 4096) -> None:
        self.references_column = references_column
        self.needs_columns = (references_column,) if references_column else ()
        self.batch_size = batch_size
        require_java(self.name)
        for module in PYCOCOEVALCAP_MODULES.values():  # fail here, naming the extra, not mid-evaluation
            require(module, self.name)
        self.rouge = require(PYCOCOEVALCAP_MODULES["rouge"], self.name).Rouge()

    @staticmethod
    def _module(part: str) -> ModuleType:
        """A pycocoevalcap module, imported on use: the metric holds none (it is copied and pickled to workers)."""
        return importlib.import_module(PYCOCOEVALCAP_MODULES[part])

    def params(self) -> dict[str, Any]:
        return {"references_column": self.references_column, "batch_size": self.batch_size}

    def compute(self, reader: "SpillReader") -> dict[str, float]:
        if len(reader) > MAX_METEOR_SAMPLES:
            raise MetricConfigError(
                f"metric {self.name!r}: METEOR scores a corpus from one line holding every sample's statistics, "
                f"held by its Java process (at most 2 GiB, as pycocoevalcap starts it); this spill has "
                f"{len(reader):,} samples, more than the {MAX_METEOR_SAMPLES:,} it accepts. Evaluate a subset, or "
                "use 'bleu', 'rouge' and 'cider' (no limit)."
            )
        bleu = BleuSums()
        rouge = ExactSum()
        meteor = self._module("meteor").Meteor()
        samples = 0
        with ScratchStore(reader.path) as store, CiderCorpus(reader.path) as cider:
            tokenized = store.rows("tokenized", key=(("position", "INTEGER"),),
                                   values=(("hypothesis", "TEXT"), ("refs", "TEXT"), ("meteor", "TEXT")))
            for hyps, refs in self._tokenized_batches(reader):
                bleu.add(self._module("bleu"), hyps, refs)
                rouge.add([self.rouge.calc_score([h], rs) for h, rs in zip(hyps, refs)])
                cider.count(refs)
                with meteor.lock:
                    stats = [meteor._stat(h, rs) for h, rs in zip(hyps, refs)]
                tokenized.add((samples + i, h, "\n".join(rs), st)
                              for i, (h, rs, st) in enumerate(zip(hyps, refs, stats)))
                samples += len(hyps)
            if not samples:
                return {**{f"coco_bleu_{k}": 0.0 for k in range(1, BLEU_ORDER + 1)}, "coco_meteor": 0.0,
                        "coco_rouge_l": 0.0, "coco_cider": 0.0}
            cider_total = ExactSum()
            for hyps, refs in _blocks(tokenized.scan_rows(), self.batch_size):
                cider_total.add(cider.score(hyps, refs))
            meteor_score = meteor_corpus_score(meteor, (row[3] for row in tokenized.scan_rows()), samples)
        return {
            **{f"coco_bleu_{k + 1}": score for k, score in enumerate(bleu.scores(self._module("bleu")))},
            "coco_meteor": meteor_score,
            "coco_rouge_l": rouge.value / samples,
            "coco_cider": cider_total.value / samples,
        }

    def _tokenized_batches(self, reader: "SpillReader") -> Iterator[tuple[list[str], list[list[str]]]]:
        """(tokenized predictions, tokenized references) per batch, one PTBTokenizer run each."""
        columns = [self.references_column] if self.references_column else []
        for batch in reader.iter_batches(self.batch_size, decode=True, columns=columns, with_arrays=False,
                                         with_logprob=False):
            refs = references_of(batch, self.references_column, self.name)
            lines = ptb_tokenize(self._module("ptb"), list(batch.pred_text or []) + [r for rs in refs for r in rs],
                                 near=reader.path)
            hyps, rest = lines[: len(batch)], iter(lines[len(batch):])
            yield hyps, [[next(rest) for _ in rs] for rs in refs]


def ptb_tokenize(ptb: Any, captions: list[str], *, near: Any = None) -> list[str]:
    """`PTBTokenizer().tokenize` of these captions, in order: the same jar, arguments, input file and punctuation
    filter, the file written in a scratch directory (near the spill when writable) instead of the package's."""
    jar_dir = os.path.dirname(os.path.abspath(ptb.__file__))
    sentences = "\n".join(c.replace("\n", " ") for c in captions)
    scratch = near if near is not None and os.access(near, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".spilleval-ptb-", dir=scratch) as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes(sentences.encode())
        cmd = ["java", "-cp", os.path.join(jar_dir, ptb.STANFORD_CORENLP_3_4_1_JAR), PTB_CLASS, "-preserveLines",
               "-lowerCase", str(path)]
        done = subprocess.run(cmd, cwd=jar_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise MetricInputError(f"pycocoevalcap's PTB tokenizer failed ({' '.join(cmd[:4])} ...): "
                               f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    lines = done.stdout.decode().split("\n")
    if len(lines) < len(captions):
        raise MetricInputError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    punctuation = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(captions)]]


class BleuSums:
    """pycocoevalcap BLEU's corpus statistics: hypothesis and closest reference lengths, n-gram guesses and
    clipped matches, summed as integers."""

    def __init__(self) -> None:
        self.testlen = self.reflen = 0
        self.guess = np.zeros(BLEU_ORDER, dtype=np.int64)
        self.correct = np.zeros(BLEU_ORDER, dtype=np.int64)

    def add(self, module: Any, hyps: list[str], refs: list[list[str]]) -> None:
        for hyp, sample_refs in zip(hyps, refs):
            cooked = module.cook_test(hyp, module.cook_refs(sample_refs, n=BLEU_ORDER), eff="closest", n=BLEU_ORDER)
            self.testlen += cooked["testlen"]
            self.reflen += cooked["reflen"]
            self.guess += cooked["guess"]
            self.correct += cooked["correct"]

    def scores(self, module: Any) -> list[float]:
        """`BleuScorer.compute_score(option="closest")` of the sums: one cooked entry holding them."""
        scorer = module.BleuScorer(n=BLEU_ORDER)
        scorer.crefs = [None]
        scorer.ctest = [{"testlen": self.testlen, "reflen": [self.reflen], "guess": self.guess.tolist(),
                         "correct": self.correct.tolist()}]
        score, _ = scorer.compute_score(option="closest")
        return [float(s) for s in score]


def meteor_corpus_score(meteor: Any, stats: Iterator[str], samples: int) -> float:
    """What `Meteor.compute_score` reads back: the jar's corpus score for one EVAL line of every sample's
    statistics, written to it a piece at a time (the per-sample scores it prints first are skipped)."""
    process = meteor.meteor_p
    with meteor.lock:
        process.stdin.write(b"EVAL")
        for line in stats:
            process.stdin.write(f" ||| {line}".encode())
        process.stdin.write(b"\n")
        process.stdin.flush()
        for _ in range(samples):
            process.stdout.readline()
        return float(process.stdout.readline().strip())


def _blocks(rows: Iterator[tuple[Any, ...]], size: int) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(hypotheses, references) of up to `size` stored rows at a time."""
    hyps: list[str] = []
    refs: list[list[str]] = []
    for _, hyp, joined, _ in rows:
        hyps.append(hyp)
        refs.append(joined.split("\n"))
        if len(hyps) == size:
            yield hyps, refs
            hyps, refs = [], []
    if hyps:
        yield hyps, refs
