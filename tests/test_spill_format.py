"""What a spill says about itself: each supervised token's position in its sequence, and Arrow field metadata.

Real evaluations (the `Evaluator` on real logits, causal and seq2seq), read back with `SpillReader` and with plain
pyarrow; a spill written without positions (as before they were stored) still reads.
"""

from __future__ import annotations

import glob

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_manifest, random_batch, write_spill

from spilleval import Evaluator, SpillReader
from spilleval.batch import SampleBatch


def evaluate(path, task: str, *, seed: int = 0):
    """Logits and labels of 3 batches (supervised positions scattered, -100 elsewhere), spilled by `Evaluator`."""
    gen = torch.Generator().manual_seed(seed)
    evaluator = Evaluator(path, metrics=["token_accuracy"], task=task, dataset_length=12, chunk_rows=5,
                          keep_logprob=True)
    batches = []
    for start in range(0, 12, 4):
        logits = torch.randn(4, 9, 23, generator=gen)
        labels = torch.randint(0, 23, (4, 9), generator=gen)
        labels[torch.rand(4, 9, generator=gen) < 0.4] = -100
        evaluator.update(logits, labels, sample_index=list(range(start, start + 4)))
        batches.append((logits, labels))
    evaluator.finalize()
    return batches


@pytest.mark.parametrize("task, shift", [("causal_lm", 1), ("seq2seq", 0)])
def test_each_supervised_token_keeps_its_position(tmp_path, task, shift):
    batches = evaluate(tmp_path / "spill", task)
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    reader = SpillReader(tmp_path / "spill")
    seen = 0
    for batch in reader.iter_batches(5):
        assert batch.label_positions is not None and batch.label_positions.dtype == np.int32
        for i, sample in enumerate(batch.sample_index):
            lo, hi = batch.offsets[i], batch.offsets[i + 1]
            positions = batch.label_positions[lo:hi]
            want = np.flatnonzero(labels[sample, shift:].numpy() != -100)  # positions on the logits' axis
            np.testing.assert_array_equal(positions, want)
            np.testing.assert_array_equal(batch.label_ids[lo:hi], labels[sample].numpy()[positions + shift])
            np.testing.assert_array_equal(batch.pred_ids[lo:hi], logits[sample].argmax(-1).numpy()[positions])
            seen += 1
    assert seen == 12


def test_arrow_fields_describe_themselves(tmp_path):
    evaluate(tmp_path / "spill", "causal_lm")
    path = glob.glob(str(tmp_path / "spill/shards/*/chunk-*/tokens.arrow"))[0]
    schema = pa.ipc.open_file(path).schema
    describe = {f.name: (f.metadata or {}).get(b"description", b"").decode() for f in schema}
    assert "pred_ids[j] is the prediction for label_ids[j]" in describe["pred_ids"]
    assert "shifted" in describe["pred_ids"]
    assert "natural log" in describe["label_logprob"]
    assert "position t" in describe["label_positions"]
    assert schema.field("label_positions").type == pa.list_(pa.int32())
    assert all(describe[name] for name in ("sample_index", "label_ids", "sample_nll"))


def test_a_spill_without_positions_still_reads(tmp_path, rng=np.random.default_rng(0)):
    """Chunks written before positions were stored (or rows built without them) read back with none."""
    batch = random_batch(rng, 20, logprob=True)
    assert batch.label_positions is None
    write_spill(tmp_path / "old", [batch], make_manifest(dataset_length=20, has_logprob=True))
    path = glob.glob(str(tmp_path / "old/shards/*/chunk-*/tokens.arrow"))[0]
    assert "label_positions" not in pa.ipc.open_file(path).schema.names
    read = SampleBatch.concat(list(SpillReader(tmp_path / "old").iter_chunks()))
    assert read.label_positions is None and read.columns == {}
    np.testing.assert_array_equal(read.pred_ids, batch.pred_ids)


def test_positions_survive_take_slice_and_concat(tmp_path):
    evaluate(tmp_path / "spill", "causal_lm")
    whole = SampleBatch.concat(list(SpillReader(tmp_path / "spill").iter_chunks()))
    parts = [whole.slice(0, 5), whole.take(np.array([9, 5, 7])), whole.slice(5, 12)]
    joined = SampleBatch.concat([parts[0], parts[2]])
    np.testing.assert_array_equal(joined.label_positions, whole.label_positions)
    taken = parts[1]
    for k, i in enumerate([9, 5, 7]):
        np.testing.assert_array_equal(taken.label_positions[taken.offsets[k]:taken.offsets[k + 1]],
                                      whole.label_positions[whole.offsets[i]:whole.offsets[i + 1]])


def test_the_manifest_lists_the_stored_dataset_columns(tmp_path):
    evaluator = Evaluator(tmp_path / "spill", metrics=["token_accuracy"], dataset_length=4)
    logits, labels = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
    evaluator.update(logits, labels, sample_index=[0, 1, 2, 3], columns={"question": ["a", "b", "c", "d"]})
    evaluator.finalize()
    reader = SpillReader(tmp_path / "spill")
    assert reader.manifest.columns == ["question"]
    path = glob.glob(str(tmp_path / "spill/shards/*/chunk-*/tokens.arrow"))[0]
    stored = [n for n in pa.ipc.open_file(path).schema.names
              if n not in ("sample_index", "pred_ids", "label_ids", "sample_nll", "label_positions")]
    assert stored == reader.manifest.columns
