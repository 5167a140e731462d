"""Per-sample text scores of generation spills against the reference libraries' sentence-level scores, read
through the real CLI (`export --scores`, `worst`, `report`) from spills written by the real `Evaluator` as
`GenerationRun` writes them (task "generation", ragged rows, references in a dataset column)."""

from __future__ import annotations

import json
import re
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from inspect_spills import caption_generation_rows, vqa_generation_rows, write_generation_spill
from PIL import Image
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from typer.testing import CliRunner

from spilleval import SpillReader
from spilleval.cli import app
from spilleval.metrics import compute_from_spill
from spilleval.metrics.squad import exact_match_score, f1_score
from spilleval.report.text_scores import answer_matches

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
    by_cider = runner.invoke(app, ["worst", str(caption_spill), "--by", "cider", "-n", "3", "--json"]).output
    ciders = [s["scores"]["cider"] for s in json.loads(by_cider)["samples"]]
    assert ciders == sorted(ciders) and len(ciders) == 3
    for command in (["worst"], ["report", "-o", str(caption_spill.parent / "r.html")]):
        refused = runner.invoke(app, [*command, str(caption_spill), "--by", "token_accuracy"])
        assert refused.exit_code != 0 and "position by position" in str(refused.exception)
        assert "sentence_bleu" in str(refused.exception)  # the error names what to use instead


def test_a_generation_spill_without_tokenizer_ranks_by_the_ids(tokenizer, tmp_path):
    """Nothing to decode with: the scores of the ids that do not compare positions, ranked by token_f1."""
    spill = write_generation_spill(tmp_path / "spill", tokenizer, vqa_generation_rows(tokenizer, 12, seed=1),
                                   references_column="answers", metrics=[], store_tokenizer=False)
    result = runner.invoke(app, ["worst", str(spill), "-n", "2", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    payload = json.loads(result.output)
    assert payload["by"] == "token_f1" and set(payload["samples"][0]["scores"]) == {"exact_match", "token_f1",
                                                                                       "length"}
    refused = runner.invoke(app, ["worst", str(spill), "--by", "sentence_bleu"])
    assert refused.exit_code != 0 and "no tokenizer/ directory" in str(refused.exception)


def test_report_of_a_generation_spill_plots_the_text_scores(caption_spill, tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(caption_spill), "-o", str(out), "-q", "-n", "5"])
    assert result.exit_code == 0, (result.output, result.exception)
    html = out.read_text()
    plotted = set(re.findall(r'<img alt="histogram of (\w+)"', html))
    assert plotted == set(TEXT_SCORES) | {"length"}
    assert "The 5 worst samples by squad_f1" in html and "token_accuracy" not in html


def chromium_dom_and_screenshot(page: Path, screenshot: Path, height: int) -> str:
    """The DOM Chromium builds from the page, and a screenshot of it (headless, offline)."""
    from test_report import CHROMIUM_FLAGS, chromium_binary

    chromium = chromium_binary()
    profile = screenshot.parent / "profile"
    url = page.resolve().as_uri()
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
                    f"--window-size=1280,{height}", url], capture_output=True, timeout=90, check=True)
    return dom


def rendered_samples(dom: str) -> dict[int, dict]:
    """Per shown sample: its question (if any), prediction, references and the match marks, read from the DOM."""
    out = {}
    for index, body in re.findall(r'<div class="sample" id="sample-(\d+)">(.*?)</dl>', dom, flags=re.S):
        question = re.search(r"<dt>question</dt><dd>(.*?)</dd>", body, flags=re.S)
        prediction = re.search(r'<dt>prediction</dt><dd class="gen">(.*?)</dd>', body, flags=re.S)
        items = re.findall(r"<li( class=\"matched\")?>(.*?)(?: <span class=\"match\">(.*?)</span>)?</li>", body,
                           flags=re.S)
        out[int(index)] = {"question": question and unescape(question.group(1)),
                           "prediction": prediction and unescape(prediction.group(1)),
                           "references": [unescape(text) for _, text, _ in items],
                           "marks": [mark for _, _, mark in items]}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_generation_report_shows_text_references_and_matches_in_chromium(kind, caption_spill, vqa_spill, tokenizer,
                                                                         tmp_path):
    """Rendered by Chromium: each worst sample shows the generated text, every reference of the item (the VQA view
    also the question) and which references the prediction matches; the screenshot is docs/report-<kind>.png."""
    spill, column, n = (caption_spill, "captions", 4) if kind == "caption" else (vqa_spill, "answers", 12)
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(spill), "-o", str(page), "-q", "-n", str(n)])
    assert result.exit_code == 0, (result.output, result.exception)
    screenshot = tmp_path / f"report-{kind}.png"
    samples = rendered_samples(chromium_dom_and_screenshot(page, screenshot, 3400))
    assert len(samples) == n
    table = SpillReader(spill).table().to_pylist()
    matched_any = 0
    for index, shown in samples.items():
        row = table[index]
        assert shown["prediction"] == tokenizer.decode(row["pred_ids"], skip_special_tokens=True)
        assert shown["references"] == row[column]  # every reference, in order
        want = ["✓ matches" if a else "✓ matches after normalisation" if exact_match_score(shown["prediction"], r)
                else "" for r, a in zip(row[column], answer_matches(shown["prediction"], row[column]))]
        assert shown["marks"] == want
        matched_any += any(want)
        assert shown["question"] == (row["question"] if kind == "vqa" else None)
    if kind == "vqa":  # the page shows matched and unmatched samples
        assert 0 < matched_any < n
    else:  # the worst captions: several references each, none matched
        assert min(len(s["references"]) for s in samples.values()) >= 2 and matched_any == 0
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert image.shape[:2] == (3400, 1280) and (image.std(axis=(0, 1)) > 10).all()  # painted, not blank
    print(f"screenshot: {screenshot}")
