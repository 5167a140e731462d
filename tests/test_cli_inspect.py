"""`spilleval show | worst | diff | export` on real spills written in the test, checking what they print.

The per-sample scores and the top-N heap are checked against plain in-memory references (hypothesis), the
commands' output against what the spilled rows say, and `worst` / `export` for flat memory in a subprocess.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, make_manifest, random_batch, split_batch, write_spill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inspect_spills import qa_rows, write_qa_spill
from rich.console import Console
from typer.testing import CliRunner

from spilleval import cli
from spilleval.batch import SampleBatch
from spilleval.report import ScoreError, SpillsDifferError, WorstSamples, available_scores, resolve_scores
from spilleval.report.export import ExportError
from spilleval.report.scan import show_progress, windows
from spilleval.report.scores import score_batch

N = 96
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Plain output as in a pipe, but wide enough that one sample's line is not wrapped."""
    monkeypatch.setattr(cli, "console", Console(width=240, force_terminal=False))


def run(*args: str) -> str:
    result = runner.invoke(cli.app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json"))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rows(tokenizer) -> SampleBatch:
    return qa_rows(tokenizer, N, seed=3)


@pytest.fixture(scope="module")
def spill_a(tmp_path_factory, tokenizer, rows) -> Path:
    return write_qa_spill(tmp_path_factory.mktemp("a") / "spill", tokenizer, rows, chunk_rows=16, batch_size=10)


@pytest.fixture(scope="module")
def flips(rows) -> tuple[list[int], list[int]]:
    """Samples that spill B gets wrong although A had them right, and the reverse."""
    right = [i for i in range(N) if np.array_equal(*rows.row(i))]
    wrong = [i for i in range(N) if not np.array_equal(*rows.row(i))]
    return right[1:40:7], wrong[0:30:4]


@pytest.fixture(scope="module")
def spill_b(tmp_path_factory, tokenizer, rows, flips) -> Path:
    """The same eval set as A with other predictions: known flips, written in another chunking."""
    right_to_wrong, wrong_to_right = flips
    purple, red = tokenizer.convert_tokens_to_ids(["purple", "red"])
    pred = rows.pred_ids.copy()
    for i in right_to_wrong:  # the first token becomes wrong
        first = rows.offsets[i]
        pred[first] = purple if rows.label_ids[first] != purple else red
    for i in wrong_to_right:
        pred[rows.offsets[i] : rows.offsets[i + 1]] = rows.label_ids[rows.offsets[i] : rows.offsets[i + 1]]
    b = SampleBatch(rows.sample_index, rows.offsets, pred, rows.label_ids, rows.label_logprob, dict(rows.columns))
    return write_qa_spill(tmp_path_factory.mktemp("b") / "spill", tokenizer, b, chunk_rows=40, batch_size=25)


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- scores
def reference_scores(pred: list[int], label: list[int], logprob: list[float]) -> dict[str, float]:
    """Plain per-sample definitions, one sample at a time."""
    n = len(label)
    right = sum(p == t for p, t in zip(pred, label))
    overlap = sum((Counter(pred) & Counter(label)).values())
    return {
        "token_accuracy": right / n if n else 1.0,
        "exact_match": float(right == n),
        "token_f1": 2 * overlap / (len(pred) + len(label)) if n else 1.0,
        "nll": -math.fsum(logprob) / n if n else math.nan,
        "length": float(n),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), vocab=st.sampled_from([3, 50, 70_000]))
