"""Offline recompute (`spilleval compute`) speed: token_accuracy, bytes per supervised token, every built-in metric.

    .venv/bin/python tools/bench_compute.py            # 50M supervised tokens per section (~20 min on 2 cores)
    .venv/bin/python tools/bench_compute.py --quick    # 1M + 200k tokens, about a minute

Section 1, token_accuracy. The spill is written with `SpillWriter` from synthetic data shaped like an LM eval: label
ids Zipf-distributed over a 32,000 vocabulary (ids in frequency order, as BPE merges roughly are, or --permuted),
predictions equal to the label 70% of the time and otherwise another Zipf draw, sample lengths uniform in 20-400.
The recompute is `spilleval.compute_from_spill(dir, ["token_accuracy"])`, the code path of `spilleval compute
--metrics token_accuracy`, timed best of --repeats with the spill in the page cache (warm). Baselines measured in the
same run: numpy over the same ids held in memory (the ceiling) and the same spill written uncompressed. A second
spill also carries what a real evaluation stores next to the ids (label log-probs for `nll`, a question string per
sample): token accuracy reads only the ids from it, the "read everything" row decodes every column, as a reader that
ignored what the metric needs would. The byte experiments compress the same ids with the same codec outside the
spill format, to show what each choice would buy; the entropy line is the information-theoretic floor of this data.

Section 2, per metric. A caption / short-answer spill (`CaptionData`: --metric-tokens supervised tokens, samples of
5-30 word tokens) holds what every metric reads: a real word-level tokenizer saved in the spill (32,000 words,
frequent words short, so decoded text has realistic word lengths), label log-probs, a "references" column of 1-5
references per sample, per-sample class scores in zarr, and a first label token that is one of 4 declared classes.
Each metric is timed alone, `compute_from_spill(dir, [spec])` with its parameters as {"name", "params"}
(`metric_specs`), and reported in supervised tokens/s, samples/s and as a ratio to token_accuracy on the same spill
in the same run. The text metrics run their reference libraries (sacrebleu, rouge-score, jiwer, pycocoevalcap) per
sample and are several orders of magnitude slower than the id metrics: each metric gets --metric-limit-s seconds of
timed passes, and one whose pass over the whole spill would not fit (judged from a timed pass over a 200k-token
prefix) is measured on the largest prefix (probe x 2^k tokens, the same first samples) that fits. The table then
says "(prefix)" with the tokens actually measured, and its whole-spill time is marked as extrapolated (linearly: a
lower bound for the corpus metrics whose on-disk tables grow with the data, auroc, average_precision,
loss_percentiles, distinct_n, answer_macro_f1, cider, as their rate falls with size); nothing is extrapolated
anywhere else. For the same reason a corpus metric judged to fit may take longer than the limit on the whole spill;
its measured time is what the table shows. Every result is checked finite, and token_accuracy equals what
the generator counted.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import machine_info, markdown_table  # noqa: E402

from spilleval.batch import SampleBatch, concat_ranges  # noqa: E402
from spilleval.metrics import MetricSuite, compute_from_spill  # noqa: E402
from spilleval.metrics.base import CorpusMetric, Metric  # noqa: E402
from spilleval.metrics.registry import available_metrics, build_metric  # noqa: E402
from spilleval.spill import Manifest, SpillReader, SpillWriter  # noqa: E402
from spilleval.spill.manifest import ARRAYS_DIR, TOKENS_FILE, library_versions  # noqa: E402
from spilleval.testing import SPECIAL_TOKENS, WORDS, build_tokenizer  # noqa: E402

VOCAB = 32_000
P_RIGHT = 0.7
BATCH_TOKENS = 2_000_000  # tokens generated (and handed to the writer) at a time


# ----------------------------------------------------------------------------------------------- synthetic data
class ZipfData:
    """Deterministic synthetic batches, made on the fly; keeps only running counts, never the data."""

    def __init__(self, total_tokens: int, *, exponent: float, permuted: bool, extras: bool = False,
                 seed: int = 0) -> None:
        self.total_tokens, self.extras, self.seed = total_tokens, extras, seed
        weights = 1.0 / np.arange(1, VOCAB + 1) ** exponent
        self.probs = weights / weights.sum()
        self.cdf = np.cumsum(self.probs)
        self.rank_to_id = np.random.default_rng(seed + 1).permutation(VOCAB) if permuted else np.arange(VOCAB)
        self.correct = self.tokens = 0

    def batches(self) -> Iterator[SampleBatch]:
        rng = np.random.default_rng(self.seed)
        extras_rng = np.random.default_rng(self.seed + 2)  # the ids are the same with or without extras
        self.correct = self.tokens = next_index = 0
        while self.tokens < self.total_tokens:
            size = min(BATCH_TOKENS, self.total_tokens - self.tokens)
            lengths = rng.integers(20, 401, size=max(1, size // 210))
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            labels = self._zipf_ids(rng, int(offsets[-1]))
            preds = np.where(rng.random(len(labels)) < P_RIGHT, labels, self._zipf_ids(rng, len(labels)))
            self.correct += int(np.count_nonzero(preds == labels))
            self.tokens += len(labels)
            batch = SampleBatch(np.arange(next_index, next_index + len(lengths)), offsets, preds, labels)
            if self.extras:  # what a real evaluation stores too: log-probs (nll) and a dataset column
                batch.label_logprob = np.log1p(-extras_rng.random(len(labels), dtype=np.float32))
                batch.columns["question"] = [f"question {i}: what is shown in picture {i % 977}?"
                                             for i in batch.sample_index]
            yield batch
            next_index += len(lengths)

    def _zipf_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n)), VOCAB - 1)
        return self.rank_to_id[ranks].astype(np.uint16)

    def entropy_bytes_per_token(self) -> float:
        """H(label) + H(pred | label), in bytes: no lossless coding of the two id columns can go below it."""
        h = float(-(self.probs * np.log2(self.probs)).sum())
        p_same = P_RIGHT + (1 - P_RIGHT) * self.probs  # P(pred == label | label)
        h_same = -(p_same * np.log2(p_same) + (1 - p_same) * np.log2(1 - p_same))
        h_wrong = h  # entropy of a wrong prediction given the label: at most that of a Zipf draw
        return (h + float((self.probs * (h_same + (1 - p_same) * h_wrong)).sum())) / 8


# ----------------------------------------------------------------------------------------------- measurements
def write_spill(path: Path, data: ZipfData, *, compression: str | None) -> None:
    """Write `data` with a `SpillWriter` (default chunk size), as an evaluation would."""
    manifest = Manifest(task="causal_lm", vocab_size=VOCAB, id_dtype="uint16", metrics=[{"name": "token_accuracy"}],
                        has_logprob=data.extras, columns=["question"] if data.extras else [],
                        versions=library_versions())
    with SpillWriter(path, manifest, compression=compression) as writer:
        for batch in data.batches():
            writer.write(batch)


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def read_everything(path: Path) -> dict[str, float]:
    """token_accuracy over batches with every column decoded (log-probs, strings): what selection avoids."""
    suite = MetricSuite(["token_accuracy"])
    for batch in SpillReader(path).iter_batches(4096):
        suite.update(batch)
    return suite.compute_streaming()


def compress_experiments(data: ZipfData, levels: tuple[int, ...]) -> list[list[Any]]:
    """Bytes per token of other encodings of the same ids (one zstd frame per column, like an IPC buffer)."""
    batch = SampleBatch.concat(list(data.batches()))
    lab, pred = batch.label_ids, batch.pred_ids

    def size(*columns: np.ndarray, level: int) -> float:
        codec = pa.Codec("zstd", compression_level=level)
        return sum(codec.compress(pa.py_buffer(np.ascontiguousarray(c).tobytes())).size for c in columns) / len(lab)

    low, high = (lambda a: (a & 0xFF).astype(np.uint8)), (lambda a: (a >> 8).astype(np.uint8))
    return [[f"zstd level {level}", size(lab, pred, level=level), size(lab, lab ^ pred, level=level),
             size(low(lab), high(lab), low(pred), high(pred), level=level)] for level in levels]


# ----------------------------------------------------------------------------------------------- per-metric data
CLASS_WORDS = ("red", "green", "blue", "yellow")  # the declared label set: a 4-way answer, by its first token
ANSWER_TOKENS = (5, 30)  # supervised tokens per sample, uniform: short answers and captions
MAX_REFERENCES = 5  # references per sample: uniform in 1..MAX_REFERENCES
CHOICES = 4  # for the multiple-choice metric: consecutive samples are the choices of one question, the first right
P_KEEP_IN_REFERENCE = 0.6  # a paraphrase keeps each label word with this probability
BLOCK_SAMPLES = 8_192  # samples generated at a time
SCORES = "class_scores"
WARMUP_TOKENS = 5_000  # one untimed pass per metric: imports (nltk for rouge, ...) and first-call costs
PROBE_TOKENS = 200_000  # one timed pass per metric on this prefix decides where the metric is measured
METRIC_LIMIT_S = 60.0
QUICK = {"tokens": 200_000, "probe": 50_000, "limit_s": 5.0}


def pseudo_words(n: int, *, taken: set[str], seed: int = 0) -> list[str]:
    """`n` distinct lowercase pronounceable words, shortest first.

    The Zipf draws rank words by id, so frequent words are short, as in real text: decoded text then has realistic
    word lengths, which is what the character metrics (chrf, cer) and the string work of the others scale with.
    """
    rng = np.random.default_rng(seed)
    onsets = [*"bcdfghjklmnprstvwz", "br", "ch", "pl", "sh", "st", "tr"]
    vowels = [*"aeiou", "ai", "ea", "ou"]
    codas = ["", "n", "r", "s", "t", "l", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words = dict.fromkeys(w for w in syllables if w not in taken)
    while len(words) < n:
        picks = rng.integers(0, len(syllables), size=(4 * n, 2))
        words.update(dict.fromkeys(w for a, b in picks.tolist() if (w := syllables[a] + syllables[b]) not in taken))
    return sorted(list(words)[:n], key=len)


def caption_tokenizer(vocab_size: int = VOCAB) -> Any:
    """A real word-level `PreTrainedTokenizerFast` (spilleval.testing.build_tokenizer) of `vocab_size` words: its
    own words (the, a, colours, ...) first, then pseudo-words; saved in the spill, as an evaluation saves its own."""
    taken = set(SPECIAL_TOKENS) | set(WORDS)
    return build_tokenizer(pseudo_words(vocab_size - len(taken), taken=taken))


class CaptionData:
    """A captioning / short-answer evaluation, made on the fly a block of samples at a time (bounded memory).

    Sample lengths uniform in ANSWER_TOKENS; label ids Zipf over the words (frequency order); the first label token
    is one of CLASS_WORDS (the class of the sample, for the classification metrics); predictions equal the label
    P_RIGHT of the time, else another Zipf draw; label log-probs are higher where the prediction is right;
    per-sample class scores (softmax over the classes, the true one boosted) go to zarr; a "references" column holds
    1..MAX_REFERENCES references: the label text, then paraphrases of it; "question_id" and "choice_target" columns
    make every CHOICES consecutive samples the choices of one question, the first of them the right one. Block b always comes from the same seed,
    so the data of a smaller `total_tokens` is an exact prefix of a larger one's.
    """

    def __init__(self, total_tokens: int, tokenizer: Any, *, exponent: float = 1.0, seed: int = 0) -> None:
        self.total_tokens, self.seed = total_tokens, seed
        self.words = np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), dtype=object)
        self.first_word = len(SPECIAL_TOKENS)
        weights = 1.0 / np.arange(1, len(tokenizer) - self.first_word + 1) ** exponent
        self.cdf = np.cumsum(weights / weights.sum())
        self.class_ids = np.array(tokenizer.convert_tokens_to_ids(list(CLASS_WORDS)), dtype=np.uint16)
        self.samples = self.tokens = self.correct = 0

    def batches(self) -> Iterator[SampleBatch]:
        self.samples = self.tokens = self.correct = 0
        block = 0
        while self.tokens < self.total_tokens:
            batch = self._block(block)
            need = self.total_tokens - self.tokens
            if batch.num_tokens > need:  # the first samples that reach the total (samples are never cut)
                batch = batch.slice(0, int(np.searchsorted(batch.offsets, need, side="left")))
            self.samples += len(batch)
            self.tokens += batch.num_tokens
            self.correct += int(np.count_nonzero(batch.pred_ids == batch.label_ids))
            yield batch
            block += 1

    def _block(self, block: int) -> SampleBatch:
        rng = np.random.default_rng([self.seed, block])
        lengths = rng.integers(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1, size=BLOCK_SAMPLES)
        offsets = np.zeros(BLOCK_SAMPLES + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        true_class = rng.integers(0, len(CLASS_WORDS), size=BLOCK_SAMPLES)
        labels = self._zipf_ids(rng, int(offsets[-1]))
        labels[offsets[:-1]] = self.class_ids[true_class]
        right = rng.random(len(labels)) < P_RIGHT
        preds = np.where(right, labels, self._zipf_ids(rng, len(labels)))
        u = 1 - rng.random(len(labels), dtype=np.float32)  # (0, 1]
        logprob = np.log(np.where(right, 0.3 + 0.7 * u, 0.3 * u)).astype(np.float32)
        summed = np.concatenate([[0.0], np.cumsum(logprob, dtype=np.float64)])
        return SampleBatch(
            sample_index=np.arange(block * BLOCK_SAMPLES, (block + 1) * BLOCK_SAMPLES), offsets=offsets,
            pred_ids=preds, label_ids=labels, label_logprob=logprob,
            sample_nll=summed[offsets[:-1]] - summed[offsets[1:]],  # each sample's -sum of log-probs (`loss`)
            columns={"references": self._references(rng, labels, offsets), **_questions(block)},
            arrays={SCORES: _class_scores(rng, true_class, len(CLASS_WORDS))},
        )

    def _zipf_ids(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)
        return (ranks + self.first_word).astype(np.uint16)

    def _references(self, rng: np.random.Generator, labels: np.ndarray, offsets: np.ndarray) -> list[list[str]]:
        """Per sample: its label text, then paraphrases (each label word kept with P_KEEP_IN_REFERENCE)."""
        lengths = np.diff(offsets)
        refs = [[text] for text in self._texts(labels, offsets)]
        owner = np.repeat(np.arange(len(lengths)), rng.integers(0, MAX_REFERENCES, size=len(lengths)))
        positions = concat_ranges(offsets[owner], lengths[owner])
        keep = rng.random(len(positions)) < P_KEEP_IN_REFERENCE
        ids = np.where(keep, labels[positions], self._zipf_ids(rng, len(positions)))
        para_offsets = np.zeros(len(owner) + 1, dtype=np.int64)
        np.cumsum(lengths[owner], out=para_offsets[1:])
        for sample, text in zip(owner.tolist(), self._texts(ids, para_offsets)):
            refs[sample].append(text)
        return refs

    def _texts(self, ids: np.ndarray, offsets: np.ndarray) -> list[str]:
        words = self.words[ids].tolist()
        bounds = offsets.tolist()
        return [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]


def _questions(block: int) -> dict[str, list[Any]]:
    index = np.arange(block * BLOCK_SAMPLES, (block + 1) * BLOCK_SAMPLES)
    return {"question_id": (index // CHOICES).tolist(), "choice_target": (index % CHOICES == 0).tolist()}


def _class_scores(rng: np.random.Generator, true_class: np.ndarray, classes: int) -> np.ndarray:
    """Softmax of noisy logits with the true class boosted: probabilities in float32, as a model would give."""
    logits = rng.standard_normal((len(true_class), classes))
    logits[np.arange(len(true_class)), true_class] += 1.5
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def metric_specs(class_ids: list[int]) -> dict[str, dict[str, Any]]:
    """The {"name", "params"} spec of every built-in metric for the caption spill.

    Text metrics read the "references" column (several references per sample); wer/cer/mer/wil/wip take exactly
    one, so they read the decoded label (the transcript), as bits_per_byte does; mc_accuracy groups samples into
    questions by the "question_id" and "choice_target" columns (its default names) and normalises by the decoded
    continuation. The classification and score metrics declare the label set as token
    ids: the class of a sample is its first supervised token, and class_scores has one column per label.
    """
    refs = {"references_column": "references"}
    classes = {"labels": class_ids}
    params: dict[str, dict[str, Any]] = {
        "token_accuracy": {}, "sequence_exact_match": {}, "nll": {}, "loss": {}, "loss_percentiles": {},
        "text_match": {}, "distinct_n": {}, "answer_macro_f1": {}, "wer": {}, "cer": {}, "mer": {}, "wil": {},
        "wip": {}, "bits_per_byte": {}, "mc_accuracy": {}, "ter": refs,
        "accuracy": classes, "precision": classes, "recall": classes, "f1": classes,
        "auroc": classes, "average_precision": classes, "ece": classes,
        "bleu": refs, "chrf": refs, "rouge": refs, "squad": refs, "cider": refs,
    }
    # coco_caption runs pycocoevalcap's Java jars (PTB tokenizer, METEOR) over the corpus: its speed is the JVM's
    # and its equality is tested in tests/test_coco_caption.py; it is not part of this table
    unknown = sorted(set(available_metrics()) - set(params) - {"coco_caption"})
    if unknown:
        raise SystemExit(f"no benchmark parameters for the metric(s) {', '.join(unknown)}: add them to metric_specs")
    return {name: build_metric({"name": name, "params": p}).spec() for name, p in params.items()}


# ----------------------------------------------------------------------------------------------- per-metric timing
@dataclass
class Spill:
    """A written spill and what went into it."""

    path: Path
    tokens: int
    samples: int
    correct: int
    write_s: float


class PrefixSpills:
    """The caption spill of `total` tokens and, on demand, exact prefixes of it (the same first samples).

    A metric too slow for the time limit on the whole spill is measured on a prefix; prefixes come in sizes
    probe x 2^k, so the slow metrics share a few spills instead of each writing its own.
    """

    def __init__(self, root: Path, total: int, tokenizer: Any, specs: dict[str, dict[str, Any]]) -> None:
        self.root, self.total, self.tokenizer, self.specs = root, total, tokenizer, specs
        self._spills: dict[int, Spill] = {}

    def get(self, tokens: int) -> Spill:
        tokens = min(tokens, self.total)
        if tokens not in self._spills:
            self._spills[tokens] = self._write(tokens)
        return self._spills[tokens]

    def _write(self, tokens: int) -> Spill:
        data = CaptionData(tokens, self.tokenizer)
        path = self.root / f"caption-{tokens}"
        manifest = Manifest(task="causal_lm", vocab_size=len(self.tokenizer), id_dtype="uint16",
                            metrics=list(self.specs.values()), has_logprob=True,
                            columns=["references", "question_id", "choice_target"],
                            arrays={SCORES: {"shape": [len(CLASS_WORDS)], "dtype": "float32"}},
                            versions=library_versions())
        start = time.perf_counter()
        with SpillWriter(path, manifest, tokenizer=self.tokenizer) as writer:
            for batch in data.batches():
                writer.write(batch)
        return Spill(path, data.tokens, data.samples, data.correct, time.perf_counter() - start)

    def close(self) -> None:
        for spill in self._spills.values():
            shutil.rmtree(spill.path, ignore_errors=True)


def describe(metric: Metric) -> tuple[str, str]:
    """(kind, what it reads besides the ids): the two things that explain a metric's throughput."""
    reads = (["decoded text"] if metric.needs_text else []) + (["log-probs"] if metric.needs_logprob else [])
    reads += list(metric.needs_columns) + list(metric.needs_arrays)
    return ("corpus" if isinstance(metric, CorpusMetric) else "streaming"), (", ".join(reads) or "ids only")


