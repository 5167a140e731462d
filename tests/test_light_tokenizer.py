"""`show` and friends load the spill's tokenizer with the `tokenizers` library alone when that decodes exactly as
transformers does (no torch import), and print stored text without terminal control characters."""

from __future__ import annotations

import json
import shutil
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


def test_readers_of_one_tokenizer_share_what_is_learnt_of_it(spill, tokenizer, tmp_path):
    """Each `SpillReader` loads its own tokenizer object. Built from the same tokenizer.json bytes, they share one
    piece decoder (each token's text, learnt once: a one-worker compute re-learnt it on every call); a tokenizer
    with other bytes (a token added) gets its own, and each decodes as its Rust tokenizer does."""
    from spilleval.decode import _piece_decoder, batch_decoder

    first, second = (SpillReader(spill).display_tokenizer for _ in range(2))
    assert first is not second and first.fingerprint == second.fingerprint
    pieces = _piece_decoder(first.backend, first.fingerprint)
    assert pieces is not None and _piece_decoder(second.backend, second.fingerprint) is pieces
    changed = type(tokenizer).from_pretrained(str(spill / "tokenizer"))
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(str(tmp_path / "changed"))
    other = load_light_tokenizer(tmp_path / "changed")
    assert other.fingerprint != first.fingerprint
    assert _piece_decoder(other.backend, other.fingerprint) is not pieces
    rng = np.random.default_rng(3)
    for light in (first, second, other):
        ids = rng.integers(0, len(light), size=400)
        offsets = np.array([0, 3, 3, 50, 211, 400])
        rows = [ids[a:b].tolist() for a, b in zip(offsets, offsets[1:])]
        assert batch_decoder(light)(ids, offsets) == light.backend.decode_batch(rows, skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_spaces_is_left_to_transformers(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path / "plain"))
    assert load_light_tokenizer(tmp_path / "plain") is not None
    cleaning = type(tokenizer).from_pretrained(str(tmp_path / "plain"), clean_up_tokenization_spaces=True)
    cleaning.save_pretrained(str(tmp_path / "cleaning"))
    assert load_light_tokenizer(tmp_path / "cleaning") is None


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_configuration_nested_too_deep_is_read_without_a_crash(spill, tmp_path, monkeypatch, capsys, name):
    """A crafted configuration of arrays nested 100,000 deep made Python's JSON parser raise RecursionError, which
    the light loader did not expect: `compute` ended in "unexpected RecursionError" (exit 1, found by
    test_hostile_fuzz). Its parser now has a bounded depth. tokenizer_config.json is then left to transformers,
    whose load error is the spill's format error (exit 2, one line); special_tokens_map.json is ignored where it
    cannot be read, as it was when its JSON was invalid."""
    from spilleval.spill.integrity import seal

    copy = tmp_path / "spill"
    shutil.copytree(spill, copy)
    (copy / "tokenizer" / name).write_text("[" * 100_000 + "]" * 100_000)
    if (copy / "integrity.json").exists():
        seal(copy)  # as a crafted spill would carry it
    monkeypatch.setattr(sys, "argv", ["spilleval", "compute", str(copy), "--metrics", "text_match", "--workers", "1"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert "unexpected" not in err
    if name == "tokenizer_config.json":
        assert load_light_tokenizer(copy / "tokenizer") is None
        assert exited.value.code == 2 and "tokenizer" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert load_light_tokenizer(copy / "tokenizer") is not None
        assert not exited.value.code, err


def test_special_tokens_out_of_step_with_tokenizer_json_are_left_to_transformers(tokenizer, tmp_path):
    """The configuration names <image> a special token, tokenizer.json does not: transformers marks it special on
    load and drops it when skipping special tokens, the Rust tokenizer alone would keep it."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(str(tmp_path / "plain"))
    shutil.copytree(tmp_path / "plain", tmp_path / "odd")
    data = json.loads((tmp_path / "plain" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    (tmp_path / "odd" / "tokenizer.json").write_text(json.dumps(data))
    assert load_light_tokenizer(tmp_path / "plain") is not None
    assert load_light_tokenizer(tmp_path / "odd") is None
    full = AutoTokenizer.from_pretrained(str(tmp_path / "odd"))
    ids = [full.convert_tokens_to_ids("<image>"), *range(10, 14)]
    raw = Tokenizer.from_file(str(tmp_path / "odd" / "tokenizer.json"))
    assert full.decode(ids, skip_special_tokens=True) != raw.decode(ids, skip_special_tokens=True)  # the case is real


def test_a_parallel_compute_imports_torch_nowhere(spill):
    """The parent of a parallel `compute` does not load the tokenizer (its workers do, and check it), and the
    workers decode with the light tokenizer: neither imports torch or transformers (2 s each, before any work)."""
    code = textwrap.dedent(f"""
        import sys
        from spilleval.metrics import compute_from_spill
        from spilleval.metrics.pool import local_executor, shutdown

        if __name__ == "__main__":
            pool = local_executor(2)
            print(compute_from_spill({str(spill)!r}, ["text_match", "wer"], executor=pool, workers=2))
            probe = "sorted(m for m in ('torch', 'transformers') if m in __import__('sys').modules)"
            workers = {{str(r) for r in pool.map(eval, [probe] * 8)}}
            shutdown(pool)
            parent = sorted(m for m in ("torch", "transformers") if m in sys.modules)
            print("parent:", parent, "workers:", sorted(workers), file=sys.stderr)
    """)
    script = spill.parent / "parallel_imports.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "parent: [] workers: ['[]']" in done.stderr and "exact_match_accuracy" in done.stdout


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
