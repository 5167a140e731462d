"""`spilleval history`: a real training run with three evaluations, read back as metric-vs-step from the spills'
results.json (and recomputed from the chunks), printed, as JSON, plotted, and in the HTML report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from brute_force import make_args
from PIL import Image
from typer.testing import CliRunner

from spilleval import GenerationEval, cli
from spilleval.errors import USER_ERRORS
from spilleval.report.history import HistoryError, Interval, run_history
from spilleval.spill.integrity import seal
from spilleval.testing import encode_qa, pad_batch, qa_examples, tiny_llama
from spilleval.trainer import SpillingTrainer

runner = CliRunner()
METRICS = ["token_accuracy", "sequence_exact_match"]
KEYS = {"eval_loss", "eval_token_accuracy", "eval_sequence_exact_match"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer) -> tuple[Path, list[dict]]:
    """A training run evaluated at steps 4, 8 and 12, then once more after training (spill-eval-step-12-1)."""
    tmp = tmp_path_factory.mktemp("history")
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(32, seed=60)]
    evals = [encode_qa(ex, tokenizer) for ex in qa_examples(12, seed=61)]
    args = make_args(tmp, eval_strategy="steps", eval_steps=4, max_steps=12, learning_rate=1e-2,
                     per_device_train_batch_size=8)
    trainer = SpillingTrainer(model=tiny_llama(len(tokenizer), seed=11), args=args, train_dataset=train,
                              eval_dataset=evals, data_collator=pad_batch, processing_class=tokenizer, metrics=METRICS)
    trainer.train()
    trainer.evaluate()
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return Path(args.output_dir), logged


def invoke(*args: str) -> str:
    result = runner.invoke(cli.app, ["history", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_history_lists_every_evaluation_in_step_order_with_the_logged_values(run):
    out, logged = run
    history = json.loads(invoke(str(out), "--json"))
    assert history["steps"] == [4, 8, 12]
    [series] = history["series"]
    assert series["name"] == "eval"
    points = series["points"]
    assert [(p["step"], p["repeat"]) for p in points] == [(4, 0), (8, 0), (12, 0), (12, 1)]
    assert [Path(p["spill"]).name for p in points] == [
        "spill-eval-step-4", "spill-eval-step-8", "spill-eval-step-12", "spill-eval-step-12-1"]
    assert [entry["step"] for entry in logged] == [4, 8, 12, 12]
    for point, entry in zip(points, logged):
        assert set(point["metrics"]) == KEYS and point["source"] == "results.json"
        assert point["metrics"] == {key: entry[key] for key in KEYS}  # exactly what the trainer logged
    assert len({p["metrics"]["eval_loss"] for p in points[:3]}) == 3  # training moved the numbers


def test_generation_parts_are_series_of_their_own(tmp_path, tokenizer):
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(16, seed=62)]
    evals = [encode_qa(ex, tokenizer) for ex in qa_examples(6, seed=63)]
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=4, per_device_train_batch_size=8)
    trainer = SpillingTrainer(model=tiny_llama(len(tokenizer), seed=13), args=args, train_dataset=train,
                              eval_dataset=evals, data_collator=pad_batch, processing_class=tokenizer,
                              generation=GenerationEval(["bleu"], references_column=None, max_new_tokens=3))
    trainer.train()
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "eval_loss" in entry}
    history = run_history(args.output_dir)
    assert [s.name for s in history.series] == ["eval/generation", "eval/teacher_forced"]
    generation, teacher_forced = history.series
    assert [p.spill.name for p in generation.points] == ["generation", "generation"]
    for series, keys in ((generation, ["eval_gen_bleu"]), (teacher_forced, ["eval_loss", "eval_token_accuracy"])):
        assert [p.step for p in series.points] == [2, 4]
        for point in series.points:
            assert {k: point.metrics[k] for k in keys} == {k: logged[point.step][k] for k in keys}
    assert generation.short_name("eval_gen_bleu_precision_1") == "bleu_precision_1"


def test_history_table_shows_the_steps_in_order(run):
    out, logged = run
    text = invoke(str(out))
    rows = [line for line in text.splitlines() if line.strip().startswith("│")]
    steps = [row.split("│")[1].strip() for row in rows]
    assert steps == ["4", "8", "12", "12 (-1)"]
    for row, entry in zip(rows, logged):
        assert f"{entry['eval_token_accuracy']:.6f}" in row


def test_recompute_equals_the_stored_results(run):
    out, _ = run
    stored = run_history(out)
    recomputed = run_history(out, recompute=True)
    for a, b in zip(stored.series[0].points, recomputed.series[0].points):
        assert b.source == "recomputed" and b.metrics == a.metrics


def test_history_reads_no_chunk(run, tmp_path):
    """Flat memory, milliseconds per spill: without --recompute only results.json and the metadata are read, so a
    run whose chunk data files are gone gives the same history."""
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("tokens.arrow", "*.zarr"))
    assert not list(copy.rglob("tokens.arrow")) and list(out.rglob("tokens.arrow"))
    assert [p.metrics for p in run_history(copy).series[0].points] == \
        [p.metrics for p in run_history(out).series[0].points]


def test_plot_file_is_written(run, tmp_path):
    out, _ = run
    path = tmp_path / "history.png"
    text = invoke(str(out), "--plot", str(path))
    assert f"wrote {path}" in text.replace("\n", "")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200


def test_intervals_are_shown_as_half_widths_and_error_bars(run, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    spill = copy / "spill-eval-step-8"
    record = json.loads((spill / "results.json").read_text())
    value = record["metrics"]["eval_token_accuracy"]
    record["intervals"] = {"eval_token_accuracy": {"low": value - 0.02, "high": value + 0.04, "level": 0.95,
                                                   "method": "analytic"}}
    (spill / "results.json").write_text(json.dumps(record))
    seal(spill)  # as the evaluation that writes intervals does
    history = json.loads(invoke(str(copy), "--json", "--plot", str(tmp_path / "h.png")))
    point = history["series"][0]["points"][1]
    assert point["intervals"]["eval_token_accuracy"]["low"] == pytest.approx(value - 0.02)
    assert f"{value:.6f} ± 0.030000" in invoke(str(copy))
    assert (tmp_path / "h.png").stat().st_size > 0


def test_damaged_and_missing_results_are_notes_not_failures(run, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    results = copy / "spill-eval-step-4" / "results.json"
    results.write_text(results.read_text().replace("eval_loss", "eval_lost"))
    history = run_history(copy)
    first = history.series[0].points[0]
    assert first.step == 4 and first.metrics == {} and "results.json" in first.note
    assert len(history.series[0].points) == 4


def test_ill_typed_fields_of_a_sealed_results_json_are_ignored(run, tmp_path):
    """results.json is untrusted: a well-formed file with fields of the wrong type (sealed, so it verifies) gives
    a history without them, not a crash."""
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    spill = copy / "spill-eval-step-8"
    record = json.loads((spill / "results.json").read_text())
    record["provenance"]["checkpoint"] = {"global_step": "eight", "loaded_checkpoint": 5}
    record["metrics"]["eval_note"] = {"nested": [1, 2]}
    record["intervals"] = {"eval_loss": "wide", "eval_token_accuracy": {"low": 1.0, "high": 0.0},
                           "eval_sequence_exact_match": {"low": True, "high": 1}}
    (spill / "results.json").write_text(json.dumps(record))
    seal(spill)
    point = run_history(copy).series[0].points[1]
    assert point.step == 8 and point.loaded_checkpoint is None and point.intervals == {}
    assert "eval_note" not in point.numeric() and "eval_note" in invoke(str(copy), "--json")
    invoke(str(copy), "--plot", str(tmp_path / "h.png"))


def test_a_spill_an_empty_directory_or_nothing_to_plot_is_a_clear_error(run, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("results.json"))
    for path, words in ((out / "spill-eval-step-4", "is one spill"), (tmp_path, "holds no spill directories"),
                        (copy, "no metrics to plot")):
        result = runner.invoke(cli.app, ["history", str(path), "--plot", str(tmp_path / "h.png")])
        assert isinstance(result.exception, HistoryError) and words in str(result.exception)
        assert isinstance(result.exception, USER_ERRORS)  # the command prints it as one line


def test_interval_parse_refuses_malformed_entries():
    assert Interval.parse({"low": 0.1, "high": 0.3, "level": 0.95, "method": "bootstrap"}).half_width == \
        pytest.approx(0.1)
    for bad in (None, [], {"low": "0.1", "high": 0.3}, {"low": 0.5, "high": 0.3}, {"low": float("nan"), "high": 1}):
        assert Interval.parse(bad) is None


def test_report_of_a_spill_in_a_run_has_the_history_section(run, tmp_path):
    out, _ = run
    page = tmp_path / "report.html"
    result = runner.invoke(cli.app, ["report", str(out / "spill-eval-step-8"), "-o", str(page), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    html = page.read_text()
    assert '<section id="history">' in html
    assert '<img alt="metrics against the global step" src="data:image/png;base64,' in html
    for step in ("4", "8", "12"):
        assert f'<td class="num">{step}</td>' in html
