"""`spilleval report`: one self-contained HTML page, checked as text and rendered in real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from conftest import random_batch
from inspect_spills import qa_rows, write_qa_spill
from PIL import Image
from typer.testing import CliRunner

from spilleval import cli
from spilleval.metrics import compute_from_spill
from spilleval.report.figures import BAR_COLOUR

runner = CliRunner()
SCORES_PLOTTED = {"token_accuracy", "exact_match", "token_f1", "nll", "length"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def write_report(spill: Path, out: Path, *args: str) -> str:
    result = runner.invoke(cli.app, ["report", str(spill), "-o", str(out), "--quiet", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qa_spill(tmp_path_factory, tokenizer) -> Path:
    return write_qa_spill(tmp_path_factory.mktemp("qa") / "spill", tokenizer, qa_rows(tokenizer, 240, seed=5),
                          chunk_rows=64)


@pytest.fixture(scope="module")
def report_file(qa_spill, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(qa_spill, path, "-n", "12")
    return path


def test_report_is_one_self_contained_file(report_file, qa_spill):
    html = report_file.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "the page must not load anything"
    assert "<script" not in html and "<link" not in html
    images = re.findall(r'<img alt="histogram of (\w+)" src="data:image/png;base64,', html)
    assert set(images) == SCORES_PLOTTED
    results = json.loads((qa_spill / "results.json").read_text())["metrics"]
    for name, value in results.items():
        shown = f"{value:.6f}" if isinstance(value, float) else str(value)
        assert re.search(rf'<td class="name">{name}</td><td class="num">{re.escape(shown)}</td>', html), name
    assert html.count('<div class="sample" id="sample-') == 12
    assert '"dataset_length": 240' in unescape(html)  # the manifest


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_file, tmp_path):
    """Chromium loads the page offline: the DOM has the metrics table, the plots and the worst samples, and
    the screenshot shows the histogram bars (the inline PNGs decoded and were painted)."""
    chromium = chromium_binary()
    profile = tmp_path / "profile"
    url = report_file.resolve().as_uri()
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    metrics_table = dom.split('<table id="metrics">')[1].split("</table>")[0]
    rows = re.findall(r'<tr><td class="name">(\w+)</td><td class="num">', metrics_table)
    assert {"token_accuracy", "sequence_exact_match", "nll", "exact_match_accuracy"} <= set(rows)
    assert set(re.findall(r'<img alt="histogram of (\w+)" src="data:image/png;base64,', dom)) == SCORES_PLOTTED
    assert dom.count('class="tok bad"') >= 12 and "The 12 worst samples by token_accuracy" in dom

    screenshot = tmp_path / "report.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
                    "--window-size=1280,2000", url], capture_output=True, timeout=90, check=True)
    image = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert image.shape[:2] == (2000, 1280)
    bar = np.array([int(BAR_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    bar_pixels = int((np.abs(image - bar).sum(axis=2) < 30).sum())
    assert bar_pixels > 5_000, f"the histograms were not painted ({bar_pixels} bar-coloured pixels)"
    print(f"screenshot: {screenshot} ({bar_pixels} bar pixels)")


def test_report_of_a_bare_spill_recomputes_metrics_and_escapes_dataset_text(spill_builder, tmp_path):
    """No tokenizer, no log-probs, no results.json: metrics are recomputed, tokens shown as ids, text escaped."""
    batch = random_batch(np.random.default_rng(2), 30, vocab_size=50)
    batch.columns = {"question": ["<script>alert(1)</script> & more"] * 30}
    spill = spill_builder([batch], vocab_size=50, metrics=["token_accuracy"], chunk_rows=8)
    html = write_report(spill, tmp_path / "bare.html", "--by", "length", "-n", "3")
    accuracy = compute_from_spill(spill)["token_accuracy"]
    assert f'<td class="name">token_accuracy</td><td class="num">{accuracy:.6f}</td>' in html
    assert "recomputed from the spill" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html and "<script>alert" not in html
    assert set(re.findall(r'alt="histogram of (\w+)"', html)) == SCORES_PLOTTED - {"nll"}
    longest = int(batch.lengths.max())
    assert f"length <b>{longest}</b>" in html


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed, but CI must render the report: .ci/run installs Debian's chromium")
    pytest.skip("chromium is not installed here (apt-get install chromium); the browser rendering is not tested")