def timed_compute(spill: Spill, spec: dict[str, Any], passes: int) -> tuple[float, dict[str, float]]:
    """`compute_from_spill(dir, [spec])` best of `passes`, every result checked finite and, where the spill knows
    the answer (token accuracy, sample count), checked equal to it."""
    seconds, result = best_of(passes, lambda: compute_from_spill(spill.path, [spec]))
    bad = {k: v for k, v in result.items() if not math.isfinite(float(v))}
    if bad:
        raise SystemExit(f"{spec['name']} on {spill.path.name}: non-finite result(s) {bad}")
    expected = {"token_accuracy": spill.correct / spill.tokens}
    wrong = {k: (result[k], v) for k, v in expected.items() if k in result and result[k] != v}
    if wrong:
        raise SystemExit(f"{spec['name']} on {spill.path.name}: recomputed != generated {wrong}")
    return seconds, result


def plan(probe_s: float, probe_tokens: int, total: int, *, repeats: int, limit_s: float) -> tuple[int, int]:
    """(supervised tokens to measure on, timed passes) for a metric whose pass over `probe_tokens` took `probe_s`.

    The whole spill when one pass is expected within `limit_s`, with as many passes (up to `repeats`) as fit;
    otherwise one pass over the largest prefix of probe x 2^k tokens expected to fit, at least the probe itself.
    Powers of two let the slow metrics share a few prefix spills instead of each writing its own.
    """
    expected_s = probe_s * total / probe_tokens
    if expected_s <= limit_s:
        return total, max(1, min(repeats, int(limit_s // expected_s))) if expected_s > 0 else repeats
    doublings = int(math.log2(limit_s / probe_s)) if probe_s < limit_s else 0
    return probe_tokens * 2**doublings, 1


def measure_metric(spills: PrefixSpills, probe: Spill, spec: dict[str, Any], *, repeats: int,
                   limit_s: float) -> dict[str, Any]:
    """Time one metric where `plan` says: the whole spill, or a prefix when a pass would not fit in `limit_s`.

    The probe pass (after the warm-up) counts as one pass when the plan lands on the probe. A prefix measurement
    is reported with its size; its whole-spill time is an extrapolation, and the table labels it so.
    """
    probe_s, result = timed_compute(probe, spec, 1)
    full = spills.get(spills.total)
    tokens, passes = plan(probe_s, probe.tokens, full.tokens, repeats=repeats, limit_s=limit_s)
    target = spills.get(tokens)
    seconds = probe_s if target is probe else math.inf
    if passes > (target is probe):
        more_s, result = timed_compute(target, spec, passes - (target is probe))
        seconds = min(seconds, more_s)
    kind, reads = describe(build_metric(spec))
    return {"metric": spec["name"], "kind": kind, "reads": reads, "tokens": target.tokens, "samples": target.samples,
            "passes": passes, "seconds": seconds, "token_rate": target.tokens / seconds,
            "sample_rate": target.samples / seconds, "whole_spill": target is full,
            "whole_spill_s": seconds * full.tokens / target.tokens, "result": result}


def spill_bytes(spill: Spill) -> dict[str, float]:
    """Bytes on disk per supervised token: all, the Arrow token file (ids, log-probs, references) and zarr."""
    reader = SpillReader(spill.path)
    files = [(name, f["bytes"]) for r in reader.chunks for name, f in r.files.items()]
    return {"all": reader.bytes_on_disk / spill.tokens,
            "tokens.arrow": sum(b for n, b in files if n == TOKENS_FILE) / spill.tokens,
            "arrays.zarr": sum(b for n, b in files if n.startswith(ARRAYS_DIR)) / spill.tokens}


def run_metrics(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Every built-in metric recomputed from one caption spill: token_accuracy first, the baseline of the ratios."""
    total = QUICK["tokens"] if args.quick else args.metric_tokens
    probe_tokens = min(total, QUICK["probe"] if args.quick else PROBE_TOKENS)
    limit_s = args.metric_limit_s or (QUICK["limit_s"] if args.quick else METRIC_LIMIT_S)
    repeats = 1 if args.quick else args.repeats
    tokenizer = caption_tokenizer()
    class_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(CLASS_WORDS))]
    specs = metric_specs(class_ids)
    names = ["token_accuracy"] + [n for n in (args.metrics or specs) if n != "token_accuracy"]
    spills = PrefixSpills(root, total, tokenizer, specs)
    try:
        full = spills.get(total)
        warmup, probe = spills.get(min(total, WARMUP_TOKENS)), spills.get(probe_tokens)
        for name in names:
            timed_compute(warmup, specs[name], 1)
        rows = [measure_metric(spills, probe, specs[name], repeats=repeats, limit_s=limit_s) for name in names]
        baseline = rows[0]["token_rate"]
        for row in rows:
            row["vs_token_accuracy"] = row["token_rate"] / baseline
        return {"tokens": full.tokens, "samples": full.samples, "write_s": full.write_s,
                "bytes": spill_bytes(full), "probe_tokens": probe.tokens, "limit_s": limit_s, "repeats": repeats,
                "rows": rows}
    finally:
        spills.close()


# ----------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = 1_000_000 if args.quick else args.tokens
    repeats = 2 if args.quick else args.repeats  # the first of two runs warms up (imports, page cache)
    data = lambda extras=False: ZipfData(tokens, exponent=args.zipf, permuted=args.permuted, extras=extras)  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bench-compute-", dir=args.tmp))
    rows: list[dict[str, Any]] = []

    def record(name: str, spill: Path | None, seconds: float, n: int) -> None:
        size = SpillReader(spill).bytes_on_disk / n if spill else None
        rows.append({"path": name, "tokens": n, "rate": n / seconds, "bytes": size})

    try:
        ids = data()
        in_memory = [(b.pred_ids, b.label_ids) for b in ids.batches()]
        seconds, correct = best_of(repeats, lambda: sum(int(np.count_nonzero(p == lab)) for p, lab in in_memory))
        in_memory.clear()  # the batches held for the in-memory timing, freed
        expected = {"token_accuracy": correct / ids.tokens}
        record("numpy over the ids in memory (ceiling)", None, seconds, ids.tokens)

        for name, extras, compression in (("spill, zstd (default)", False, "zstd"),
                                          ("spill, uncompressed", False, None),
                                          ("spill + log-probs + a text column, zstd", True, "zstd")):
            spill = root / f"spill-{len(rows)}"
            source = data(extras)
            write_spill(spill, source, compression=compression)
            seconds, result = best_of(repeats, lambda: compute_from_spill(spill, ["token_accuracy"]))
            if result != expected or source.tokens != ids.tokens:
                raise SystemExit(f"{name}: recomputed {result} != {expected} computed in memory")
            record(name, spill, seconds, source.tokens)
            if extras:
                seconds, result = best_of(repeats, lambda: read_everything(spill))
                assert result == expected, result
                record("  same spill, every column decoded", spill, seconds, source.tokens)
            shutil.rmtree(spill)

        ceiling = rows[0]["rate"]
        sample = ZipfData(min(tokens, 4_000_000), exponent=args.zipf, permuted=args.permuted)
        experiments = compress_experiments(sample, (1, 3) if args.quick else (1, 3, 9, 19))
        per_metric = run_metrics(args, root)
        return {"tokens": tokens, "rows": rows, "ceiling": ceiling, "experiments": experiments,
                "entropy": data().entropy_bytes_per_token(), "per_metric": per_metric, "machine": machine_info(),
                "versions": library_versions(), "command": " ".join(sys.argv)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(out: dict[str, Any]) -> str:
    table = [[r["path"], f"{r['tokens']:,}", r["rate"] / 1e6, r["rate"] / out["ceiling"],
              "-" if r["bytes"] is None else r["bytes"]] for r in out["rows"]]
    lines = [
        markdown_table(["token_accuracy over", "supervised tokens", "M tokens/s", "vs numpy", "bytes / token"],
                       table),
        "",
        f"Entropy floor of the two id columns of this data: {out['entropy']:.3f} bytes/token.",
        "",
        markdown_table(["zstd on the same ids (outside the spill)", "label + pred (as spilled)",
                        "label + (pred XOR label)", "byte planes (lo/hi bytes apart)"], out["experiments"]),
        "",
        per_metric_report(out["per_metric"]),
    ]
    return "\n".join(lines)


def _seconds(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _whole_spill_cell(row: dict[str, Any]) -> str:
    """Seconds of one pass over the whole spill: measured, or labelled as extrapolated from a prefix."""
    seconds = _seconds(row["whole_spill_s"])
    return seconds if row["whole_spill"] else f"≈ {seconds} (extrapolated)"


PER_METRIC_HEADERS = ["metric", "kind", "reads besides the ids", "measured on (supervised tokens)", "passes",
                      "seconds (best)", "supervised tokens/s", "samples/s", "vs token_accuracy",
                      "whole spill, s"]


def per_metric_report(m: dict[str, Any]) -> str:
    """The per-metric table, headed by what the spill is; a prefix measurement says so in two columns."""
    table = [[r["metric"], r["kind"], r["reads"], f"{r['tokens']:,}" + ("" if r["whole_spill"] else " (prefix)"),
              r["passes"], r["seconds"], r["token_rate"], r["sample_rate"], r["vs_token_accuracy"],
              _whole_spill_cell(r)] for r in m["rows"]]
    b = m["bytes"]
    return "\n".join([
        f"Per metric: `compute_from_spill(dir, [spec])` on a caption spill of {m['tokens']:,} supervised tokens in "
        f"{m['samples']:,} samples ({ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]} tokens each, 1-{MAX_REFERENCES} "
        f"references, log-probs, {len(CLASS_WORDS)} class scores), written in {m['write_s']:.1f} s; best of up "
        f"to {m['repeats']} passes within {m['limit_s']:g} s per metric, page cache warm. \"vs token_accuracy\": "
        "the metric's tokens/s over token_accuracy's on the whole spill. Extrapolated times are linear in tokens: a "
        "lower bound for corpus metrics, whose on-disk tables slow down as they grow.",
        f"Bytes on disk per supervised token: {b['all']:.2f} (tokens.arrow {b['tokens.arrow']:.2f}, "
        f"arrays.zarr {b['arrays.zarr']:.2f}).",
        "",
        markdown_table(PER_METRIC_HEADERS, table),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1M tokens, two repeats; per metric 200k tokens, one pass, 5 s each")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="supervised tokens in the spill")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the label ids")
    parser.add_argument("--permuted", action="store_true", help="ids not in frequency order (harder to compress)")
    parser.add_argument("--repeats", type=int, default=3, help="timed recomputes; the best is reported")
    parser.add_argument("--metric-tokens", type=int, default=50_000_000,
                        help="supervised tokens in the per-metric (caption) spill; --quick: 200,000")
    parser.add_argument("--metric-limit-s", type=float, default=None,
                        help=f"seconds of timed passes per metric (default {METRIC_LIMIT_S:g}, --quick "
                             f"{QUICK['limit_s']:g}): a metric whose pass over the whole spill would take longer is "
                             "measured on a prefix of it, and the table says so")
    parser.add_argument("--metrics", nargs="+", default=None, choices=sorted(available_metrics()), metavar="NAME",
                        help="per-metric section: only these (token_accuracy, the baseline, always runs)")
    parser.add_argument("--tmp", default=None, help="where to write the spills (default: the system temp dir)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    out = run(args)
    print(report(out))
    print()
    print(json.dumps({"command": out["command"], "machine": out["machine"], "versions": out["versions"]}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
