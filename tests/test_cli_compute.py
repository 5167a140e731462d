"""`spilleval compute` / `spilleval inspect` on a spill directory: the directory alone reproduces the live numbers.

Most cases run the typer app in-process (CliRunner); one runs the installed console script in a real subprocess,
as a user would.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import SPILLEVAL_SCRIPT
from typer.testing import CliRunner

from spilleval import Evaluator, SpillReader
from spilleval.cli import app
from spilleval.testing import encode_qa, pad_batch, qa_examples

METRICS = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "answer_macro_f1"]
N_SAMPLES = 40


def logits_that_are_mostly_right(labels: torch.Tensor, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logits whose argmax is the next label ~70% of the time (a model that learned something), bf16."""
    batch, length = labels.shape
    logits = torch.randn(batch, length, vocab, generator=gen)
    target = labels[:, 1:].clamp(min=0)
    right = torch.rand(target.shape, generator=gen) < 0.7
    logits[:, :-1].scatter_add_(-1, target[..., None], (right * 6.0)[..., None])
    return logits.to(torch.bfloat16)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tokenizer):
    """A finished evaluation: its spill directory and the dict `finalize()` returned."""
    spill_dir = tmp_path_factory.mktemp("cli") / "eval"
    items = [encode_qa(ex, tokenizer, index=i) for i, ex in enumerate(qa_examples(N_SAMPLES, seed=3))]
    gen = torch.Generator().manual_seed(0)
    evaluator = Evaluator(spill_dir, metrics=METRICS, tokenizer=tokenizer, dataset_length=N_SAMPLES, chunk_rows=6)
    for start in range(0, N_SAMPLES, 8):
        batch = pad_batch(items[start : start + 8])
        logits = logits_that_are_mostly_right(batch["labels"], len(tokenizer), gen)
        evaluator.update(logits, batch["labels"], sample_index=batch["index"])
    return spill_dir, evaluator.finalize()


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_compute_json_equals_live_finalize(evaluated):
    spill_dir, live = evaluated
    assert 0 < live["token_accuracy"] < 1 and 0 < live["exact_match_accuracy"] < 1
    payload = json.loads(run_cli("compute", spill_dir, "--json"))
    assert payload["metrics"] == live  # every key, every bit (JSON floats round-trip exactly)
    assert "partial" not in payload


def test_compute_table_prints_every_live_value(evaluated):
    spill_dir, live = evaluated
    output = run_cli("compute", spill_dir)
    for key, value in live.items():
        shown = f"{value:.6f}" if isinstance(value, float) else str(value)
        assert key in output and shown in output, key


def test_compute_a_subset_of_metrics(evaluated):
    spill_dir, live = evaluated
    payload = json.loads(run_cli("compute", spill_dir, "--metrics", "token_accuracy,answer_macro_f1", "--json"))
    assert payload["metrics"] == {k: live[k] for k in ("token_accuracy", "answer_macro_f1")}


def test_console_script_in_a_subprocess(evaluated, tmp_path):
    """The installed `spilleval` command, as a user runs it: same numbers; bad input is one line, exit code 2."""
    spill_dir, live = evaluated
    done = subprocess.run([SPILLEVAL_SCRIPT, "compute", spill_dir, "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["metrics"] == live
    (tmp_path / "not-a-spill").mkdir()
    bad = subprocess.run([SPILLEVAL_SCRIPT, "compute", tmp_path / "not-a-spill"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "not a spill directory" in bad.stderr


def test_inspect_prints_counts_bytes_per_token_and_completeness(evaluated):
    spill_dir, live = evaluated
    reader = SpillReader(spill_dir)
    info = json.loads(run_cli("inspect", spill_dir, "--json"))
    assert info["samples_committed"] == info["samples_expected"] == N_SAMPLES
    assert info["missing"] == 0 and info["complete"] is True
    assert info["supervised_tokens"] == reader.num_tokens > 0
    assert info["chunks"] == len(reader.chunks) == -(-N_SAMPLES // 6)
    assert info["bytes_on_disk"] == reader.bytes_on_disk
    assert info["bytes_per_token"] == pytest.approx(reader.bytes_on_disk / reader.num_tokens)
    assert info["results"] == live
    text = run_cli("inspect", spill_dir)
    for expected in ("complete", f"{N_SAMPLES} of {N_SAMPLES}", f"{reader.num_tokens:,}", "bytes / supervised token",
                     f"{reader.bytes_on_disk / reader.num_tokens:.6f}", "causal_lm", "uint16"):
        assert expected in text, expected


def test_partial_spill_is_refused_unless_allowed(tmp_path, tokenizer):
    """A run that died: compute refuses by default (and says how), computes with --allow-partial and says so."""
    evaluator = Evaluator(tmp_path / "eval", metrics=["token_accuracy"], dataset_length=20, chunk_rows=4)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 30, (12, 5), generator=gen)
    evaluator.update(torch.randn(12, 5, 30, generator=gen), labels, sample_index=list(range(12)))
    evaluator.abort()  # as after a crash: committed chunks stay, nothing is marked complete
    refused = CliRunner().invoke(app, ["compute", str(tmp_path / "eval")])
    assert refused.exit_code != 0 and "allow-partial" in str(refused.exception)
    payload = json.loads(run_cli("compute", tmp_path / "eval", "--allow-partial", "--json"))
    assert payload["partial"] is True and "12 of 20" in payload["note"]
    text = run_cli("inspect", tmp_path / "eval")
    assert "PARTIAL" in text and "12 of 20" in text and "12-19" in text
