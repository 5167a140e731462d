"""Generated evaluation data for the metric tests.

Predictions and labels are word sequences encoded with the real word-level tokenizer of `spilleval.testing`
(its vocabulary extended with unicode and punctuated words), so the metrics decode them with a real tokenizer.
References are dataset columns and may be any unicode text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from spilleval.batch import SampleBatch
from spilleval.decode import decode_batch
from spilleval.metrics import MetricSuite
from spilleval.testing import WORDS, build_tokenizer

EXTRA_WORDS = ["café", "naïve", "日本語", "Ünïcödé", "😀", "world,", "end.", "The", "An", "it's", "ÉCOLE"]
VOCAB_WORDS = WORDS + EXTRA_WORDS


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    return build_tokenizer(EXTRA_WORDS)


@dataclass
class Sample:
    pred: list[str]  # words of the prediction
    label: list[str]  # words of the label
    columns: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    logprob: list[float] | None = None  # one per supervised position (max(len(pred), len(label)) of them)


def to_batch(samples: Sequence[Sample], start: int = 0, index: Sequence[int] | None = None) -> SampleBatch:
    """Encode samples; the shorter of prediction and label is padded with <pad> (dropped when decoding)."""
    tok = tokenizer()
    pad = tok.pad_token_id
    preds, labels = [], []
    for s in samples:
        width = max(len(s.pred), len(s.label))
        preds.append(tok.convert_tokens_to_ids(s.pred) + [pad] * (width - len(s.pred)))
        labels.append(tok.convert_tokens_to_ids(s.label) + [pad] * (width - len(s.label)))
    names_c = samples[0].columns.keys() if samples else []
    names_a = samples[0].arrays.keys() if samples else []
    logprobs = [s.logprob for s in samples] if samples and samples[0].logprob is not None else None
    return SampleBatch.from_rows(
        list(index) if index is not None else range(start, start + len(samples)),
        preds,
        labels,
        vocab_size=len(tok),
        logprobs=logprobs,
        columns={c: [s.columns[c] for s in samples] for c in names_c},
        arrays={a: np.stack([s.arrays[a] for s in samples]) for a in names_a},
    )


def decoded_texts(samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """What the metrics see: the decoded predictions and labels (skip_special_tokens=True)."""
    batch = decode_batch(to_batch(samples), tokenizer())
    return list(batch.pred_text or []), list(batch.label_text or [])


def batches_of(samples: Sequence[Sample], size: int, order: Sequence[int] | None = None) -> list[SampleBatch]:
    """Batches of `size` samples, in `order` (dataset indices kept)."""
    order = list(order) if order is not None else list(range(len(samples)))
    return [
        to_batch([samples[i] for i in order[k : k + size]], index=order[k : k + size])
        for k in range(0, len(order), size)
    ]


def run_streaming(specs: Sequence[Any], batches: Sequence[SampleBatch]) -> MetricSuite:
    suite = MetricSuite(specs, tokenizer=tokenizer())
    for batch in batches:
        suite.update(batch)
    return suite


def write_samples(path: Path, samples: Sequence[Sample], *, chunk_rows: int, order: Sequence[int] | None = None,
                  batch_size: int = 7, with_tokenizer: bool = True, metrics: Sequence[Any] = (),
                  dataset_length: int | None = None) -> Path:
    """A complete spill of the samples (written in `order`, in batches), the tokenizer saved in it; `metrics`
    (specs) recorded in its manifest."""
    from conftest import make_manifest, write_spill

    from spilleval.metrics.registry import build_metrics

    manifest = make_manifest(len(tokenizer()), has_logprob=bool(samples) and samples[0].logprob is not None,
                             dataset_length=len(samples) if dataset_length is None else dataset_length)
    manifest.metrics = [m.spec() for m in build_metrics(metrics)]
    return write_spill(path, batches_of(samples, batch_size, order), manifest,
                       tokenizer=tokenizer() if with_tokenizer else None, chunk_rows=chunk_rows)


# ----------------------------------------------------------------------------------------------- strategies
words = st.lists(st.sampled_from(VOCAB_WORDS), max_size=8)
any_text = st.one_of(st.text(max_size=24), words.map(" ".join))


@st.composite
def text_samples(draw: Any, min_size: int = 1, max_size: int = 24) -> list[Sample]:
    """Samples with a "references" column of 1-3 references (any unicode, empty strings included)."""
    n = draw(st.integers(min_size, max_size))
    out = []
    for _ in range(n):
        refs = draw(st.lists(any_text, min_size=1, max_size=3))
        out.append(Sample(pred=draw(words), label=draw(words), columns={"references": refs}))
    return out
