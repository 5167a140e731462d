"""Sorted runs written by tasks and merged by the parent (`ngram_table.write_runs` / `NgramCountWriter.adopt`):
exact counts in (key, text) order whatever the task boundaries, buffer sizes and merge fan-in, with keys shared by
many texts (colliding hashes, answers that share their first 8 bytes); answer_macro_f1 on them equals sklearn."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from spilleval.metrics import ngram_table, run_file, run_partitions
from spilleval.metrics.answers import AnswerMacroF1
from spilleval.metrics.cider_vectors import text_hashes
from spilleval.metrics.ngram_table import NgramCounts, NgramCountWriter, Run, prefix_keys, write_runs

WORDS = ["a", "ab", "b", "café", "cafe", "日本", "the answer is", "the answer is x", "", "\x00", "zzzzzzzzz"]


def random_rows(rng: np.random.Generator, rows: int) -> tuple[list[str], np.ndarray]:
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 4)).tolist()) for _ in range(rows)]
    return texts, rng.integers(0, 5, size=(rows, 2))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), tasks=st.integers(1, 7), buffer_rows=st.sampled_from([1, 50, 10**6]),
       max_runs=st.integers(1, 4), key=st.sampled_from(["prefix", "collide"]))
def test_adopted_runs_merge_to_exact_counts_in_key_order(tmp_path_factory, seed, tasks, buffer_rows, max_runs,
                                                         key) -> None:
    rng = np.random.default_rng(seed)
    texts, counts = random_rows(rng, 3000)  # more than a merge block (1,024 rows): merges take several rounds
    keys = prefix_keys(pa.array(texts)) if key == "prefix" else np.uint64(7) * (prefix_keys(pa.array(texts)) % 3)
    root = tmp_path_factory.mktemp("runs")
    writer = NgramCountWriter(root / "table", buffer_rows=buffer_rows, max_runs=max_runs)
    cuts = np.sort(rng.integers(0, len(texts), size=tasks - 1))
    for part in np.split(np.arange(len(texts)), cuts):
        batches = np.array_split(part, 3)
        runs = write_runs(root, ((keys[b], pa.array([texts[i] for i in b], pa.large_string()), counts[b])
                                 for b in batches), buffer_rows=buffer_rows)
        for run in runs:
            writer.adopt(run)
    (merged,) = writer.finish()
    run = Run(merged)
    sums: defaultdict = defaultdict(lambda: np.zeros(2, np.int64))
    for i, text in enumerate(texts):
        sums[(int(keys[i]), text.encode())] += counts[i]
    got_keys = list(zip(run.hashes.tolist(), (run.text_bytes(i) for i in range(len(run)))))
    assert got_keys == sorted(sums)
    assert np.array_equal(np.asarray(run.counts), np.array([sums[k] for k in got_keys]))
    if key == "prefix":
        assert [k[1].decode() for k in got_keys] == sorted(set(texts))  # code point order
    assert set(root.iterdir()) - {merged} == {root / "table"}  # the other adopted runs were merged and removed


@pytest.mark.parametrize("tasks", [1, 5, 40])
def test_answer_macro_f1_on_merged_runs_equals_sklearn(tmp_path, monkeypatch, tasks) -> None:
    monkeypatch.setattr(ngram_table, "MAX_RUNS", 2)
    monkeypatch.setattr(ngram_table, "BUFFER_ROWS", 64)
    rng = np.random.default_rng(tasks)
    answers = [f"the answer is {w}" for w in ["x", "y", "é", "日本", "xy", "x y"]] + [f"a{i}" for i in range(2500)]
    labels = rng.choice(answers, 4000).tolist()
    preds = [label if rng.random() < 0.4 else str(rng.choice(answers)) for label in labels]
    metric = AnswerMacroF1()
    metric.start(tmp_path)
    try:
        context = metric.context(0)
        for task in np.array_split(np.arange(len(labels)), tasks):
            partials = [metric.map(0, SimpleNamespace(pred_text=[preds[i] for i in b],
                                                      label_text=[labels[i] for i in b]), context)
                        for b in np.array_split(task, 3)]
            for partial in metric.reduce_task(0, partials, context):
                metric.merge(0, partial)
        got = metric.finish()["answer_macro_f1"]
    finally:
        metric.close()
    assert got == f1_score(labels, preds, average="macro")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), keys=st.integers(1, 300), in_order=st.booleans())
def test_run_lookup_is_exact_for_keys_anywhere_in_any_order(tmp_path_factory, seed, keys, in_order) -> None:
    """A lookup searches only the stretch of the run between its smallest and largest key: counts stay exact for
    keys below, between and above the run's, sorted or not, on hashes that many texts share."""
    rng = np.random.default_rng(seed)
    texts, counts = random_rows(rng, 500)
    hashes = rng.integers(100, 120, size=len(texts)).astype(np.uint64)
    (run,) = write_runs(tmp_path_factory.mktemp("runs"), [(hashes, pa.array(texts, pa.large_string()), counts[:, 0])])
    path = run.path
    expected: defaultdict = defaultdict(int)
    for h, text, count in zip(hashes.tolist(), texts, counts[:, 0].tolist()):
        expected[(h, text)] += count
    asked_texts, _ = random_rows(rng, keys)
    asked = rng.integers(95, 125, size=keys).astype(np.uint64)
    if in_order:
        order = np.argsort(asked)
        asked, asked_texts = asked[order], [asked_texts[i] for i in order]
    asked_array = pa.array(asked_texts, pa.large_string())
    got = Run(path).lookup(asked, lambda rows: asked_array.take(pa.array(rows)))
    assert got.tolist() == [expected[(h, text)] for h, text in zip(asked.tolist(), asked_texts)]


