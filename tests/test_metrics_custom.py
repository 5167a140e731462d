"""A user's own metrics, registered in their own module, are usable by name live and from the real CLI (--plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import SPILLEVAL_SCRIPT, registered_plugin
from metric_data import Sample, batches_of, decoded_texts, run_streaming, tokenizer

from spilleval import Evaluator

PLUGIN = "spilleval_test_plugin_metrics"
PLUGIN_SOURCE = textwrap.dedent('''
    """Custom metrics, as a user writes them."""
    from spilleval.metrics import CorpusMetric, StreamingMetric, register, sample_metric


    @register("mean_prediction_words")
    class MeanPredictionWords(StreamingMetric):
        """Words per decoded prediction: a streaming metric with two integer states."""

        needs_text = True

        def __init__(self):
            super().__init__()
            self.add_state("words")
            self.add_state("samples")

        def update(self, batch):
            self.add("words", sum(len(text.split()) for text in batch.pred_text))
            self.add("samples", len(batch))

        def compute(self):
            return {"mean_prediction_words": int(self.value("words")) / max(int(self.value("samples")), 1)}


    @register("longest_answer")
    class LongestAnswer(CorpusMetric):
        """A corpus metric: one pass over the spill."""

        def compute(self, reader):
            return {"longest_answer": max(int(b.lengths.max()) for b in reader.iter_chunks(with_arrays=False))}


    @sample_metric("same_first_letter")
    def same_first_letter(prediction, label):
        return float(prediction[:1] == label[:1])
''')
NAMES = ["mean_prediction_words", "longest_answer", "same_first_letter"]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """The plugin importable and its metrics registered for one test."""
    path = tmp_path / "plugins"
    path.mkdir()
    yield from registered_plugin(monkeypatch, path, PLUGIN, PLUGIN_SOURCE)


def run_cli(*args: str, plugin_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(SPILLEVAL_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_custom_metrics_by_name_live_and_from_the_cli(tmp_path, plugin_dir):
    samples = [Sample(pred="red cat".split(), label="red dog".split()), Sample(pred=["two"], label="blue cat".split()),
               Sample(pred=[], label=["three"])]
    evaluator = Evaluator(tmp_path / "run", metrics=[*NAMES, "token_accuracy"], tokenizer=tokenizer())
    for batch in batches_of(samples, 2):
        evaluator.add(batch, vocab_size=len(tokenizer()))
    live = evaluator.finalize()
    preds, labels = decoded_texts(samples)
    assert live["mean_prediction_words"] == sum(len(p.split()) for p in preds) / len(preds)
    assert live["longest_answer"] == 2
    assert live["same_first_letter"] == sum(p[:1] == t[:1] for p, t in zip(preds, labels)) / len(preds)

    named = run_cli("compute", str(tmp_path / "run"), "--metrics", ",".join(NAMES), "--plugin", PLUGIN, "--json",
                    plugin_dir=plugin_dir)
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["metrics"] == {k: live[k] for k in NAMES}

    missing = run_cli("compute", str(tmp_path / "run"), "--metrics", NAMES[0], plugin_dir=plugin_dir)
    assert missing.returncode == 2
    assert "--plugin" in missing.stderr and "Traceback" not in missing.stderr


def test_sample_metric_is_a_mergeable_streaming_metric(plugin_dir):
    samples = [Sample(["red"], ["red"]), Sample(["two"], ["blue"]), Sample(["blue"], ["blue", "cat"])]
    whole = run_streaming(["same_first_letter"], batches_of(samples, 3))
    left = run_streaming(["same_first_letter"], batches_of(samples, 1, [0, 1]))
    left.merge(run_streaming(["same_first_letter"], batches_of(samples, 1, [2])).states())
    assert left.compute_streaming() == whole.compute_streaming() == {"same_first_letter": 2 / 3}
    assert sys.modules[PLUGIN].same_first_letter("a", "ab") == 1.0  # the decorator returns the function itself
