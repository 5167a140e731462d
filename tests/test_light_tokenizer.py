"""`show` and friends load the spill's tokenizer with the `tokenizers` library alone when that decodes exactly as
transformers does (no torch import), and print stored text without terminal control characters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from inspect_spills import qa_rows, write_qa_spill
from typer.testing import CliRunner

from spilleval import cli
from spilleval.batch import SampleBatch
from spilleval.spill import SpillReader
from spilleval.spill.light_tokenizer import LightTokenizer, load_light_tokenizer


@pytest.fixture(scope="module")
def spill(tmp_path_factory, tokenizer):
    rows = qa_rows(tokenizer, 12, seed=2)
    hostile = ["\x1b[2J\x1b[31mred\x07 text\x9b" if i % 2 else q for i, q in enumerate(rows.columns["question"])]
    rows = SampleBatch(rows.sample_index, rows.offsets, rows.pred_ids, rows.label_ids, rows.label_logprob,
                       {"question": hostile})
    return write_qa_spill(tmp_path_factory.mktemp("light") / "spill", tokenizer, rows)


def test_the_light_tokenizer_decodes_as_transformers(spill, tokenizer):
    light = SpillReader(spill).display_tokenizer
    assert isinstance(light, LightTokenizer) and len(light) == len(tokenizer)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, len(tokenizer), size=int(n)).tolist() for n in rng.integers(0, 12, size=200)]
    rows += [[i] for i in range(len(tokenizer))]  # every token alone, special and added ones included
    for skip in (True, False):
        assert light.batch_decode(rows, skip_special_tokens=skip) == tokenizer.batch_decode(
            rows, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert [light.decode(r, skip_special_tokens=skip) for r in rows[:50]] == [
            tokenizer.decode(r, skip_special_tokens=skip) for r in rows[:50]]


def test_a_tokenizer_that_cleans_up_spaces_is_left_to_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path / "plain"))
    assert load_light_tokenizer(tmp_path / "plain") is not None
    cleaning = type(tokenizer).from_pretrained(str(tmp_path / "plain"), clean_up_tokenization_spaces=True)
    cleaning.save_pretrained(str(tmp_path / "cleaning"))
    assert load_light_tokenizer(tmp_path / "cleaning") is None


def test_show_imports_neither_torch_nor_transformers(spill):
    code = textwrap.dedent(f"""
        import sys
        sys.argv = ["spilleval", "show", {str(spill)!r}, "-n", "3"]
        from spilleval.cli import main
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        heavy = sorted(m for m in ("torch", "transformers", "zarr") if m in sys.modules)
        print("heavy:", heavy, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stderr and "reference" in done.stdout


def test_stored_text_is_printed_without_control_characters(spill):
    out = CliRunner().invoke(cli.app, ["show", str(spill), "-n", "4"]).output
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "\\x1b[2J\\x1b[31mred\\x07 text\\x9b" in out