def test_per_sample_scores_equal_plain_definitions(seed, n, vocab):
    batch = random_batch(np.random.default_rng(seed), n, vocab_size=vocab, max_len=9, logprob=True, p_correct=0.5)
    names = ["token_accuracy", "exact_match", "token_f1", "nll", "length"]
    got = score_batch(batch, resolve_scores(names, has_logprob=True, has_tokenizer=False))
    for i in range(n):
        pred, label = (x.tolist() for x in batch.row(i))
        want = reference_scores(pred, label, batch.logprob_row(i).astype(np.float64).tolist())
        for name in names:
            np.testing.assert_allclose(got[name][i], want[name], rtol=1e-12, err_msg=f"{name} of sample {i}")


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, math.nan]) | st.floats(0, 1), min_size=1, max_size=80),
    n=st.integers(1, 12),
    cut=st.integers(1, 30),
    score_name=st.sampled_from(["token_accuracy", "nll"]),
    seed=st.integers(0, 1000),
)
def test_worst_heap_equals_a_full_sort_for_any_chunking(values, n, cut, score_name, seed):
    """The bounded heap returns exactly the first n of a full sort by (goodness, sample index), NaN skipped."""
    score = available_scores()[score_name]
    index = np.random.default_rng(seed).permutation(len(values) * 3)[: len(values)]
    heap = WorstSamples(score, n)
    empty = np.zeros(0, np.uint16)
    for start in range(0, len(values), cut):
        part = slice(start, start + cut)
        k = len(index[part])
        batch = SampleBatch(index[part], np.zeros(k + 1, np.int64), empty, empty)
        heap.update(batch, {score_name: np.array(values[part], dtype=np.float64)})
    sign = 1 if score.higher_is_better else -1
    expected = sorted((sign * v, i) for v, i in zip(values, index) if not math.isnan(v))[:n]
    assert [(r.sample_index) for r in heap.result()] == [i for _, i in expected]
    assert heap.skipped_undefined == sum(math.isnan(v) for v in values)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 60), rows=st.none() | st.integers(1, 20),
       tokens=st.none() | st.integers(1, 80))
def test_scoring_windows_cover_every_row_once_within_their_limits(seed, n, rows, tokens):
    batch = random_batch(np.random.default_rng(seed), n, max_len=15)
    parts = list(windows(batch, rows=rows, tokens=tokens))
    assert np.concatenate([p.sample_index for p in parts]).tolist() == batch.sample_index.tolist()
    for part in parts:
        assert rows is None or len(part) <= rows
        assert tokens is None or len(part) == 1 or part.num_tokens <= tokens


def test_unknown_or_unavailable_score_is_a_clear_error():
    with pytest.raises(ScoreError, match="unknown per-sample score 'bleu'.*token_accuracy"):
        resolve_scores(["bleu"], has_logprob=True, has_tokenizer=True)
    with pytest.raises(ScoreError, match="keep_logprob=True"):
        resolve_scores(["nll"], has_logprob=False, has_tokenizer=True)


# ----------------------------------------------------------------------------------------------- show
def test_show_prints_decoded_reference_prediction_and_scores(spill_a, rows, tokenizer):
    out = run("show", spill_a, "-n", "3")
    for i in range(3):
        pred, label = rows.row(i)
        assert f"sample {i} " in out
        assert decoded(tokenizer, label) in out
        assert decoded(tokenizer, pred) in out
        assert rows.columns["question"][i] in out
    assert "sample 3 " not in out
    assert out.count("token_accuracy") == 3 and "nll" in out and "token_f1" in out
    first_wrong = next(i for i in range(N) if not np.array_equal(*rows.row(i)))
    pred, label = rows.row(first_wrong)
    position = int(np.flatnonzero(pred != label)[0])
    named = tokenizer.convert_ids_to_tokens([int(pred[position]), int(label[position])])
    out = run("show", spill_a, "--only-wrong", "-n", "1")  # a wrong sample names its wrong positions in plain text
    assert f"sample {first_wrong} " in out and f"(predicted→expected): @{position} '{named[0]}'→'{named[1]}'" in out


def test_show_only_wrong_json_lists_the_first_wrong_samples_with_their_wrong_tokens(spill_a, rows, tokenizer):
    data = run_json("show", spill_a, "-n", "4", "--only-wrong")
    wrong = [i for i in range(N) if not np.array_equal(*rows.row(i))][:4]
    assert [s["sample_index"] for s in data["samples"]] == wrong
    for sample in data["samples"]:
        pred, label = rows.row(sample["sample_index"])
        assert sample["wrong_positions"] == np.flatnonzero(pred != label).tolist()
        assert sample["scores"]["exact_match"] == 0
        assert sample["scores"]["token_accuracy"] == pytest.approx(np.mean(pred == label))
        assert sample["prediction"] == decoded(tokenizer, pred)
        assert sample["reference"] == decoded(tokenizer, label)
        assert "".join(sample["reference_tokens"]).split() == tokenizer.convert_ids_to_tokens(label.tolist())


