"""Multi-process evaluation with real processes and gloo on CPU: exact metrics and one merged spill at any world size.

Each rank runs tests/_dist_worker.py (a plain DDP loop with `Evaluator`, or `SpillingTrainer` under torchrun) and
writes what it returned or raised; the reference is the same evaluation in this process, without a process group.
37 samples with batch 4 are not a multiple of world size x batch size, so samplers pad with duplicates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch.distributed as dist

from _dist_worker import CHOICES, NUM_SAMPLES, build_trainer, evaluate_qa, train_models
from spilleval import SpillReader, compute_from_spill
from spilleval.spill import IncompleteSpillError, load_manifest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_dist_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT_S = 240  # a hang fails the test instead of the suite
TIMING_KEYS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    train_models(directory)
    return directory


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The single-process run: its spill and its results."""
    spill = tmp_path_factory.mktemp("reference") / "spill"
    return spill, evaluate_qa(spill, models)


def launch(directory: Path, world_size: int, scenario: str, models: Path, *, torchrun: bool = False,
           **config: Any) -> tuple[list[dict[str, Any] | None], list[int]]:
    """Start every rank, wait for all (bounded), return each rank's record (None if it wrote none) and exit codes."""
    config = {"scenario": scenario, "spill_dir": str(directory / "spill"), "out": str(directory),
              "models": str(models), "init_method": f"file://{directory / 'store'}", **config}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if torchrun:
        commands = [([str(TORCHRUN), "--standalone", "--nproc_per_node", str(world_size), str(WORKER),
                      json.dumps(config)], env)]
    else:
        commands = [([sys.executable, str(WORKER), json.dumps(config)],
                     {**env, "RANK": str(rank), "WORLD_SIZE": str(world_size)}) for rank in range(world_size)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cmd, e in commands]
    try:
        logs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    records = []
    for rank in range(world_size):
        path = directory / f"rank-{rank}.json"
        records.append(json.loads(path.read_text()) if path.exists() else None)
    assert any(records), "no rank wrote a record:\n" + "\n".join(log[-3000:] for log in logs)
    return records, [p.returncode for p in procs]


def assert_no_error(records: list[dict[str, Any] | None]) -> None:
    for record in records:
        assert record is not None and "error" not in record, record and record.get("traceback")


def assert_same_spill(spill: Path, reference_spill: Path, world_size: int) -> SpillReader:
    """One merged spill: every sample once, every row (ids, log-probs, columns) equal to the single-process run.

    The columns recorded for a classic compute_metrics say where a row was in the eval loop (step, rank, batch
    loss, its batch's padding), which depends on the world size: they are compared through the closure's result."""
    reader = SpillReader(spill)
    assert reader.manifest.world_size == world_size and reader.is_complete
    completeness = reader.completeness()
    assert completeness.committed == len(reader) == NUM_SAMPLES and completeness.missing == []
    assert without_loop_columns(reader.table()).equals(without_loop_columns(SpillReader(reference_spill).table()))
    return reader


def without_loop_columns(table: Any) -> Any:
    return table.drop_columns([c for c in table.column_names if c.startswith("compute_metrics.")])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_world_size_gives_the_single_process_metrics_and_rows(world_size, models, reference, tmp_path):
    reference_spill, expected = reference
    if world_size == 1:  # a process group of one, in this process
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            records = [{"results": evaluate_qa(tmp_path / "spill", models)}]
        finally:
            dist.destroy_process_group()
    else:
        records, _ = launch(tmp_path, world_size, "evaluate", models)
    assert_no_error(records)
    for record in records:  # every rank returns the same dict, equal to the single-process one
        assert record["results"] == expected
    assert json.loads((tmp_path / "spill" / "results.json").read_text())["metrics"] == expected
    reader = assert_same_spill(tmp_path / "spill", reference_spill, world_size)
    # padded duplicates are on disk, each counted once
    assert reader.num_rows == math.ceil(NUM_SAMPLES / world_size) * world_size
    assert compute_from_spill(tmp_path / "spill") == expected  # recomputed with no process group
    assert 0 < expected["mc_accuracy"] < 1 and expected["mc_questions"] == math.ceil(NUM_SAMPLES / CHOICES)
    if world_size > 1:  # the multiple-choice metric met questions whose choices were evaluated on several ranks
        ranks_of = {}
        for path in sorted((tmp_path / "spill" / "shards").glob("rank-*/chunk-*/tokens.arrow")):
            for question in pa.ipc.open_file(path).read_all().column("question_id").to_pylist():
                ranks_of.setdefault(question, set()).add(path.parts[-3])
        assert any(len(ranks) > 1 for ranks in ranks_of.values())


