"""Fuzz: a spill damaged or crafted anywhere in its metadata never crashes a reading command or exhausts memory.

Hypothesis mutates one file of a real spill at a time: every JSON file (manifest, results, integrity seal, shard
and chunk records, zarr metadata, the tokenizer's), the headers of `tokens.arrow` (schema, record batch and footer
flatbuffers, the uncompressed length before each compressed buffer) and of a zarr chunk (its zstd frame header).
Checksums are recomputed after each mutation, as someone crafting a spill would do (the chunk's CRC-32s in
`chunk.json`, the seal's SHA-256s), so only the reader's own checks can stop it. Then every reading command runs
on the result, each as its own process (a fork of a warmed-up server, `_cli_worker.py`), under a memory bound:
each must end with exit code 0, or 2 and exactly one `error:` line; never a traceback, a signal, a hang, or a
peak RSS above the bound (`os.wait4`, exact). Mutated spills are a complete sealed spill and a partial one (a run
that crashed: no seal, no shard record), the latter read with --allow-partial.

CI runs FUZZ_EXAMPLES examples (default 30, about a minute on 2 cores; the same 30 each run when CI is set); set it higher to fuzz for longer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import _crash_worker as workload
from _cli_worker import CliWorker
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from spilleval import Evaluator
from spilleval.spill.integrity import INTEGRITY_NAME, seal

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
PEAK_RSS_MB = 1024  # a command on these small spills peaks near 300 MB; a declared size obeyed costs gigabytes
TIMEOUT_S = 60.0
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

HOSTILE_INTS = [-1, 0, 1, 7, 255, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 3 * 10**9, 3 * 10**10, 2**53 + 1, 2**62,
                2**63 - 1, 2**63, 2**64 + 5, -(2**31), -(2**63), 10**30]
HOSTILE_SCALARS = HOSTILE_INTS + [0.5, -0.0, 1e308, -1e308, math.nan, math.inf, -math.inf, "", "x", "0", "-1",
                                  "../../../../etc/passwd", "/etc/passwd", "chunk-000000", "tokens.arrow",
                                  "arrays.zarr/../../x", "a\u0000b", "[bold]", "[/]", "complete", "partial", True,
                                  False, None]
DEEP = "\u2063DEEP\u2063"  # replaced by 100,000 nested brackets after json.dumps


# ----------------------------------------------------------------------------------------------- the spills
def build_spill(path: Path, indices: np.ndarray, *, finish: bool) -> Path:
    evaluator = Evaluator(path, workload.METRICS, tokenizer=workload.TOKENIZER, dataset_length=24, chunk_rows=5)
    for start in range(0, len(indices), 6):
        rows = indices[start : start + 6]
        logits, labels, columns, arrays = workload.batch(rows)
        evaluator.update(logits, labels, sample_index=rows, columns=columns, arrays=arrays)
    if finish:
        evaluator.finalize()
    else:
        evaluator.abort()  # as a crash leaves it: committed chunks, no shard record, no seal
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {
        "complete": build_spill(root / "complete", np.arange(24), finish=True),
        "partial": build_spill(root / "partial", np.arange(17), finish=False),
    }


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> CliWorker:
    server = CliWorker(tmp_path_factory.mktemp("worker"), timeout_s=TIMEOUT_S)
    yield server
    server.close()


def reading_commands(spill: Path, other: Path, out: Path, *, partial: bool) -> list[list[Any]]:
    """Every reading command, with the options that make it read everything it can (arrays: show --index)."""
    flag = ["--allow-partial"] if partial else []
    return [
        ["compute", spill, *flag],
        ["inspect", spill],
        ["show", spill, "--index", "0,3", *flag],
        ["worst", spill, "--by", "nll", "-n", "3", *flag],
        ["diff", spill, other, *flag],
        ["export", spill, "-o", out / "export.jsonl", "--force", "--decode", "--scores", *flag],
        ["report", spill, "-o", out / "report.html", "--force", *flag],
    ]


def check_ended_well(result: dict[str, Any]) -> None:
    stderr = result["stderr"] if len(result["stderr"]) < 3000 else "..." + result["stderr"][-3000:]
    where = f"{result['argv'][0]}: exit {result['exit_code']}, signal {result['signal']}\n{stderr}"
    assert not result["timed_out"], f"timed out after {TIMEOUT_S} s: {where}"
    assert "Traceback" not in result["stderr"], where
    assert result["exit_code"] in (0, 2), where
    if result["exit_code"] == 2:
        error_lines = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1, where
    assert result["maxrss_kb"] <= PEAK_RSS_MB * 1024, f"peak RSS {result['maxrss_kb'] // 1024} MB: {where}"


# ----------------------------------------------------------------------------------------------- targets
def json_targets(spill: Path) -> list[str]:
    names = [p.relative_to(spill).as_posix() for p in spill.rglob("*.json")]
    return sorted(n for n in names if not n.startswith("."))


def arrow_regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of the metadata of an Arrow IPC file (found with pyarrow, not with the reader's parser)."""
    regions: dict[str, tuple[int, int]] = {}
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data[8:]))
    offset = 8
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        size = len(message.serialize())
        body = message.body.size if message.body is not None else 0
        regions[f"{message.type} metadata"] = (offset + 8, offset + size - body)
        offset += size
    footer_length = struct.unpack_from("<i", data, len(data) - 10)[0]
    regions["footer"] = (len(data) - 10 - footer_length, len(data))
    prefixes = [at for at in range(8, len(data) - 12, 8) if data[at + 8 : at + 12] == ZSTD_MAGIC]
    for i, at in enumerate(prefixes):
        regions[f"buffer {i} length"] = (at, at + 8)
    return regions


