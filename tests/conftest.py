"""Shared fixtures: a real word-level tokenizer, a tiny real Llama, and small builders for spills.

Everything is real and local (no downloads, no mocks): `spilleval.testing` builds the tokenizer with the
`tokenizers` library and the model from a `LlamaConfig`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from spilleval.batch import SampleBatch
from spilleval.spill import Manifest, SpillWriter
from spilleval.spill.manifest import library_versions
from spilleval.testing import build_tokenizer, encode_qa, pad_batch, qa_examples, tiny_llama, train_qa

REPO_ROOT = Path(__file__).resolve().parents[1]
SPILLEVAL_SCRIPT = Path(sys.executable).with_name("spilleval")  # the installed console script

# CI runs `pytest -n 2` on 2 cores: one intra-op thread per worker, or the two workers' thread pools fight over the
# cores and tiny models get many times slower
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A real `PreTrainedTokenizerFast` over the word vocabulary of `spilleval.testing`."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer) -> Any:
    """A tiny randomly initialised `LlamaForCausalLM` (eval mode). Do not train it in a test: it is shared."""
    return tiny_llama(len(tokenizer)).eval()


@pytest.fixture(scope="session")
def trained_model(tokenizer) -> Any:
    """A tiny Llama trained for a few seconds on the synthetic QA task: predictions partly right, partly wrong."""
    return train_qa(tiny_llama(len(tokenizer), seed=1), tokenizer, steps=60)


@pytest.fixture(scope="session")
def qa_batches(tokenizer) -> list[dict[str, Any]]:
    """Eight padded batches of four synthetic QA examples, with dataset indices 0..31 under "index"."""
    examples = qa_examples(32, seed=1)
    items = [encode_qa(ex, tokenizer, index=i) for i, ex in enumerate(examples)]
    return [pad_batch(items[i : i + 4]) for i in range(0, len(items), 4)]


def random_batch(
    rng: np.random.Generator,
    n: int,
    *,
    vocab_size: int = 1000,
    max_len: int = 12,
    start_index: int = 0,
    logprob: bool = False,
    p_correct: float = 0.6,
) -> SampleBatch:
    """A host batch of `n` samples with random ragged rows (empty rows included), ids < vocab_size."""
    lengths = rng.integers(0, max_len + 1, size=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    dtype = np.uint16 if vocab_size <= 65_535 else np.uint32
    labels = rng.integers(0, vocab_size, size=total).astype(dtype)
    preds = np.where(rng.random(total) < p_correct, labels, rng.integers(0, vocab_size, size=total)).astype(dtype)
    return SampleBatch(
        sample_index=np.arange(start_index, start_index + n, dtype=np.int64),
        offsets=offsets,
        pred_ids=preds,
        label_ids=labels,
        label_logprob=(-rng.exponential(2.0, size=total)).astype(np.float32) if logprob else None,
    )


def make_manifest(vocab_size: int = 1000, *, dataset_length: int | None = None, has_logprob: bool = False,
                  metrics: Sequence[str] = (), **kwargs: Any) -> Manifest:
    """A manifest as the Evaluator would write it."""
    dtype = "uint16" if vocab_size <= 65_535 else "uint32"
    return Manifest(task="causal_lm", vocab_size=vocab_size, id_dtype=dtype, dataset_length=dataset_length,
                    metrics=[{"name": m, "params": {}} for m in metrics], has_logprob=has_logprob,
                    versions=library_versions(), **kwargs)


def write_spill(path: Path, batches: Sequence[SampleBatch], manifest: Manifest, *, tokenizer: Any = None,
                chunk_rows: int | None = None, **writer_kwargs: Any) -> Path:
    """Spill host batches with a real `SpillWriter` (background thread, atomic chunks) and close it."""
    with SpillWriter(path, manifest, tokenizer=tokenizer, chunk_rows=chunk_rows, **writer_kwargs) as writer:
        for batch in batches:
            writer.write(batch)
    return path


def split_batch(batch: SampleBatch, size: int) -> list[SampleBatch]:
    """Cut a batch into consecutive pieces of `size` samples (the last may be shorter)."""
    return [batch.take(np.arange(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]


@pytest.fixture
def spill_builder(tmp_path) -> Callable[..., Path]:
    """`spill_builder(batches, vocab_size=..., chunk_rows=..., tokenizer=..., metrics=...)` -> a complete spill."""
    counter = iter(range(10**6))

    def build(batches: Sequence[SampleBatch], *, vocab_size: int = 1000, chunk_rows: int | None = None,
              tokenizer: Any = None, metrics: Sequence[str] = (), **manifest_kwargs: Any) -> Path:
        has_logprob = any(b.label_logprob is not None for b in batches)
        manifest = make_manifest(vocab_size, has_logprob=has_logprob, metrics=metrics, **manifest_kwargs)
        return write_spill(tmp_path / f"spill-{next(counter)}", batches, manifest, tokenizer=tokenizer,
                           chunk_rows=chunk_rows)

    return build


def registered_plugin(monkeypatch: pytest.MonkeyPatch, directory: Path, module: str, source: str) -> Iterator[Path]:
    """For one test (a fixture yields from it): `source` saved as `module` in `directory`, importable, and its
    metrics registered; the registry and the module are put back after it, so a later test in the same process
    that lists every metric does not meet them."""
    from spilleval.metrics import available_metrics, registry

    available_metrics()  # the built-ins registered first, in the registry that is kept
    (directory / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, module, raising=False)
    importlib.import_module(module)
    yield directory
    sys.modules.pop(module, None)
