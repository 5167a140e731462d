"""Per-sample text scores of generation spills against the reference libraries' sentence-level scores, read
through the real CLI (`export --scores`, `worst`, `report`) from spills written by the real `Evaluator` as
`GenerationRun` writes them (task "generation", ragged rows, references in a dataset column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from inspect_spills import caption_generation_rows, vqa_generation_rows, write_generation_spill
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from typer.testing import CliRunner

from spilleval import SpillReader
from spilleval.cli import app
from spilleval.metrics import compute_from_spill
from spilleval.metrics.squad import exact_match_score, f1_score

runner = CliRunner()
TEXT_SCORES = ["squad_f1", "squad_exact_match", "answer_exact_match", "sentence_bleu", "sentence_chrf", "rougeL",
               "cider"]


@pytest.fixture(scope="module")
def caption_spill(tmp_path_factory, tokenizer) -> Path:
    return write_generation_spill(tmp_path_factory.mktemp("caption") / "spill", tokenizer,
                                  caption_generation_rows(tokenizer, 60, seed=3), references_column="captions",
                                  chunk_rows=16)


@pytest.fixture(scope="module")
def vqa_spill(tmp_path_factory, tokenizer) -> Path:
    return write_generation_spill(tmp_path_factory.mktemp("vqa") / "spill", tokenizer,
                                  vqa_generation_rows(tokenizer, 30, seed=4), references_column="answers",
                                  metrics=["squad", "answer_macro_f1"])


def exported(spill: Path, out: Path) -> list[dict]:
    result = runner.invoke(app, ["export", str(spill), "-o", str(out), "--scores", "--decode", "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in out.read_text().splitlines()]


def reference_scores(preds: list[str], refs: list[list[str]]) -> dict[str, list[float]]:
    """Each sample's score by the reference library, on the whole data in memory."""
    rouge = RougeScorer(["rougeL"])
    _, cider = Cider().compute_score({i: [r.lower() for r in rs] for i, rs in enumerate(refs)},
                                     {i: [p.lower()] for i, p in enumerate(preds)})
    return {
        "squad_f1": [100 * max(f1_score(p, r) for r in rs) for p, rs in zip(preds, refs)],
        "squad_exact_match": [100.0 * max(exact_match_score(p, r) for r in rs) for p, rs in zip(preds, refs)],
        "answer_exact_match": [float(p.strip() in {r.strip() for r in rs}) for p, rs in zip(preds, refs)],
        "sentence_bleu": [sacrebleu.sentence_bleu(p, rs).score for p, rs in zip(preds, refs)],
        "sentence_chrf": [sacrebleu.sentence_chrf(p, rs).score for p, rs in zip(preds, refs)],
        "rougeL": [rouge.score_multi(rs, p)["rougeL"].fmeasure for p, rs in zip(preds, refs)],
        "cider": [float(x) for x in cider],
    }


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_per_sample_text_scores_equal_the_reference_libraries(kind, caption_spill, vqa_spill, tokenizer, tmp_path):
    spill, column = (caption_spill, "captions") if kind == "caption" else (vqa_spill, "answers")
    rows = exported(spill, tmp_path / "out.jsonl")
    assert [r["sample_index"] for r in rows] == list(range(len(rows)))
    batch = SpillReader(spill).table()
    # decoded independently of spilleval: the tokenizer on the stored ids
    preds = tokenizer.batch_decode(batch.column("pred_ids").to_pylist(), skip_special_tokens=True)
    refs = batch.column(column).to_pylist()
    assert [r["prediction"] for r in rows] == preds
    want = reference_scores(preds, refs)
    for name in TEXT_SCORES:
        got = [r[name] for r in rows]
        assert got == pytest.approx(want[name], rel=1e-12, abs=1e-12), name
    if kind == "caption":  # the data exercise every score: some right, some partly, several references
        assert 0 < np.mean(want["answer_exact_match"]) < 1 and min(len(r) for r in refs) >= 2
        assert 0 < np.mean(want["sentence_bleu"]) < 100 and np.max(want["cider"]) > 1
    # where a corpus metric shares the name, the mean of the per-sample score is that metric
    corpus = compute_from_spill(spill)
    for name in ("squad_f1", "squad_exact_match") + (("rougeL", "cider") if kind == "caption" else ()):
        assert np.mean([r[name] for r in rows]) == pytest.approx(corpus[name], rel=1e-9), name


def test_worst_ranks_generation_by_text_scores_and_refuses_position_scores(caption_spill):
    result = runner.invoke(app, ["worst", str(caption_spill), "-n", "4", "--json", "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    payload = json.loads(result.output)
    assert payload["by"] == "squad_f1"
    ranked = [s["scores"]["squad_f1"] for s in payload["samples"]]
    assert ranked == sorted(ranked) and set(payload["samples"][0]["scores"]) == set(TEXT_SCORES) | {"length"}
    by_cider = json.loads(runner.invoke(app, ["worst", str(caption_spill), "--by", "cider", "-n", "3", "--json"]).output)
    assert [s["scores"]["cider"] for s in by_cider["samples"]] == sorted(s["scores"]["cider"]
                                                                          for s in by_cider["samples"])
    for command in (["worst"], ["report", "-o", str(caption_spill.parent / "r.html")]):
        refused = runner.invoke(app, [*command, str(caption_spill), "--by", "token_accuracy"])
        assert refused.exit_code != 0 and "position by position" in str(refused.exception)
        assert "sentence_bleu" in str(refused.exception)  # the error names what to use instead


def test_report_of_a_generation_spill_plots_the_text_scores(caption_spill, tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(caption_spill), "-o", str(out), "-q", "-n", "5"])
    assert result.exit_code == 0, (result.output, result.exception)
    html = out.read_text()
    plotted = set(__import__("re").findall(r'<img alt="histogram of (\w+)"', html))
    assert plotted == set(TEXT_SCORES) | {"length"}
    assert "The 5 worst samples by squad_f1" in html and "token_accuracy" not in html
