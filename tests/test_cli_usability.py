"""The command as a newcomer meets it: plugins, exit codes, metric names and parameters, one metric order, labels.

Real spills written by the real `Evaluator`; the console script runs in a subprocess where the process itself is
what is tested (the current directory on the path, exit codes, the traceback file), in-process otherwise.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SPILLEVAL_SCRIPT
from inspect_spills import qa_rows, write_qa_spill
from rich.console import Console
from typer.testing import CliRunner

from spilleval import cli
from spilleval.metrics import compute_from_spill
from spilleval.metrics.base import UnknownMetricError
from spilleval.metrics.names import parse_spec, resolve_name, split_specs

N = 48
METRICS = ["nll", "token_accuracy", "answer_macro_f1", "text_match", "bleu"]  # a corpus metric in the middle
runner = CliRunner()

PLUGIN = '''
from spilleval.metrics import sample_metric

@sample_metric("starts_right")
def starts_right(prediction: str, label: str) -> float:
    return float(prediction[:1] == label[:1])
'''


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=240, force_terminal=False))


@pytest.fixture(scope="module")
def rows(tokenizer):
    return qa_rows(tokenizer, N, seed=5)


@pytest.fixture(scope="module")
def spill(tmp_path_factory, tokenizer, rows) -> Path:
    return write_qa_spill(tmp_path_factory.mktemp("usability") / "spill", tokenizer, rows, chunk_rows=16,
                          metrics=METRICS)


def run(*args) -> str:
    result = runner.invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["spilleval", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def script(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SPILLEVAL_SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------- plugins, exits
def test_plugin_from_the_current_directory_and_from_a_file_path(spill, tmp_path):
    """The README's `--plugin mymetrics` next to mymetrics.py, as the installed script runs it; or a .py path."""
    (tmp_path / "mymetrics.py").write_text(PLUGIN)
    by_module = script("compute", spill, "--metrics", "starts_right", "--plugin", "mymetrics", "--json", cwd=tmp_path)
    assert by_module.returncode == 0, by_module.stderr
    value = json.loads(by_module.stdout)["metrics"]["starts_right"]
    assert 0 < value <= 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_path = script("compute", spill, "-m", "starts_right", "--plugin", tmp_path / "mymetrics.py", "--json",
                     cwd=elsewhere)
    assert by_path.returncode == 0, by_path.stderr
    assert json.loads(by_path.stdout)["metrics"]["starts_right"] == value