def test_show_by_index_keeps_the_order_given(spill_a, rows, tokenizer):
    data = run_json("show", spill_a, "--index", "17,2")
    assert [s["sample_index"] for s in data["samples"]] == [17, 2]
    assert data["samples"][0]["reference"] == decoded(tokenizer, rows.row(17)[1])


def test_show_highlights_wrong_tokens_in_colour(spill_a, rows, tokenizer, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(force_terminal=True, color_system="standard", width=200))
    i = next(i for i in range(N) if np.count_nonzero(np.not_equal(*rows.row(i))) == 1)
    pred, label = rows.row(i)
    position = int(np.flatnonzero(pred != label)[0])
    out = run("show", spill_a, "--index", str(i))
    wrong_pred = tokenizer.convert_ids_to_tokens(int(pred[position]))
    wrong_label = tokenizer.convert_ids_to_tokens(int(label[position]))
    red, green = r"\x1b\[[0-9;]*31[0-9;]*m", r"\x1b\[[0-9;]*32[0-9;]*m"
    assert re.search(red + re.escape(wrong_pred) + r"\x1b\[0m", out), out
    assert re.search(green + re.escape(wrong_label) + r"\x1b\[0m", out), out
    right = [tokenizer.convert_ids_to_tokens(int(t)) for t in label[pred == label]]
    for token in right:  # right tokens are printed without a colour
        assert not re.search(red + re.escape(token) + r"\x1b\[0m", out)


def test_show_generated_rows_longer_and_shorter_than_the_reference(tmp_path, tokenizer):
    """Generation spills: a position only one side has is wrong, and each side is shown whole."""
    ids = lambda text: tokenizer.convert_tokens_to_ids(text.split())  # noqa: E731
    labels = [ids("a red cat </s>"), ids("blue car with a dog </s>")]
    preds = [ids("a red cat with a dog </s>"), ids("blue </s>")]
    batch = SampleBatch.from_rows(range(2), preds, labels, vocab_size=len(tokenizer), aligned=False)
    spill = write_qa_spill(tmp_path / "gen", tokenizer, batch, metrics=["text_match"])
    data = run_json("show", spill)
    longer, shorter = data["samples"]
    assert "".join(longer["prediction_tokens"]) == "a red cat with a dog </s>"
    assert longer["wrong_positions"] == [3, 4, 5, 6] and longer["scores"]["token_accuracy"] == pytest.approx(3 / 7)
    assert "".join(shorter["reference_tokens"]) == "blue car with a dog </s>"
    assert shorter["wrong_positions"] == [1, 2, 3, 4, 5] and shorter["scores"]["length"] == 6
    out = run("show", spill, "--index", "1")
    assert "5 of 6 tokens (predicted→expected): @1 '</s>'→'car' @2 '∅'→'with'" in out
    assert run_json("worst", spill, "--by", "token_f1", "-n", "1")["samples"][0]["sample_index"] == 1


# ----------------------------------------------------------------------------------------------- worst
@pytest.mark.parametrize("by", ["token_accuracy", "nll", "token_f1"])
def test_worst_json_equals_a_full_sort_of_the_plain_scores(spill_a, rows, by):
    data = run_json("worst", spill_a, "--by", by, "-n", "6")
    reference = []
    for i in range(N):
        pred, label = (x.tolist() for x in rows.row(i))
        value = reference_scores(pred, label, rows.logprob_row(i).astype(np.float64).tolist())[by]
        reference.append((value if by != "nll" else -value, i))
    expected = sorted(reference)[:6]
    assert [s["sample_index"] for s in data["samples"]] == [i for _, i in expected]
    assert [s["rank"] for s in data["samples"]] == list(range(1, 7))
    for sample, (value, _) in zip(data["samples"], expected):
        assert sample["scores"][by] == pytest.approx(value if by != "nll" else -value)


def test_worst_prints_ranked_samples_with_their_score(spill_a, rows, tokenizer):
    out = run("worst", spill_a, "--by", "token_accuracy", "-n", "2")
    first = min(range(N), key=lambda i: (np.mean(np.equal(*rows.row(i))), i))
    assert "2 worst samples by token_accuracy (lowest first)" in out
    assert f"#1  sample {first}  token_accuracy 0" in out
    assert decoded(tokenizer, rows.row(first)[1]) in out


