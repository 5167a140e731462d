"""A spill may come from someone else: reading it never unpickles, never runs its code, never leaves the directory."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import tokenize
import zlib
from pathlib import Path

import _crash_worker as workload
import numpy as np
import pytest

import spilleval
from spilleval import Evaluator
from spilleval.cli import main
from spilleval.metrics import compute_from_spill
from spilleval.spill import IntegrityError, SpillFormatError, SpillReader
from spilleval.spill.integrity import seal
from spilleval.spill.manifest import SHARDS_DIR, TOKENIZER_DIR, UnsafePathError

PACKAGE = Path(spilleval.__file__).parent
UNSAFE_NAMES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "allow_pickle"}


@pytest.fixture(scope="module")
def source_spill(tmp_path_factory) -> Path:
    """A complete spill with token ids, log-probs, a string column, a zarr array and the tokenizer."""
    spill = tmp_path_factory.mktemp("safety") / "spill"
    evaluator = Evaluator(spill, workload.METRICS, tokenizer=workload.TOKENIZER, dataset_length=24, chunk_rows=5)
    for start in range(0, 24, 6):
        rows = np.arange(start, start + 6)
        logits, labels, columns, arrays = workload.batch(rows)
        evaluator.update(logits, labels, sample_index=rows, columns=columns, arrays=arrays)
    evaluator.finalize()
    return spill


@pytest.fixture
def spill(tmp_path, source_spill) -> Path:
    target = tmp_path / "spill"
    shutil.copytree(source_spill, target)
    return target


def chunk_dir(spill: Path, seq: int = 0) -> Path:
    return spill / SHARDS_DIR / "rank-00000" / f"chunk-{seq:06d}"


# ----------------------------------------------------------------------------------------------- no pickle
def python_tokens(path: Path) -> list[str]:
    """NAME and OP tokens of a source file (comments and strings excluded)."""
    with open(path, "rb") as f:
        return [t.string for t in tokenize.tokenize(f.readline) if t.type in (tokenize.NAME, tokenize.OP)]


def test_package_source_has_no_pickle_torch_load_or_remote_code():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tokens = python_tokens(path)
        for i, token in enumerate(tokens):
            if token in UNSAFE_NAMES:
                offences.append(f"{path.name}: {token}")
            if tokens[i : i + 3] in (["torch", ".", "load"], ["np", ".", "load"], ["numpy", ".", "load"]):
                offences.append(f"{path.name}: {''.join(tokens[i : i + 3])}")
            if tokens[i : i + 3] == ["trust_remote_code", "=", "True"]:
                offences.append(f"{path.name}: trust_remote_code=True")
    assert not offences, offences


def test_reading_and_computing_never_unpickles(spill, monkeypatch, capsys):
    compute_from_spill(spill)  # first, so that lazy imports of libraries happen outside the check
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("pickle used while reading a spill")

    import _pickle

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    reader = SpillReader(spill)
    for batch in reader.iter_batches(7, decode=True):  # ids, log-probs, columns, zarr arrays, text
        assert batch.arrays["score"].shape == (len(batch), 3) and batch.pred_text is not None
    reader.get(5), reader.table(3, 9), reader.completeness()
    results = compute_from_spill(spill)
    assert results == json.loads((spill / "results.json").read_text())["metrics"]
    monkeypatch.setattr(sys, "argv", ["spilleval", "inspect", str(spill)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None)
    assert calls == []


# ----------------------------------------------------------------------------------------------- no remote code
def test_tokenizer_that_asks_for_remote_code_is_refused_not_run(spill, tmp_path):
    tokenizer_dir = spill / TOKENIZER_DIR
    marker = tmp_path / "code-ran"
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tokenizer_dir / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    with pytest.raises(IntegrityError, match="evil.py is not covered by"):  # changed after the spill was sealed
        compute_from_spill(spill, ["text_match"])
    seal(spill)  # as whoever crafted the spill would: only the remote-code refusal is left to stop it
    with pytest.raises(SpillFormatError, match="trust_remote_code=False: it never runs code"):
        compute_from_spill(spill, ["text_match"])
    assert not marker.exists()
    assert compute_from_spill(spill, ["token_accuracy"])  # metrics on ids need no tokenizer at all


# ----------------------------------------------------------------------------------------------- paths stay inside
def add_file_entry(chunk: Path, name: str, data: bytes) -> None:
    """Add `name` to the chunk's record with the right length and CRC: only the path check can refuse it."""
    record_path = chunk / "chunk.json"
    record = json.loads(record_path.read_text())
    record["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "dotdot-inside-arrays"])
def test_file_names_in_a_chunk_record_cannot_leave_the_directory(spill, tmp_path, kind):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    chunk = chunk_dir(spill)
    name = {
        "dotdot": "../../../../secret.bin",
        "absolute": str(secret),
        "dotdot-inside-arrays": "arrays.zarr/../../../../../secret.bin",
    }[kind]
    assert (chunk / name).resolve() == secret.resolve()
    add_file_entry(chunk, name, secret.read_bytes())
    with pytest.raises(UnsafePathError, match="points outside"):
        for _ in SpillReader(spill).iter_chunks():
            pass


def test_a_symlink_out_of_the_spill_is_refused(spill, tmp_path):
    chunk = chunk_dir(spill, 1)
    outside = tmp_path / "outside.arrow"
    shutil.copyfile(chunk / "tokens.arrow", outside)  # same bytes, same CRC: only the path check can refuse it
    (chunk / "tokens.arrow").unlink()
    (chunk / "tokens.arrow").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="tokens.arrow"):
        for _ in SpillReader(spill).iter_chunks():
            pass


def test_a_chunk_directory_symlinked_elsewhere_is_refused(spill, tmp_path):
    chunk = chunk_dir(spill, 2)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(chunk, elsewhere)
    chunk.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="chunk-000002"):
        SpillReader(spill)


def test_zarr_reads_only_the_verified_files(spill, tmp_path):
    """An array added to arrays.zarr behind the record's back is not read: zarr decodes the verified bytes only."""
    chunk = chunk_dir(spill)
    stray = chunk / "arrays.zarr" / "stray"
    shutil.copytree(chunk / "arrays.zarr" / "score", stray)
    batch = next(SpillReader(spill).iter_chunks())
    assert sorted(batch.arrays) == ["score"]