def test_a_missing_plugin_is_one_line_and_exit_code_2(spill, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = main(monkeypatch, capsys, "compute", spill, "--plugin", "nosuchplugin")
    assert code == 2 and "no module named nosuchplugin" in error_line(err) and str(tmp_path) in err
    code, _, err = main(monkeypatch, capsys, "compute", spill, "--plugin", tmp_path / "missing.py")
    assert code == 2 and "missing.py: no such file" in error_line(err)


def test_an_unexpected_error_is_one_line_exit_code_1_and_a_traceback_file(spill, tmp_path):
    (tmp_path / "broken.py").write_text("def helper():\n    return 1 / 0\n\nhelper()\n")
    done = script("compute", spill, "--plugin", "broken", cwd=tmp_path)
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert "unexpected ZeroDivisionError: division by zero" in line
    path = Path(re.search(r"full traceback in (\S+?);", line).group(1))
    try:
        trace = path.read_text()
        assert trace.startswith("Traceback") and "broken.py" in trace and "helper()" in trace
    finally:
        path.unlink()


def test_help_documents_exit_codes_and_reads_cleanly_in_a_pipe():
    done = script("--help")
    assert done.returncode == 0 and "Exit codes: 0 success; 1 unexpected error" in " ".join(done.stdout.split())
    for command in ("compute", "show", "worst", "diff", "export", "report", "inspect", "metrics"):
        text = script(command, "--help").stdout
        assert "<bool>" not in text and "<list" not in text and "<int range>" not in text, command
        assert not [line for line in text.splitlines() if line != line.rstrip()], command  # no trailing spaces
        assert "╭" not in text, command


def test_version():
    from spilleval import __version__

    assert run("--version").strip() == f"spilleval {__version__}"


# ----------------------------------------------------------------------------------------------- metric names
@pytest.mark.parametrize("typed, name", [
    ("perplexity", "nll"), ("eval_perplexity", "nll"), ("eval_token_accuracy", "token_accuracy"),
    ("bleu_precision_1", "bleu"), ("eval_gen_bleu", "bleu"), ("squad_f1", "squad"), ("f1_macro", "f1"),
    ("exact_match_accuracy", "text_match"), ("bit_match_accuracy", "text_match"), ("rougeL", "rouge"),
])
def test_result_keys_name_their_metric(typed, name):
    assert resolve_name(typed) == name


def test_declared_result_keys_are_what_the_metrics_report(spill, rows, tokenizer):
    """`outputs` (what the CLI accepts as names, and the order it lists) against the keys a real compute returns."""
    from spilleval.metrics import available_metrics

    answers = sorted({tokenizer.decode(rows.row(i)[1], skip_special_tokens=True) for i in range(N)})
    names = ["token_accuracy", "sequence_exact_match", "text_match", "nll", "loss", "bits_per_byte", "squad", "bleu",
             "chrf", "ter", "rouge", "wer", "cer", "mer", "wil", "wip", "answer_macro_f1", "loss_percentiles",
             "distinct_n", "accuracy", "precision", "recall", "f1"]
    specs = [{"name": n, "params": {"labels": answers}} if n in ("accuracy", "precision", "recall", "f1") else n
             for n in names]
    results = compute_from_spill(spill, specs)
    metrics = available_metrics()
    assert list(results) == [key for name in names for key in metrics[name].result_keys()]
    assert all(metrics[name].scale for name in names)


def test_a_typo_suggests_the_closest_names_without_stray_quotes(spill, monkeypatch, capsys):
    with pytest.raises(UnknownMetricError) as raised:
        resolve_name("tokn_accuracy")
    assert "Did you mean token_accuracy" in str(raised.value)
    code, _, err = main(monkeypatch, capsys, "compute", spill, "--metrics", "tokn_accuracy")
    line = error_line(err)
    assert code == 2 and "unknown metric tokn_accuracy. Did you mean token_accuracy" in line
    assert "'" not in line and '"' not in line


def test_a_result_key_computes_its_metric(spill):
    payload = json.loads(run("compute", spill, "--metrics", "perplexity,eval_token_accuracy", "--json"))
    live = json.loads((spill / "results.json").read_text())["metrics"]
    assert payload["metrics"] == {k: live[k] for k in ("nll", "perplexity", "token_accuracy")}


def test_repeated_metrics_options_add_up(spill):
    """`-m nll -m token_accuracy` is `-m nll,token_accuracy`: a second -m used to replace the first, silently."""
    repeated = json.loads(run("compute", spill, "-m", "perplexity", "-m", "eval_token_accuracy", "--json"))
    assert repeated == json.loads(run("compute", spill, "-m", "perplexity,eval_token_accuracy", "--json"))
    assert set(repeated["metrics"]) == {"nll", "perplexity", "token_accuracy"}


@pytest.mark.parametrize("text, spec", [
    ("f1(labels=yes,no,maybe)", {"name": "f1", "params": {"labels": ["yes", "no", "maybe"]}}),
    ("f1(labels=[yes])", {"name": "f1", "params": {"labels": ["yes"]}}),
    ('f1(labels=["1", "2"], target_column=answer)',
     {"name": "f1", "params": {"labels": ["1", "2"], "target_column": "answer"}}),
    ("accuracy(labels=1,2,3)", {"name": "accuracy", "params": {"labels": [1, 2, 3]}}),
    ("bleu(tokenize=intl, lowercase=true)", {"name": "bleu", "params": {"tokenize": "intl", "lowercase": True}}),
    ("perplexity()", {"name": "nll", "params": {}}),
    ("token_accuracy", "token_accuracy"),
])
def test_metric_parameters_on_the_command_line(text, spec):
    assert parse_spec(text) == spec


def test_specs_split_at_commas_outside_parentheses():
    assert split_specs("nll, f1(labels=a,b), token_accuracy") == ["nll", "f1(labels=a,b)", "token_accuracy"]


def test_cli_parameters_equal_the_python_spec(spill, tmp_path, rows, tokenizer):
    """`accuracy(labels=...)` on the command line, in a JSON and in a YAML file: the numbers of the Python spec."""
    answers = sorted({tokenizer.decode(rows.row(i)[1], skip_special_tokens=True) for i in range(N)})
    want = compute_from_spill(spill, [{"name": "f1", "params": {"labels": answers}}])
    given = json.dumps(answers)
    got = json.loads(run("compute", spill, "--metrics", f"f1(labels={given})", "--json"))["metrics"]
    assert got == want
    (tmp_path / "m.json").write_text(json.dumps([{"name": "f1", "params": {"labels": answers}}]))
    assert json.loads(run("compute", spill, "--metrics-file", tmp_path / "m.json", "--json"))["metrics"] == want
    (tmp_path / "m.yaml").write_text("f1:\n  labels: " + json.dumps(answers) + "\n")
    assert json.loads(run("compute", spill, "--metrics-file", tmp_path / "m.yaml", "--json"))["metrics"] == want


def test_bad_parameters_are_validated_and_named(spill, monkeypatch, capsys):
    code, _, err = main(monkeypatch, capsys, "compute", spill, "--metrics", "cider(n=1000)")
    assert code == 2 and "metric cider" in error_line(err) and "parameter n is invalid" in err
    code, _, err = main(monkeypatch, capsys, "compute", spill, "--metrics", "bleu(nonsense=1)")
    assert code == 2 and "nonsense" in error_line(err)


def test_metrics_lists_names_keys_and_scales():
    listing = json.loads(run("metrics", "--json"))["metrics"]
    by_name = {m["name"]: m for m in listing}
    assert by_name["bleu"]["scales"]["bleu"] == "0–100" and by_name["rouge"]["scales"]["rouge1"] == "0–1"
    assert by_name["nll"]["result_keys"] == ["nll", "perplexity"]
    assert "no bits are compared" not in by_name["text_match"]["description"]  # the summary line only
    assert "bleu" in run("metrics")


def test_the_compute_table_marks_scales(spill):
    out = run("compute", spill, "--bootstrap", "0")
    cell = r"[\s│]+"
    ci = r"(± \S+ \(95% CI\))?[\s│]+"  # the interval column, when there are intervals
    assert re.search(rf"bleu{cell}[\d.]+{cell}0–100", out) and re.search(rf"token_accuracy{cell}[\d.]+{cell}0–1 ", out)
    assert re.search(rf"perplexity{cell}[\d.]+{cell}≥ 1, lower is better", out)
    assert re.search(rf"bleu{cell}[\d.]+{cell}± \S+ \(95% CI\){cell}0–100", run("compute", spill))
    assert re.search(rf"bleu{cell}[\d.]+{cell}{ci}0–100", run("inspect", spill))
    assert re.search(rf"bleu{cell}[\d.]+{cell}[\d.]+{cell}[-+\d.]+{cell}0–100", run("diff", spill, spill, "--test",
                                                                                  "none"))


# ----------------------------------------------------------------------------------------------- one order
def test_one_metric_order_everywhere(spill, tmp_path):
    """The order of the metric specs (each metric's keys in its own order) in results.json, compute, inspect,
    report and diff, although the corpus metric in the middle is computed after every streaming one."""
    want = ["nll", "perplexity", "token_accuracy", "answer_macro_f1", "bit_match_accuracy",
            "exact_match_accuracy", "bleu", "bleu_precision_1", "bleu_precision_2", "bleu_precision_3",
            "bleu_precision_4"]
    assert list(json.loads((spill / "results.json").read_text())["metrics"]) == want
    assert list(json.loads(run("compute", spill, "--json"))["metrics"]) == want
    assert list(json.loads(run("compute", spill, "--metrics", ",".join(METRICS), "--json"))["metrics"]) == want
    assert list(json.loads(run("inspect", spill, "--json"))["results"]) == want
    assert list(json.loads(run("diff", spill, spill, "--recompute", "--json"))["metrics"]) == want

    def order(text: str) -> list[str]:
        return sorted(want, key=lambda k: re.search(rf"\b{k}\b", text).start())

    assert order(run("compute", spill)) == want
    run("report", spill, "-o", tmp_path / "r.html", "-q")
    page = (tmp_path / "r.html").read_text()
    assert order(page[page.index("nll"):]) == want


def test_results_json_with_sorted_keys_is_listed_in_spec_order(spill, tmp_path):
    """A results.json written before the order was kept (keys sorted) reads in the order of the metric specs."""
    import shutil

    from spilleval.spill.integrity import seal

    old = tmp_path / "old"
    shutil.copytree(spill, old)
    record = json.loads((old / "results.json").read_text())
    (old / "results.json").write_text(json.dumps(record, sort_keys=True))
    seal(old)
    assert list(json.loads((old / "results.json").read_text())["metrics"])[0] == "answer_macro_f1"
    want = list(json.loads((spill / "results.json").read_text())["metrics"])
    assert list(json.loads(run("inspect", old, "--json"))["results"]) == want
    assert list(json.loads(run("diff", old, old, "--json"))["metrics"]) == want


# ----------------------------------------------------------------------------------------------- diff, report
def test_diff_says_whose_scores_a_flipped_sample_shows(spill, tmp_path, tokenizer, rows):
    from spilleval.batch import SampleBatch

    pred = rows.label_ids.copy()  # B: every sample exactly right, so A's wrong samples flip to right
    b = SampleBatch(rows.sample_index, rows.offsets, pred, rows.label_ids, rows.label_logprob, dict(rows.columns))
    other = write_qa_spill(tmp_path / "b", tokenizer, b, metrics=METRICS)
    out = run("diff", spill, other, "--limit", "1")
    assert "wrong in A → right in B" in out and re.search(r"\n\s*scores \(A\)\s+token_accuracy", out)
    assert not re.search(r"\n\s*scores\s+token_accuracy", out)


def test_report_refuses_to_overwrite_without_force(spill, tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    code, _, err = main(monkeypatch, capsys, "report", spill, "-o", out, "-q")
    assert code == 2 and "already exists" in error_line(err) and "--force" in err
    assert out.read_text() == "keep me"
    run("report", spill, "-o", out, "-q", "--force")
    assert out.read_text().startswith("<!DOCTYPE html>")


# ----------------------------------------------------------------------------------------------- progress
def test_progress_counts_samples_of_the_spill_total_one_bar_per_corpus_pass(spill, capsys):
    compute_from_spill(spill, ["token_accuracy", "text_match", "answer_macro_f1", "cider"], progress=True,
                       workers=1)
    err = capsys.readouterr().err
    # one bar per pass over the spill, named after the metrics it serves: the streaming metrics and the corpus
    # metrics' first passes share the first, cider's second pass has its own
    for desc in ("token_accuracy, text_match, answer_macro_f1, cider", "cider (pass 2)"):
        assert re.search(rf"{re.escape(desc)}: +\d+%\|.*\| *\d+/{N} \[", err), (desc, err)
    assert "samples/s" in err and "batch" not in err


def test_worst_and_report_progress_counts_samples_not_chunks(spill, capsys):
    from spilleval.report import default_scores, iter_scored
    from spilleval.spill import SpillReader

    reader = SpillReader(spill)
    for _ in iter_scored(reader, default_scores(has_logprob=True), progress_bar=True, desc="worst by nll"):
        pass
    err = capsys.readouterr().err
    assert re.search(rf"worst by nll: +\d+%\|.*\| *\d+/{N} \[", err) and "chunk" not in err


def test_no_progress_when_stderr_is_not_a_terminal(spill):
    done = script("compute", spill)
    assert done.returncode == 0 and done.stderr == ""
    done = script("worst", spill, "--by", "nll", "-n", "2")
    assert done.returncode == 0 and done.stderr == ""


# ----------------------------------------------------------------------------------------------- a parent directory
def test_inspect_on_a_directory_of_spills_names_the_latest_step(spill, tmp_path, monkeypatch, capsys):
    import shutil

    for name in ("spill-eval-step-200", "spill-eval-step-1000", "spill-eval-step-90", "spill-eval-step-1000-1"):
        shutil.copytree(spill, tmp_path / name)
    (tmp_path / "checkpoint-1000").mkdir()
    for command in ("inspect", "show", "compute"):
        code, _, err = main(monkeypatch, capsys, command, tmp_path)
        line = error_line(err)
        assert code == 2 and "it is not a spill directory" in line and "DAMAGED" not in err, command
        assert line.endswith(f"the latest is {tmp_path / 'spill-eval-step-1000-1'}"), line
        assert "(spill-eval-step-90, spill-eval-step-200, spill-eval-step-1000, spill-eval-step-1000-1)" in line