# ----------------------------------------------------------------------------------------------- mutations
def paths_of(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths_of(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:4]):
            out += paths_of(item, prefix + (i,))
    return out


def replaced(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        return {**document, head: replaced(document[head], rest, value)}
    copy = list(document)
    copy[head] = replaced(copy[head], rest, value)
    return copy


def dumps(document: Any) -> bytes:
    text = json.dumps(document, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


@st.composite
def json_mutation(draw, raw: bytes) -> bytes:
    document = json.loads(raw)
    kind = draw(st.sampled_from(["value", "value", "value", "delete", "add", "rename", "document", "bits", "cut"]))
    paths = paths_of(document)
    if kind == "bits":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "document":
        return draw(st.sampled_from([b"[]", b"null", b"42", b'"manifest"', b"", b"\xff\xfe{", b"{}",
                                     dumps([document]), dumps(DEEP), b"{" * 100_000]))
    if kind == "value":
        value = draw(st.one_of(st.sampled_from(HOSTILE_SCALARS + [DEEP, [], {}, [1] * 1000, {"x": 1}]),
                               st.integers(), st.text(max_size=12)))
        return dumps(replaced(document, draw(st.sampled_from(paths)), value))
    keyed = [p for p in paths if p and isinstance(p[-1], str)]
    if not keyed:
        return dumps(document)
    path = draw(st.sampled_from(keyed))
    parent_path, key = path[:-1], path[-1]
    parent = document
    for part in parent_path:
        parent = parent[part]
    if kind == "delete":
        changed = {k: v for k, v in parent.items() if k != key}
    elif kind == "add":
        added = draw(st.sampled_from(["extra_key", key + "_", "files", "__proto__", "[/]", "../x", ""]))
        changed = {**parent, added: draw(st.sampled_from(HOSTILE_SCALARS))}
    else:  # a flipped bit in the key's name
        name = bytearray(key.encode())
        name[draw(st.integers(0, len(name) - 1))] ^= 1 << draw(st.integers(0, 6))
        changed = {(name.decode("latin-1") if k == key else k): v for k, v in parent.items()}
    return dumps(replaced(document, parent_path, changed))


@st.composite
def binary_mutation(draw, raw: bytes, regions: dict[str, tuple[int, int]]) -> bytes:
    name = draw(st.sampled_from(sorted(regions)))
    start, stop = regions[name]
    data = bytearray(raw)
    if draw(st.booleans()):
        width = draw(st.sampled_from([1, 2, 4, 8]))
        at = draw(st.integers(start, max(start, stop - width)))
        value = draw(st.one_of(st.sampled_from(HOSTILE_INTS), st.integers(-(2**63), 2**64 - 1)))
        data[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    else:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(start, stop - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data[: len(raw)])


def chunk_of(name: str) -> tuple[str, str] | None:
    """(chunk directory, file name inside it) when `name` is a file of a chunk."""
    parts = name.split("/")
    if len(parts) > 3 and parts[0] == "shards" and parts[2].startswith("chunk-"):
        return "/".join(parts[:3]), "/".join(parts[3:])
    return None


def recompute_checksums(spill: Path, changed: str) -> None:
    """What a crafted spill would carry: the chunk's CRC-32 of the changed file, the seal's SHA-256s."""
    located = chunk_of(changed)
    if located is not None and located[1] != "chunk.json":
        record_path = spill / located[0] / "chunk.json"
        record = json.loads(record_path.read_text())
        data = (spill / changed).read_bytes()
        if located[1] in record["files"]:
            record["files"][located[1]] = {"bytes": len(data), "crc32": zlib.crc32(data)}
            record_path.write_text(json.dumps(record))
    if changed != INTEGRITY_NAME and (spill / INTEGRITY_NAME).exists():
        seal(spill)


def mutation_targets(spill: Path) -> list[tuple[str, str]]:
    targets = [(name, "json") for name in json_targets(spill)]
    targets += [(p.relative_to(spill).as_posix(), "arrow") for p in spill.glob("shards/*/chunk-*/tokens.arrow")]
    targets += [(p.relative_to(spill).as_posix(), "zstd")
                for p in spill.glob("shards/*/chunk-*/arrays.zarr/*/c/*/*")]
    return sorted(targets)


# ----------------------------------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_every_command_reads_the_pristine_spills(pristine, worker, tmp_path):
    """The harness itself: exit 0 everywhere on undamaged spills, well within the memory bound."""
    for kind, spill in pristine.items():
        for argv in reading_commands(spill, spill, tmp_path, partial=kind == "partial"):
            result = worker.run(*argv)
            check_ended_well(result)
            assert result["exit_code"] == 0, (argv, result["stderr"])


@pytest.mark.slow
@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_reading_commands_survive_any_mutated_metadata(data, pristine, worker, tmp_path_factory):
    kind = data.draw(st.sampled_from(["complete", "complete", "partial"]), label="spill")
    source = pristine[kind]
    name, form = data.draw(st.sampled_from(mutation_targets(source)), label="target")
    scratch = tmp_path_factory.mktemp("fuzz")
    spill = scratch / "spill"
    shutil.copytree(source, spill)
    raw = (spill / name).read_bytes()
    if form == "json":
        mutated = data.draw(json_mutation(raw), label="mutated")
    elif form == "arrow":
        mutated = data.draw(binary_mutation(raw, arrow_regions(raw)), label="mutated")
    else:
        mutated = data.draw(binary_mutation(raw, {"zstd frame header": (4, min(len(raw), 14))}), label="mutated")
    (spill / name).write_bytes(mutated)
    recompute_checksums(spill, name)
    exits = []
    for argv in reading_commands(spill, source, scratch, partial=kind == "partial"):
        result = worker.run(*argv)
        check_ended_well(result)
        exits.append(result["exit_code"])
    event(f"{form} mutation: {'every command refused it' if set(exits) == {2} else 'some command read it'}")
    shutil.rmtree(scratch, ignore_errors=True)