def test_worst_by_a_score_the_spill_cannot_provide_fails_before_reading(spill_builder):
    spill = spill_builder([random_batch(np.random.default_rng(0), 8)])
    result = runner.invoke(cli.app, ["worst", str(spill), "--by", "nll"])
    assert isinstance(result.exception, ScoreError) and "keep_logprob=True" in str(result.exception)


# ----------------------------------------------------------------------------------------------- diff
def test_diff_json_finds_exactly_the_flipped_samples_and_metric_deltas(spill_a, spill_b, flips):
    right_to_wrong, wrong_to_right = flips
    data = run_json("diff", spill_a, spill_b, "--limit", "50")
    assert data["right_to_wrong"] == right_to_wrong
    assert data["wrong_to_right"] == wrong_to_right
    samples = data["samples"]
    assert samples["compared"] == N and samples["only_in_a"] == samples["only_in_b"] == 0
    assert samples["exact_match_b"] - samples["exact_match_a"] == len(wrong_to_right) - len(right_to_wrong)
    results_a = json.loads((spill_a / "results.json").read_text())["metrics"]
    results_b = json.loads((spill_b / "results.json").read_text())["metrics"]
    for name, row in data["metrics"].items():
        assert row["delta"] == pytest.approx(results_b[name] - results_a[name])
    em = data["metrics"]["sequence_exact_match"]["delta"]
    assert em == pytest.approx((len(wrong_to_right) - len(right_to_wrong)) / N)


def test_diff_prints_deltas_and_the_flipped_samples_side_by_side(spill_a, spill_b, flips, rows, tokenizer):
    right_to_wrong, wrong_to_right = flips
    out = run("diff", spill_a, spill_b, "--limit", "1", "--recompute")
    assert "sequence_exact_match" in out and "B − A" in out
    assert f"right → wrong {len(right_to_wrong)}" in out and f"wrong → right {len(wrong_to_right)}" in out
    i = right_to_wrong[0]
    assert f"sample {i}: right in A → wrong in B" in out
    assert f"sample {wrong_to_right[0]}: wrong in A → right in B" in out
    assert re.search(r"\n\s*A\s+" + re.escape(decoded(tokenizer, rows.row(i)[1])), out)  # A had it right
    first_label = tokenizer.convert_ids_to_tokens(int(rows.row(i)[1][0]))
    assert re.search(r"\n\s*B\s+" + ("purple" if first_label != "purple" else "red"), out)  # B's wrong token


def test_diff_refuses_spills_of_different_eval_sets(spill_a, tmp_path, tokenizer):
    other = qa_rows(tokenizer, N, seed=4)
    spill_c = write_qa_spill(tmp_path / "c", tokenizer, other, chunk_rows=32)
    result = runner.invoke(cli.app, ["diff", str(spill_a), str(spill_c)])
    assert isinstance(result.exception, SpillsDifferError)
    assert "not of the same eval set" in str(result.exception)


# ----------------------------------------------------------------------------------------------- export
def test_export_jsonl_decoded_with_scores_holds_every_sample(spill_a, rows, tokenizer, tmp_path):
    path = tmp_path / "out.jsonl"
    out = run("export", spill_a, "--format", "jsonl", "--decode", "--scores", "-o", path)
    assert f"exported {N} samples to {path}" in out
    records = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["sample_index"])
    assert [r["sample_index"] for r in records] == list(range(N))
    for r in records[:20]:
        pred, label = rows.row(r["sample_index"])
        assert r["pred_ids"] == pred.tolist() and r["label_ids"] == label.tolist()
        assert r["prediction"] == decoded(tokenizer, pred) and r["reference"] == decoded(tokenizer, label)
        assert r["exact_match"] == float(np.array_equal(pred, label))
        assert r["question"] == rows.columns["question"][r["sample_index"]]
    with pytest.raises(ExportError, match="already exists"):
        raise runner.invoke(cli.app, ["export", str(spill_a), "-o", str(path)]).exception


def test_export_parquet_streams_row_groups_and_keeps_the_manifest(spill_a, rows, tmp_path):
    path = tmp_path / "out.parquet"
    run("export", spill_a, "--format", "parquet", "-o", path)
    table = pq.read_table(path).sort_by("sample_index")
    assert table.num_rows == N
    assert table.column("label_ids").to_pylist() == [lab.tolist() for _, lab in rows.rows()]
    manifest = json.loads(pq.read_schema(path).metadata[b"spilleval.manifest"])
    assert manifest["dataset_length"] == N