@pytest.mark.parametrize("failure, world_size", [("raise", 3), ("crash", 2)])
def test_a_failing_rank_stops_every_rank_with_an_error_naming_it(failure, world_size, models, reference, tmp_path):
    """Rank 1 raises (it tells the others) or dies silently (the others give up after dist_timeout): no hang."""
    # a raised error must reach the others at once: with a 600 s timeout, waiting for it would exceed the launch's
    dist_timeout = 600.0 if failure == "raise" else 5.0
    records, exit_codes = launch(tmp_path, world_size, failure, models, fail_rank=1, dist_timeout=dist_timeout)
    for rank, record in enumerate(records):
        if rank == 1:
            continue
        assert record["error_type"] == "DistributedEvaluationError", record.get("traceback")
        assert f"stopped on rank {rank} of {world_size}" in record["error"]
        if failure == "raise":
            assert "rank 1 failed: RuntimeError: injected failure in the forward pass on rank 1" in record["error"]
            assert record["error"].count(" failed: ") == 1  # the rank that failed, not the ranks that followed
            assert "raise_if_peer_failed" in record["traceback"]  # stopped mid-loop, not only at finalize()
        else:
            assert "rank 1 did not finish within 5 s" in record["error"]
        assert "allow_partial=True" in record["error"]
    if failure == "raise":
        assert records[1]["error_type"] == "RuntimeError"
        assert any(f"rank 1 of {world_size} failed" in note for note in records[1]["notes"])
    else:
        assert records[1] is None and exit_codes[1] == 17
    # what was committed stays readable, and equals the single-process rows
    with pytest.raises(IncompleteSpillError):
        SpillReader(tmp_path / "spill")
    partial = SpillReader(tmp_path / "spill", allow_partial=True)
    assert 0 < partial.completeness().committed < NUM_SAMPLES
    rows = partial.table()
    expected = SpillReader(reference[0]).table()
    assert rows.equals(expected.filter(pc.is_in(expected["sample_index"], rows["sample_index"])))
    assert load_manifest(tmp_path / "spill").status == "writing"


def test_a_sampler_that_leaves_samples_out_is_refused_on_every_rank(models, tmp_path):
    """DistributedSampler(drop_last=True) evaluates 36 of 37 samples: every rank raises the same error naming the
    missing sample, no rank reports numbers, and the spill is kept as partial."""
    records, exit_codes = launch(tmp_path, 2, "drop_last", models)
    for record in records:
        assert record["error_type"] == "IncompleteEvaluationError", record.get("traceback")
        assert f"covered {NUM_SAMPLES - 1} of dataset_length={NUM_SAMPLES} samples" in record["error"]
    assert load_manifest(tmp_path / "spill").status == "partial"
    with pytest.raises(IncompleteSpillError, match="finished without covering every sample"):
        SpillReader(tmp_path / "spill")
    assert SpillReader(tmp_path / "spill", allow_partial=True).completeness().missing_count == 1


@pytest.mark.parametrize("stream, world_size", [(False, 2), (True, 2), (False, 3)], ids=["map-2", "stream-2", "map-3"])
def test_spilling_trainer_under_torchrun_gives_the_single_process_numbers(models, tmp_path, stream, world_size):
    """LLaVA-style model, `torchrun --nproc_per_node 2`, accelerate's padded last batch (map-style) or its batches
    dispatched from rank 0 (an IterableDataset): the same numbers, `eval_loss` included (transformers' own, a mean
    of per-batch means scaled by the world size, depends on both; SpillingTrainer's is the exact token-weighted
    cross-entropy).
    """
    expected = build_trainer(tmp_path / "single" / "out", tmp_path / "single" / "spill", models,
                             stream=stream).evaluate()
    (tmp_path / "ddp").mkdir()
    records, exit_codes = launch(tmp_path / "ddp", world_size, "trainer", models, torchrun=True,
                                 output_dir=str(tmp_path / "ddp" / "out"), stream=stream)
    assert_no_error(records)
    assert exit_codes == [0]  # torchrun's: every rank exited cleanly (see test_distributed_exit.py)
    comparable = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMING_KEYS}  # noqa: E731
    for record in records:
        assert comparable(record["results"]) == comparable(expected)
    assert expected["eval_loss"] == pytest.approx(expected["eval_nll"], rel=1e-12)
    assert {"eval_nll", "eval_answer_macro_f1", "eval_exact_match_accuracy"} <= set(expected)
    # the classic compute_metrics got every sample once, aligned labels, on every rank
    assert expected["eval_rows"] == NUM_SAMPLES and expected["eval_accuracy"] == expected["eval_token_accuracy"]
    assert_same_spill(tmp_path / "ddp" / "spill", tmp_path / "single" / "spill", world_size=world_size)