class InProcessPool:
    """A `RunPool` of `workers` that runs its jobs here, one after the other (the process pool is tested in
    test_parallel.py): the ranges and their merges are the same."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map(self, fn, jobs):
        return [fn(*job) for job in jobs]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), tasks=st.integers(1, 9), workers=st.integers(2, 5),
       listed=st.integers(1, 4), key=st.sampled_from(["prefix", "collide", "hash"]))
def test_runs_merged_in_key_ranges_are_the_table_of_one_merge(tmp_path_factory, seed, tasks, workers, listed,
                                                               key) -> None:
    """With a pool, runs are merged one key range per worker: the ranges are disjoint and in key order, read one
    after the other they are the single merge's rows, and lookups (with `present`) give the same counts; the
    listed runs are merged every `listed` runs too; no run is left behind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_partitions, "MIN_RANGE_ROWS", 1)
        patch.setattr(ngram_table, "MAX_LISTED_RUNS", listed)
        check_ranges_against_one_merge(tmp_path_factory.mktemp("ranges"), seed, tasks, workers, key)


def check_ranges_against_one_merge(root, seed: int, tasks: int, workers: int, key: str) -> None:
    rng = np.random.default_rng(seed)
    texts, counts = random_rows(rng, 2000)
    counts = counts[:, 0]  # lookups read one count per key
    text_array = pa.array(texts, pa.large_string())
    keys = {"prefix": prefix_keys(text_array), "collide": np.uint64(7) * (prefix_keys(text_array) % 3),
            "hash": text_hashes(text_array)}[key]
    single = NgramCountWriter(root / "single")
    ranged = NgramCountWriter(root / "ranged", pool=InProcessPool(workers))
    for part in np.split(np.arange(len(texts)), np.sort(rng.integers(0, len(texts), size=tasks - 1))):
        pieces = [(keys[b], text_array.take(pa.array(b)), counts[b]) for b in np.array_split(part, 3)]
        for piece in pieces:
            single.add(*piece)
        for run in write_runs(root, pieces, buffer_rows=max(1, len(part) // 3)):
            ranged.adopt(run)
    (one,) = single.finish()
    parts = ranged.finish()
    assert len(parts) > 1 or key != "hash", (parts, ranged._merged, ranged._runs)  # few distinct prefix keys may fall in one range
    whole, pieces = Run(one), [Run(p) for p in parts]
    assert all(a.hashes[-1] < b.hashes[0] for a, b in zip(pieces, pieces[1:]))
    assert np.concatenate([p.hashes for p in pieces]).tolist() == whole.hashes.tolist()
    assert [r.text_bytes(i) for r in pieces for i in range(len(r))] == [whole.text_bytes(i) for i in range(len(whole))]
    assert np.array_equal(np.concatenate([np.asarray(p.counts) for p in pieces]), np.asarray(whole.counts))
    asked = np.concatenate([np.arange(0, len(texts), 7), rng.integers(0, len(texts), 50)])
    asked_keys, asked_texts = keys[asked], text_array.take(pa.array(asked))
    table = NgramCounts(parts)
    for present in (None, np.ones(len(asked), dtype=bool)):
        got = table.get(asked_keys, lambda rows: asked_texts.take(pa.array(rows)), present)
        assert got.tolist() == NgramCounts([one]).get(asked_keys, lambda rows: asked_texts.take(pa.array(rows)),
                                                      present).tolist()
    left = {p for p in root.rglob("run-*")} - {Path(one), *map(Path, parts)}
    assert not left  # the adopted runs were merged and removed (a single adopted run is the table as it is)
    assert not list(root.rglob("range-*"))


@pytest.mark.parametrize("runs, ranges", [(80, 2), (116, 16), (3, 16), (400, 16), (1, 5)])
def test_key_ranges_hold_even_rows_when_every_run_has_the_same_keys_distribution(runs, ranges) -> None:
    """The cut points of the key-range merges (`run_partitions.cut_points`) give each range about the same rows,
    for tasks' runs of one key distribution (hashed n-grams) and uneven sizes: within 10% of the mean. Samples at
    the same places in every run used to put 2 ranges of 80 runs at 99% and 1% of the rows."""
    rng = np.random.default_rng(runs * 100 + ranges)
    hashes = [np.sort(rng.integers(0, 2**64 - 1, size=int(rng.integers(1_000, 20_000)), dtype=np.uint64))
              for _ in range(runs)]
    cuts = run_partitions.cut_points(hashes, ranges)
    rows = sum(np.diff([0, *np.searchsorted(h, cuts, side="left"), len(h)]) for h in hashes)
    assert len(rows) == ranges
    assert 0.9 < rows.min() / rows.mean() <= rows.max() / rows.mean() < 1.1, rows / rows.mean()


def counts_in_order(blocks) -> np.ndarray:
    """A summary (`NgramCountWriter.summarize`) that keeps every count: the table's counts in key order."""
    return np.concatenate([*blocks, np.zeros((0, 2), np.int64)])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), tasks=st.integers(1, 9), workers=st.integers(1, 5), listed=st.integers(0, 4),
       key=st.sampled_from(["prefix", "collide", "hash"]), round_bytes=st.sampled_from([1, 300, 1 << 23]))