def test_export_to_stdout_and_fixed_shape_arrays(spill_builder, tmp_path):
    batch = random_batch(np.random.default_rng(1), 5)
    batch.arrays = {"class_scores": np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)}
    spill = spill_builder([batch], arrays={"class_scores": {"shape": [2, 3], "dtype": "float32"}})
    result = runner.invoke(cli.app, ["export", str(spill), "-o", "-"])
    assert result.exit_code == 0, result.exception
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 5
    assert records[1]["class_scores"] == batch.arrays["class_scores"][1].tolist()


# ----------------------------------------------------------------------------------------------- the README query
def test_readme_arrow_query_runs_on_a_spill(spill_a, rows):
    """The duckdb / polars / pandas snippet of the README section 'Inspecting predictions', run as written."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Inspecting predictions", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code.replace("runs/eval-step-1000", str(spill_a)), "README.md", "exec"), namespace)
    expected_right = sum(np.array_equal(*r) for r in rows.rows())
    per_sample = namespace["per_sample"]  # duckdb: one row per sample
    assert len(per_sample) == N and int(per_sample["exact_match"].sum()) == expected_right
    assert namespace["wrong"]["sample_index"].to_list() == [i for i in range(N) if not np.array_equal(*rows.row(i))]
    assert int(namespace["df"]["exact_match"].sum()) == expected_right  # pandas, with array cells


# ----------------------------------------------------------------------------------------------- CLI plumbing
@pytest.mark.parametrize("command", ["show", "worst", "diff", "export", "report"])
def test_every_command_has_help(command):
    out = run(command, "--help")
    assert "Usage" in out and "--quiet" in out


def test_progress_bars_only_for_a_terminal_and_never_with_quiet(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(quiet=False) and not show_progress(quiet=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_progress(quiet=False)


# ----------------------------------------------------------------------------------------------- memory
MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from typer.testing import CliRunner
    from spilleval import cli
    from spilleval.testing import peak_rss, reset_peak_rss

    spill, out = sys.argv[1], Path(sys.argv[2])
    commands = {
        "worst": ["worst", spill, "--by", "token_f1", "-n", "20", "--json"],
        "export_jsonl": ["export", spill, "--scores", "-o", str(out / "x.jsonl")],
        "export_parquet": ["export", spill, "-f", "parquet", "-o", str(out / "x.parquet")],
    }
    runner, peaks = CliRunner(), {}
    for attempt in range(3):  # the first round loads lazy imports and caches; the least of the next two is kept
        for name, args in commands.items():
            before = reset_peak_rss()
            result = runner.invoke(cli.app, args + (["--force"] if name.startswith("export") else []))
            assert result.exit_code == 0, result.output
            if attempt:  # allocator and thread-timing noise under load only ever adds: the minimum is the cost
                peaks[name] = min(peaks.get(name, float("inf")), peak_rss() - before)
    print(json.dumps(peaks))
""")


@pytest.mark.slow
def test_worst_and_export_memory_stays_flat_as_the_spill_grows(tmp_path):
    """Peak RSS above the start of each command, for a spill 8x larger (both many chunks): flat, not 8x."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    peaks = {}
    for samples in (4_000, 32_000):
        rng = np.random.default_rng(samples)
        batch = random_batch(rng, samples, vocab_size=70_000, max_len=120)  # uint32 ids, ~480 B per sample
        spill = write_spill(tmp_path / f"s{samples}", split_batch(batch, 2_000), make_manifest(70_000),
                            chunk_rows=1_000)
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(spill), str(tmp_path)], capture_output=True,
                               text=True, timeout=300, cwd=REPO_ROOT)
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-4000:]
        peaks[samples] = json.loads(probe.stdout.strip().splitlines()[-1])
        data_bytes = int(batch.lengths.sum()) * 8
        print(f"{samples} samples ({data_bytes / 2**20:.1f} MiB of ids): peak RSS above start "
              + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peaks[samples].items()))
    for name in peaks[4_000]:
        growth = peaks[32_000][name] - peaks[4_000][name]
        assert growth < 8 * 2**20, f"{name}: peak grew by {growth / 2**20:.1f} MiB for 8x the samples"
