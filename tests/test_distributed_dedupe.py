"""Streaming metrics count a repeated sample once, and the same copy of it the reader keeps (no processes needed).

The multi-process tests are in test_distributed.py; here the ranks' side of the protocol runs in one process over
real shards: each "rank" writes its shard through a real `SpillWriter` whose listener updates its metrics via
`FirstSeen`, then `subtract_rows` takes out what a lower rank also holds (the owner map that
`Coordinator.sample_owners` all-reduces is computed here with numpy).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_manifest, random_batch
from spilleval import Evaluator, SampleBatch, compute_from_spill
from spilleval.dedupe import FirstSeen, subtract_rows
from spilleval.sampleset import SampleSet
from spilleval.metrics.runner import MetricSuite
from spilleval.spill import SpillWriter, mark_spill_complete
from spilleval.spill.manifest import SHARDS_DIR, shard_dir_name

METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll"]


def rows_for(layout: list[int], vocab_size: int, rng: np.random.Generator) -> SampleBatch:
    """One row per occurrence; a repeated sample gets *different* ids each time, so picking the wrong copy shows."""
    batch = random_batch(rng, len(layout), vocab_size=vocab_size, max_len=5, logprob=True)
    batch.sample_index = np.asarray(layout, dtype=np.int64)
    return batch


def owners(presents: list[SampleSet]) -> np.ndarray:
    """The lowest rank holding each sample (world size where none does): what the all_reduce(MIN) computes."""
    world = len(presents)
    size = max((p.max() + 1 for p in presents if len(p)), default=0)
    owner = np.full(size, world)
    for rank, present in enumerate(presents):
        owner = np.minimum(owner, np.where(present.dense(0, size), rank, world))
    return owner


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_merged_streaming_states_equal_a_recompute_of_what_the_reader_keeps(data, tokenizer):
    world = data.draw(st.integers(1, 4), label="world")
    n = data.draw(st.integers(1, 25), label="samples")
    layouts = [data.draw(st.lists(st.integers(0, n - 1), max_size=16), label=f"rank {r}") for r in range(world)]
    chunk_rows = data.draw(st.integers(1, 6), label="chunk_rows")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    if not any(layouts):
        return
    with tempfile.TemporaryDirectory() as tmp:
        spill = Path(tmp) / "spill"
        manifest = make_manifest(len(tokenizer), dataset_length=n, has_logprob=True, metrics=METRICS,
                                 world_size=world)
        suites, presents = [], []
        for rank, layout in enumerate(layouts):
            suite, seen = MetricSuite(METRICS, tokenizer=tokenizer), FirstSeen()
            batch = rows_for(layout, len(tokenizer), rng)
            cuts = sorted({c for c in data.draw(st.lists(st.integers(1, 16), max_size=4), label="cuts") if c < len(layout)})
            with SpillWriter(spill, manifest, rank=rank, chunk_rows=chunk_rows, tokenizer=tokenizer,
                             listeners=[lambda b, s=suite, f=seen: s.update(f.fresh(b))]) as writer:
                for lo, hi in zip([0, *cuts], [*cuts, len(layout)]):
                    if lo < hi:
                        writer.write(batch.take(np.arange(lo, hi)))
            suites.append(suite)
            presents.append(seen.present)
        owner = owners(presents)
        for rank, (suite, present) in enumerate(zip(suites, presents)):
            foreign = SampleSet(np.flatnonzero(present.dense(0, len(owner)) & (owner < rank)))
            removed = subtract_rows(suite, spill / SHARDS_DIR / shard_dir_name(rank), foreign)
            assert removed == len(foreign)
        for suite in suites[1:]:
            suites[0].merge(suite.states())
        mark_spill_complete(spill, manifest)
        assert suites[0].compute_streaming() == compute_from_spill(spill)
        text_match = next(m for m in suites[0].streaming if m.name == "text_match")
        assert text_match.value("samples") == len({i for layout in layouts for i in layout})


def test_single_process_evaluator_counts_a_repeated_sample_once(tmp_path, tokenizer):
    """A loader that repeats samples on purpose (a sampler padding to whole batches; allow_repeats=True) changes
    no number; by default a repeat in one process is an error (indices that restart at 0 in every batch)."""
    rng = np.random.default_rng(7)
    batch = random_batch(rng, 20, vocab_size=len(tokenizer), max_len=6, logprob=True)
    repeated = SampleBatch.concat([batch, batch.take(np.array([0, 1, 2, 19, 19]))])
    with pytest.raises(ValueError, match="sample index 0 was already evaluated.*allow_repeats=True"):
        evaluator = Evaluator(tmp_path / "refused", METRICS, tokenizer=tokenizer, dataset_length=20)
        for lo in range(0, len(repeated), 6):
            evaluator.add(repeated.take(np.arange(lo, min(lo + 6, len(repeated)))), vocab_size=len(tokenizer))
        evaluator.finalize()
    results = {}
    for name, data in (("plain", batch), ("repeated", repeated)):
        evaluator = Evaluator(tmp_path / name, METRICS, tokenizer=tokenizer, dataset_length=20, chunk_rows=7,
                              allow_repeats=True)
        for lo in range(0, len(data), 6):
            evaluator.add(data.take(np.arange(lo, min(lo + 6, len(data)))), vocab_size=len(tokenizer))
        results[name] = evaluator.finalize()
    assert results["repeated"] == results["plain"]
    assert compute_from_spill(tmp_path / "repeated") == results["plain"]


def test_first_seen_passes_first_occurrences_only():
    seen = FirstSeen()
    first = random_batch(np.random.default_rng(0), 5, vocab_size=50)
    first.sample_index = np.array([3, 1, 3, 0, 9])
    assert seen.fresh(first).sample_index.tolist() == [3, 1, 0, 9]
    assert seen.present.to_numpy().tolist() == [0, 1, 3, 9]
    second = first.take(np.array([0, 4]))
    second.sample_index = np.array([9, 4])
    assert seen.fresh(second).sample_index.tolist() == [4]
    second.sample_index = np.array([-1, 2])
    with pytest.raises(ValueError, match="dataset indices"):
        seen.fresh(second)
