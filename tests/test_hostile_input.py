"""A spill directory may come from anyone: the attacks and accidents of issue 13, each one by name.

Declared sizes are checked before anything is allocated (a decompression bomb in tokens.arrow, a zarr.json of
10^9 rows, a manifest of 3·10^9 or 3·10^10 samples), malformed JSON files are named errors, the metadata files are
protected by the seal (integrity.json), and `inspect` shows what is intact in a damaged spill. Memory is measured
in a real process per command (`_cli_worker.py`, peak RSS from `os.wait4`). The broad search over every file is
`test_hostile_fuzz.py`.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import _crash_worker as workload
import numpy as np
import pyarrow as pa
import pytest
from _cli_worker import CliWorker
from hypothesis import given, settings
from hypothesis import strategies as st

from spilleval import Evaluator
from spilleval.batch import SampleBatch
from spilleval.cli import main
from spilleval.metrics import compute_from_spill
from spilleval.sampleset import SampleSet
from spilleval.spill import (
    ChunkCorruptError,
    ChunkRecordError,
    IncompleteSpillError,
    IntegrityError,
    ShardRecordError,
    SpillFormatError,
    SpillReader,
)
from spilleval.spill.chunk import batch_to_table
from spilleval.spill.integrity import INTEGRITY_NAME, seal
from spilleval.spill.ipc_layout import MAX_METADATA_BYTES, FileBytes, IpcLayoutError, read_ipc_layout
from spilleval.spill.manifest import MANIFEST_NAME, RESULTS_NAME, SHARD_DONE, SHARDS_DIR, UnsafePathError

N = 24
SMALL_RSS_MB = 700  # a command on these spills peaks near 300 MB


# ----------------------------------------------------------------------------------------------- fixtures
def build(path: Path, indices: np.ndarray, *, finish: bool = True) -> Path:
    evaluator = Evaluator(path, workload.METRICS, tokenizer=workload.TOKENIZER, dataset_length=N, chunk_rows=5)
    for start in range(0, len(indices), 6):
        rows = indices[start : start + 6]
        logits, labels, columns, arrays = workload.batch(rows)
        evaluator.update(logits, labels, sample_index=rows, columns=columns, arrays=arrays)
    if finish:
        evaluator.finalize()
    else:
        evaluator.abort()
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("hostile") / "spill", np.arange(N))


@pytest.fixture
def spill(tmp_path, source) -> Path:
    target = tmp_path / "spill"
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> CliWorker:
    server = CliWorker(tmp_path_factory.mktemp("worker"))
    yield server
    server.close()


def chunk(spill: Path, seq: int) -> Path:
    return spill / SHARDS_DIR / "rank-00000" / f"chunk-{seq:06d}"


def cli(monkeypatch, capsys, *args: Any) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["spilleval", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def rewrite_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def recrc(chunk_dir: Path, **fields: Any) -> None:
    """Make chunk.json agree with the chunk's files again (lengths, CRC-32s), as a crafted spill would."""
    record = json.loads((chunk_dir / "chunk.json").read_text())
    for name in record["files"]:
        data = (chunk_dir / name).read_bytes()
        record["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    record.update(fields)
    (chunk_dir / "chunk.json").write_text(json.dumps(record))


def reseal(spill: Path) -> None:
    """Make shard.json agree with the chunk records and recompute the seal: only the reader's checks are left."""
    shard = spill / SHARDS_DIR / "rank-00000"
    records = [json.loads(p.read_text()) for p in sorted(shard.glob("chunk-*/chunk.json"))]
    done = {"rank": 0, "chunks": len(records), "rows": sum(r["rows"] for r in records),
            "tokens": sum(r["tokens"] for r in records)}
    (shard / SHARD_DONE).write_text(json.dumps(done))
    seal(spill)


def assert_small(result: dict[str, Any]) -> None:
    assert result["maxrss_kb"] < SMALL_RSS_MB * 1024, (result["argv"], result["maxrss_kb"] // 1024, result["stderr"])


# ----------------------------------------------------------------------------------------------- declared sizes
@pytest.mark.slow
def test_a_decompression_bomb_in_tokens_arrow_is_refused_before_decoding(spill, worker, tmp_path):
    """A 60 KB tokens.arrow whose zstd frames expand to 1 GB (2.5·10^8 ids a column), with a consistent record,
    shard record and seal: compute and export stop at the declared sizes, in a few hundred MB."""
    ids = 250_000_000
    zeros = np.zeros(ids, dtype=np.uint16)  # calloc'd: compressing it reads the shared zero page, no memory
    bomb = SampleBatch(np.array([0]), np.array([0, ids]), zeros, zeros)
    sink = pa.BufferOutputStream()
    table = batch_to_table(bomb)
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    assert len(data) < 200_000 and read_ipc_layout(data).decoded_bytes > 10**9
    target = chunk(spill, 0)
    shutil.rmtree(target / "arrays.zarr")
    (target / "tokens.arrow").write_bytes(data)
    record = json.loads((target / "chunk.json").read_text())
    record["files"] = {"tokens.arrow": {"bytes": len(data), "crc32": zlib.crc32(data)}}
    record.update(rows=1, tokens=ids, min_index=0, max_index=0)
    (target / "chunk.json").write_text(json.dumps(record))
    reseal(spill)
    with pytest.raises(ChunkCorruptError, match=r"chunk-000000.*declare \d[\d,]* bytes once decoded"):
        compute_from_spill(spill)
    for argv in (["compute", spill], ["export", spill, "-o", tmp_path / "out.jsonl"], ["inspect", spill],
                 ["worst", spill]):
        result = worker.run(*argv)
        shown = result["stdout"] if argv[0] == "inspect" else one_error_line(result["stderr"])
        assert result["exit_code"] == 2 and "decompression bomb" in shown, result
        assert_small(result)


@pytest.mark.slow
def test_a_zarr_json_declaring_a_billion_rows_is_refused(spill, worker):
    meta_path = chunk(spill, 1) / "arrays.zarr" / "score" / "zarr.json"
    rewrite_json(meta_path, lambda m: {**m, "shape": [10**9, 3]})
    recrc(chunk(spill, 1))
    with pytest.raises(ChunkCorruptError, match=r"arrays.zarr/score declares 1000000000 rows; the chunk has 5"):
        list(SpillReader(spill).iter_chunks())
    result = worker.run("show", spill, "--index", "7")  # reads sample 7 with its arrays
    assert result["exit_code"] == 2 and "declares 1000000000 rows" in one_error_line(result["stderr"])
    assert_small(result)


@pytest.mark.slow
def test_a_zstd_frame_declaring_gigabytes_in_a_zarr_chunk_is_refused(spill):
    path = next(p for p in (chunk(spill, 0) / "arrays.zarr" / "score").rglob("*") if p.is_file() and
                p.name != "zarr.json")
    data = bytearray(path.read_bytes())
    data[4] = 0xE0  # frame header descriptor: single segment, an 8-byte content size right after it
    data[5:13] = (8 * 10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    recrc(chunk(spill, 0))
    with pytest.raises(ChunkCorruptError, match="declares 8000000000 bytes; a chunk of this array has 60"):
        SpillReader(spill).get(0)


@pytest.mark.slow
@pytest.mark.parametrize("samples", [3 * 10**9, 3 * 10**10])
def test_a_manifest_claiming_billions_of_samples_costs_nothing(spill, worker, samples):
    rewrite_json(spill / MANIFEST_NAME, lambda m: {**m, "dataset_length": samples})
    reseal(spill)
    completeness = SpillReader(spill).completeness()
    assert (completeness.committed, completeness.missing_count, completeness.missing) == (N, samples - N,
                                                                                          [(N, samples)])
    for argv in (["inspect", spill, "--json"], ["compute", spill], ["diff", spill, spill]):
        result = worker.run(*argv)
        assert result["exit_code"] == 0 and result["seconds"] < 20, result
        assert_small(result)
    info = json.loads(worker.run("inspect", spill, "--json")["stdout"])
    assert (info["samples_expected"], info["missing"]) == (samples, samples - N)


def test_metric_parameters_from_a_manifest_are_bounded(spill, monkeypatch, capsys):
    for params, problem in (({"name": "ece", "params": {"n_bins": 10**9}}, "parameter n_bins is invalid"),
                            ({"name": "answer_macro_f1", "params": {"batch_size": 10**12}}, "batch_size is invalid"),
                            ({"name": "f1", "params": {"labels": [str(i) for i in range(100_000)]}},
                             "would keep a state"),
                            ({"name": "distinct_n", "params": {"orders": "12"}}, "orders is invalid"),
                            ({"name": "cider", "params": {"n": 10**6}}, "parameter n is invalid")):
        rewrite_json(spill / MANIFEST_NAME, lambda m, p=params: {**m, "metrics": [p]})
        reseal(spill)
        code, _, err = cli(monkeypatch, capsys, "compute", spill)
        assert code == 2 and problem in one_error_line(err), err


# ----------------------------------------------------------------------------------------------- malformed JSON
MANIFEST_DAMAGE = {
    "a list": (lambda m: [m], "is not a JSON object"),
    "a string vocab size": (lambda m: {**m, "vocab_size": "61"}, "vocab_size input should be a valid integer"),
    "a negative dataset length": (lambda m: {**m, "dataset_length": -5}, "dataset_length input should be greater"),
    "a float world size": (lambda m: {**m, "world_size": 1.0}, "world_size input should be a valid integer"),
    "metrics as a dict": (lambda m: {**m, "metrics": {"name": "nll"}}, "metrics input should be a valid array"),
    "an unknown status": (lambda m: {**m, "status": "done"}, "status input should be 'writing', 'complete' or"),
    "a missing key": (lambda m: {k: v for k, v in m.items() if k != "task"}, "the required key 'task' is missing"),
    "a flipped bit in a key": (lambda m: {("mftrics" if k == "metrics" else k): v for k, v in m.items()},
                               "unknown key 'mftrics'"),
    "deep nesting": (lambda m: {**m, "extra": "DEEP"}, "recursion limit exceeded"),
    "a dtype that does not fit the vocabulary": (lambda m: {**m, "id_dtype": "uint32"}, "id_dtype uint32 does not"),
    "a newer schema": (lambda m: {**m, "schema_version": 99}, "newer than this spilleval understands"),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_a_malformed_manifest_is_one_named_error_for_every_command(spill, tmp_path, monkeypatch, capsys, damage):
    change, message = MANIFEST_DAMAGE[damage]
    text = json.dumps(change(json.loads((spill / MANIFEST_NAME).read_text())))
    (spill / MANIFEST_NAME).write_text(text.replace('"DEEP"', "[" * 50_000 + "]" * 50_000))
    seal(spill)  # the seal recomputed: only the schema can refuse it
    commands = [["compute", spill], ["inspect", spill], ["show", spill], ["worst", spill], ["diff", spill, spill],
                ["export", spill, "-o", tmp_path / "e.jsonl"], ["report", spill, "-o", tmp_path / "r.html"]]
    for argv in commands:
        code, out, err = cli(monkeypatch, capsys, *argv)
        line = one_error_line(err)
        shown = out if argv[0] == "inspect" else line  # inspect lists the problems, then says it is damaged
        assert code == 2 and "manifest.json" in shown and message in shown, (argv, out, err)


def test_the_manifest_is_checked_against_the_seal(spill, monkeypatch, capsys):
    rewrite_json(spill / MANIFEST_NAME, lambda m: {**m, "vocab_size": m["vocab_size"] + 1})  # valid, but not sealed
    with pytest.raises(IntegrityError, match="manifest.json does not match its SHA-256 in integrity.json"):
        SpillReader(spill)
    code, _, err = cli(monkeypatch, capsys, "compute", spill)
    assert code == 2 and "restore manifest.json from a copy of the spill" in one_error_line(err)


@pytest.mark.parametrize("damage", ["a list", "a wrong count", "an extra key"])
def test_a_bad_shard_record_is_named(spill, damage):
    path = spill / SHARDS_DIR / "rank-00000" / SHARD_DONE
    change = {"a list": lambda d: [d], "a wrong count": lambda d: {**d, "rows": d["rows"] + 1},
              "an extra key": lambda d: {**d, "chunks_": 1}}[damage]
    rewrite_json(path, change)
    seal(spill)
    with pytest.raises(ShardRecordError, match="rank-00000/shard.json"):
        SpillReader(spill)


@pytest.mark.parametrize("damage", ["rows", "tokens", "min_index", "a negative seq", "a string crc"])
def test_a_chunk_record_that_disagrees_with_its_files_is_named(spill, damage):
    target = chunk(spill, 1)
    record = json.loads((target / "chunk.json").read_text())
    if damage == "a negative seq":
        record["seq"] = -1
    elif damage == "a string crc":
        record["files"]["tokens.arrow"]["crc32"] = "0"
    else:
        record[damage] += 1
    (target / "chunk.json").write_text(json.dumps(record))
    reseal(spill)  # the shard record agrees with the chunk records: only the chunk's own files can disagree
    error = ChunkRecordError if damage in ("a negative seq", "a string crc") else ChunkCorruptError
    with pytest.raises(error, match="chunk-000001"):
        list(SpillReader(spill, allow_partial=True).iter_chunks())


def test_a_results_json_that_is_not_an_object_of_metrics_is_named(spill, monkeypatch, capsys):
    (spill / RESULTS_NAME).write_text("[1, 2]")
    seal(spill)
    code, out, err = cli(monkeypatch, capsys, "inspect", spill)
    assert code == 2 and "results.json is not a valid results record" in out


# ----------------------------------------------------------------------------------------------- the seal
def test_a_changed_byte_in_results_json_is_never_shown_as_the_runs_result(spill, tmp_path, monkeypatch, capsys):
    original = json.loads((spill / RESULTS_NAME).read_text())["metrics"]
    text = (spill / RESULTS_NAME).read_text()
    key = "token_accuracy"
    at = text.index('"' + key) + len(key) + 6  # a digit of its value
    changed = text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1 :]
    (spill / RESULTS_NAME).write_text(changed)
    assert json.loads(changed)["metrics"][key] != original[key]
    code, out, _ = cli(monkeypatch, capsys, "diff", spill, spill, "--json")
    result = json.loads(out)
    assert code == 0 and result["metrics_source"]["a"] == "recomputed (results.json failed its integrity check)"
    assert result["metrics"][key]["a"] == original[key]
    code, _, _ = cli(monkeypatch, capsys, "report", spill, "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert code == 0 and "failed its integrity check" in page and f"{original[key]:.6f}" in page
    code, out, err = cli(monkeypatch, capsys, "inspect", spill)
    assert code == 2 and "results.json does not match its SHA-256" in out and "damaged" in one_error_line(err)


def test_a_file_added_to_a_sealed_tokenizer_is_refused(spill):
    (spill / "tokenizer" / "added_tokens.json").write_text('{"<evil>": 3}')
    with pytest.raises(IntegrityError, match="added_tokens.json is not covered by"):
        compute_from_spill(spill, ["text_match"])
    assert compute_from_spill(spill, ["token_accuracy"])  # ids alone need no tokenizer


def test_a_link_in_the_tokenizer_directory_is_refused(tmp_path):
    spill = tmp_path / "spill"
    build(spill, np.arange(N), finish=False)
    (spill / "tokenizer" / "vocab.txt").symlink_to("/dev/zero")
    with pytest.raises(SpillFormatError, match="vocab.txt is not a regular file"):
        compute_from_spill(spill, ["text_match"], allow_partial=True)


def test_a_spill_marked_complete_without_its_seal_reads_as_partial(spill, monkeypatch, capsys):
    results = json.loads((spill / RESULTS_NAME).read_text())["metrics"]
    (spill / INTEGRITY_NAME).unlink()  # the run stopped between marking the spill complete and sealing it
    with pytest.raises(IncompleteSpillError, match="integrity.json is missing: the run stopped while finishing"):
        SpillReader(spill)
    code, out, _ = cli(monkeypatch, capsys, "compute", spill, "--allow-partial", "--json")
    assert code == 0 and json.loads(out)["metrics"] == results
    code, out, _ = cli(monkeypatch, capsys, "inspect", spill)
    assert code == 0 and "integrity.json is missing" in out
    evaluator = Evaluator(spill, workload.METRICS, tokenizer=workload.TOKENIZER, dataset_length=N, chunk_rows=5,
                          resume=True)
    assert evaluator.finalize() == results  # the advertised recovery: resume finishes and seals it again
    assert SpillReader(spill).results() == results


@pytest.mark.parametrize("damaged", ["shard.json", "integrity.json"])
def test_the_advertised_recovery_from_damaged_metadata_works(spill, damaged):
    results = json.loads((spill / RESULTS_NAME).read_text())["metrics"]
    path = spill / SHARDS_DIR / "rank-00000" / SHARD_DONE if damaged == "shard.json" else spill / INTEGRITY_NAME
    path.write_text(path.read_text().replace("1", "2", 1))
    with pytest.raises(IntegrityError) as error:  # a changed digit: the file, or the seal, no longer matches
        SpillReader(spill)
    assert ("delete that shard.json" if damaged == "shard.json" else "delete integrity.json") in str(error.value)
    path.unlink()
    evaluator = Evaluator(spill, workload.METRICS, tokenizer=workload.TOKENIZER, dataset_length=N, chunk_rows=5,
                          resume=True)
    assert evaluator.finalize() == results and SpillReader(spill).results() == results


def test_a_partial_spill_stays_readable_and_inspectable(tmp_path, monkeypatch, capsys):
    spill = build(tmp_path / "spill", np.arange(17), finish=False)
    assert not (spill / INTEGRITY_NAME).exists()
    code, out, _ = cli(monkeypatch, capsys, "compute", spill, "--allow-partial")
    assert code == 0 and "PARTIAL: computed on 17 of 24 samples" in out
    code, out, _ = cli(monkeypatch, capsys, "inspect", spill, "--json")
    info = json.loads(out)
    assert code == 0 and (info["samples_committed"], info["complete"], info["problems"]) == (17, False, [])


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_shows_what_is_intact_in_a_damaged_spill_and_how_to_recover(spill, monkeypatch, capsys):
    tokens = chunk(spill, 2) / "tokens.arrow"
    data = bytearray(tokens.read_bytes())
    data[len(data) // 2] ^= 0x10
    tokens.write_bytes(bytes(data))
    rewrite_json(chunk(spill, 4) / "chunk.json", lambda r: {**r, "files": {**r["files"], "../../../x": r["files"][
        "tokens.arrow"]}})
    code, out, err = cli(monkeypatch, capsys, "inspect", spill, "--json")
    info = json.loads(out)
    assert code == 2 and "2 problem(s)" in one_error_line(err)
    assert (info["chunks"], info["chunks_damaged"], info["samples_committed"]) == (3, 2, 15)
    problems = " ".join(info["problems"])
    assert "chunk-000002" in problems and "fails its CRC-32 check" in problems and "resume" in problems
    assert "unsafe path '../../../x'" in problems
    code, out, _ = cli(monkeypatch, capsys, "inspect", spill)
    assert code == 2 and "DAMAGED" in out and "3 intact, 2 damaged" in out and "delete this chunk directory" in out


def test_inspect_survives_an_unreadable_manifest(spill, monkeypatch, capsys):
    (spill / MANIFEST_NAME).write_text("{")
    code, out, err = cli(monkeypatch, capsys, "inspect", spill, "--json")
    info = json.loads(out)
    assert code == 2 and info["manifest"] is None and info["samples_committed"] == N
    assert any("manifest.json is not valid JSON" in p for p in info["problems"])


def test_unsafe_names_in_a_chunk_record_are_refused_when_the_record_is_read(spill):
    for name in ("../x", "/etc/passwd", "arrays.zarr/../../x", "tokens.arrow/../../x", "arrays.zarr", "other.bin"):
        rewrite_json(chunk(spill, 0) / "chunk.json", lambda r, n=name: {**r, "files": {**r["files"], n: {
            "bytes": 1, "crc32": 0}}})
        with pytest.raises(UnsafePathError, match="unsafe path"):
            SpillReader(spill, allow_partial=True)
        rewrite_json(chunk(spill, 0) / "chunk.json",
                     lambda r, n=name: {**r, "files": {k: v for k, v in r["files"].items() if k != n}})


# ----------------------------------------------------------------------------------------------- building blocks
@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 300), max_size=40), max_size=6),
       stop=st.integers(0, 400), probe=st.lists(st.integers(-3, 400), max_size=30))
def test_sample_set_equals_a_python_set(batches, stop, probe):
    samples, reference = SampleSet(), set()
    for batch in batches:
        index = np.array(batch, dtype=np.int64)
        keep = samples.first_occurrences(index)
        expected = [i not in reference and i not in batch[:k] for k, i in enumerate(batch)]
        assert (np.ones(len(batch), bool) if keep is None else keep).tolist() == expected
        reference.update(batch)
    assert len(samples) == len(reference) and samples.to_numpy().tolist() == sorted(reference)
    assert samples.contains(np.array(probe, dtype=np.int64)).tolist() == [p in reference for p in probe]
    missing = [i for i in range(stop) if i not in reference]
    ranges = samples.missing_ranges(stop, limit=1000)
    assert [i for a, b in ranges for i in range(a, b)] == missing
    assert all(b < c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # maximal ranges
    assert samples.count_range(0, stop) == stop - len(missing)
    assert samples.dense(0, stop).tolist() == [i in reference for i in range(stop)]


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
def test_ipc_layout_reads_what_pyarrow_decodes(compression):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, size=11)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, 60000, size=offsets[-1]).astype(np.uint16)
    batch = SampleBatch(np.arange(11), offsets, ids, ids[::-1].copy(), label_logprob=np.zeros(len(ids), np.float32),
                        columns={"ref": [f"r{i}" * i for i in range(11)]})
    table = batch_to_table(batch)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table, max_chunksize=4)
    data = sink.getvalue().to_pybytes()
    layout = read_ipc_layout(data)
    decoded = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    assert layout.rows == 11 and len(layout.batches) == 3
    assert layout.child_length("pred_ids") == layout.child_length("label_logprob") == offsets[-1]
    assert layout.decoded_bytes >= decoded.nbytes


def test_a_footer_length_past_the_bound_is_refused_before_it_is_read(tmp_path):
    """tokens.arrow is read from the file a range at a time: a footer that declares hundreds of megabytes (in a
    sparse file that large) is refused from its length, not read."""
    path = tmp_path / "tokens.arrow"
    size = MAX_METADATA_BYTES + (64 << 20)
    with open(path, "wb") as f:
        f.write(b"ARROW1\0\0")
        f.seek(size - 10)
        f.write((MAX_METADATA_BYTES + 1).to_bytes(4, "little", signed=True) + b"ARROW1")
    with pa.OSFile(str(path)) as file, pytest.raises(IpcLayoutError, match="a footer of"):
        read_ipc_layout(FileBytes(file))