def test_a_summary_of_the_table_sees_the_counts_of_one_merge_in_key_order(tmp_path_factory, seed, tasks, workers,
                                                                          listed, key, round_bytes) -> None:
    """`summarize` (distinct_n, answer_macro_f1: a table read once) hands the summary the counts the single merge
    writes, in key order, one call per key range, whether the runs are merged in ranges by a pool (listed runs
    merged every `listed` runs, then their ranges merged again; `listed` 0: all of them merged once, and the
    ranges of that merge summarized as they are) or by this process, with merge rounds of any size; nothing is
    written, and no run is left behind."""
    root = tmp_path_factory.mktemp("summary")
    rng = np.random.default_rng(seed)
    texts, counts = random_rows(rng, 1500)
    text_array = pa.array(texts, pa.large_string())
    keys = {"prefix": prefix_keys(text_array), "collide": np.uint64(7) * (prefix_keys(text_array) % 3),
            "hash": text_hashes(text_array)}[key]
    single = NgramCountWriter(root / "single")
    summarized = NgramCountWriter(root / "summarized", pool=InProcessPool(workers))
    cuts = np.sort(rng.integers(0, len(texts), size=tasks - 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_partitions, "MIN_RANGE_ROWS", 1)
        patch.setattr(run_partitions, "RANGE_ROUND_BYTES", round_bytes)
        patch.setattr(ngram_table, "MERGE_ROUND_BYTES", round_bytes)
        runs = []
        for part in np.split(np.arange(len(texts)), cuts):
            pieces = [(keys[b], text_array.take(pa.array(b)), counts[b]) for b in np.array_split(part, 3)]
            for piece in pieces:
                single.add(*piece)
            runs += write_runs(root, pieces, buffer_rows=max(1, len(part) // 3))
        patch.setattr(ngram_table, "MAX_LISTED_RUNS", listed or len(runs) - 1)
        for run in runs:
            summarized.adopt(run)
        (one,) = single.finish()
        found = summarized.summarize(counts_in_order)
    assert 1 <= len(found) <= workers
    assert np.array_equal(np.concatenate(found), np.asarray(Run(one).counts))
    assert {p for p in root.rglob("run-*")} == {Path(one)}


def test_a_table_with_empty_runs_looks_keys_up(tmp_path) -> None:
    """Empty runs beside (or instead of) filled ones: keys are routed past them (all empty used to index an empty
    array of range starts)."""
    texts = pa.array(["a", "b"], pa.large_string())
    asked = np.array([5, 7], np.uint64)
    empties = []
    for _ in range(2):
        path = ngram_table.new_run_path(tmp_path)
        ngram_table._write_run(path, np.zeros(0, np.uint64), pa.array([], pa.large_string()), np.zeros(0, np.int64))
        empties.append(path)
    (full,) = (run.path for run in write_runs(tmp_path, [(np.array([5], np.uint64), pa.array(["a"], pa.large_string()),
                                                         np.array([3]))]))
    for runs, expected in (([*empties], [0, 0]), ([empties[0], full, empties[1]], [3, 0])):
        got = NgramCounts(runs).get(asked, lambda rows: texts.take(pa.array(rows)), np.array([True, False]))
        assert got.tolist() == expected


def test_a_run_file_written_in_rounds_reads_as_one_written_whole_and_damage_is_named(tmp_path) -> None:
    """`run_file.py`: rows appended in rounds into reserved sections read back as the same rows as one write; a
    file with no header (its writer did not finish), cut short, or with offsets outside its texts is refused with
    `RunFileError` before Arrow reads it."""
    rng = np.random.default_rng(3)
    texts, counts = random_rows(rng, 300)
    hashes = np.sort(rng.integers(0, 2**63, size=len(texts)).astype(np.uint64))
    array = pa.array(texts, pa.large_string())
    run_file.write_run_file(tmp_path / "whole", hashes, counts, array)
    with run_file.RunFileWriter(tmp_path / "rounds", max_rows=1000, width=counts.shape[1]) as writer:
        for start, stop in ((0, 0), (0, 120), (120, 121), (121, 300)):
            writer.append(hashes[start:stop], counts[start:stop], array.slice(start, stop - start))
    whole, rounds = Run(tmp_path / "whole"), Run(tmp_path / "rounds")
    assert rounds.hashes.tolist() == whole.hashes.tolist() == hashes.tolist()
    assert np.array_equal(rounds.counts, whole.counts) and rounds.texts.equals(whole.texts)
    assert rounds.texts.to_pylist() == texts and run_file.run_file_rows(tmp_path / "rounds") == 300
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / "unfinished").write_bytes(bytes(64) + data[64:])
    (tmp_path / "short").write_bytes(data[:-1])
    bad = bytearray(data)
    layout = run_file.Layout.parse(data, len(data), tmp_path)
    bad[layout.offsets_at + 8 * 300 : layout.offsets_at + 8 * 301] = np.int64(10**9).tobytes()
    (tmp_path / "offsets").write_bytes(bytes(bad))
    middle = bytearray(data)  # an offset inside the stretch that goes back: Arrow would read outside the texts
    middle[layout.offsets_at + 8 * 150 : layout.offsets_at + 8 * 151] = np.int64(10**9).tobytes()
    (tmp_path / "middle").write_bytes(bytes(middle))
    for name, message in (("unfinished", "no header"), ("short", "past the end"), ("offsets", "text offsets")):
        with pytest.raises(run_file.RunFileError, match=message):
            Run(tmp_path / name)
        with pytest.raises(run_file.RunFileError, match=message):  # a merge's reader (pread, no mapping)
            run_file.RowReader(tmp_path / name).rows(0, 300)
    with pytest.raises(run_file.RunFileError, match="text offsets"):
        run_file.RowReader(tmp_path / "middle").rows(100, 200)
    read = run_file.RowReader(tmp_path / "whole", 10, 290).rows(5, 20)  # rows 15..29 of the file
    assert read.hashes.tolist() == hashes[15:30].tolist() and read.texts.to_pylist() == texts[15:30]
    assert np.array_equal(read.counts, counts[15:30])
    with pytest.raises(ValueError, match="more rows"), run_file.RunFileWriter(tmp_path / "over", max_rows=1, width=1) as w:
        w.append(hashes[:2], counts[:2, 0], array.slice(0, 2))
    assert not (tmp_path / "over").exists()  # a writer left by an error removes its partial file


def test_runs_are_merged_by_size_tier_each_row_a_logarithmic_number_of_times(tmp_path, monkeypatch) -> None:
    """64 runs of 500 rows, fan-in 4: 16 merges of 4 runs, 4 of 4, 1 of 4, so every row is read by 3 merges.
    Merging the 4 smallest runs whenever there were more than 4 put the last merge's run into each next one."""
    rng = np.random.default_rng(3)
    read: list[int] = []
    merge = ngram_table.write_merged
    monkeypatch.setattr(ngram_table, "write_merged", lambda path, runs, *a, **k: (
        read.append(sum(part.rows for part in runs)), merge(path, runs, *a, **k))[1])
    writer = NgramCountWriter(tmp_path / "table", buffer_rows=100, max_runs=4)
    for task in range(64):
        texts = pa.array([f"t{task}-{i}" for i in range(500)], pa.large_string())
        for run in write_runs(tmp_path, [(rng.integers(0, 2**63, 500).astype(np.uint64), texts, np.ones(500))]):
            writer.adopt(run)
    (table,) = writer.finish()
    assert len(Run(table)) == 64 * 500
    assert len(read) == 16 + 4 + 1 and sum(read) == 3 * 64 * 500


def test_a_merge_reads_each_run_in_blocks_in_proportion_to_its_rows(tmp_path, monkeypatch) -> None:
    """A run of 20,000 rows merged with three of 500 (keys of one distribution): each round reads about its share
    of the round's bytes from each, so the rounds are about the table's bytes / the round's. With equal shares the
    small runs' blocks reached far past the large run's, and the rounds took slivers of them: 39 rounds."""
    rng = np.random.default_rng(4)
    parts = []
    for index, rows in enumerate([20_000, 500, 500, 500]):
        texts = pa.array([f"r{index}-{i}" for i in range(rows)], pa.large_string())
        parts += write_runs(tmp_path, [(rng.integers(0, 2**63, rows).astype(np.uint64), texts, np.ones(rows))])
    rounds = [0]
    original = ngram_table._rounds

    def counted(*args, **kwargs):
        for block in original(*args, **kwargs):
            rounds[0] += 1
            yield block

    monkeypatch.setattr(ngram_table, "_rounds", counted)
    ngram_table.write_merged(tmp_path / "merged", parts, round_bytes=64 << 10)
    readers = [part.reader() for part in parts]
    table_bytes = sum(reader.mean_row_bytes() * len(reader) for reader in readers)
    for reader in readers:
        reader.close()
    assert len(Run(tmp_path / "merged")) == 21_500
    assert rounds[0] <= table_bytes / (64 << 10) + 2, (rounds, table_bytes)  # 673,560 bytes: 11 rounds
