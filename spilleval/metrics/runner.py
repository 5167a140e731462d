"""Run a set of metrics: live over batches as they are spilled, or offline over a spill directory.

Both paths feed the same `update(SampleBatch)` calls, so `spilleval compute <dir>` reproduces the live numbers.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from ..batch import SampleBatch
from ..decode import check_tokenizer_vocab, decode_batch
from .base import CorpusMetric, Metric, MetricConfigError, State, StreamingMetric
from .registry import build_metrics

MetricSpec = str | dict[str, Any] | Metric
GENERATION_TASK = "generation"  # a spill of generated ids: label rows are not aligned with prediction rows


class MetricSuite:
    """The metrics of one evaluation, split into streaming and corpus metrics."""

    def __init__(self, specs: Iterable[MetricSpec], *, tokenizer: Any = None) -> None:
        self.metrics = build_metrics(specs)
        self.tokenizer = tokenizer
        self.streaming = [m for m in self.metrics if isinstance(m, StreamingMetric)]
        self.corpus = [m for m in self.metrics if isinstance(m, CorpusMetric)]
        self._streaming_needs_text = any(m.needs_text for m in self.streaming)
        self._inputs_checked = False
        self._owner: dict[str, Metric] = {}  # computed result key -> the metric that reported it

    @property
    def needs_logprob(self) -> bool:
        return any(m.needs_logprob for m in self.metrics)

    @property
    def needs_sample_nll(self) -> bool:
        return any(m.needs_sample_nll for m in self.metrics)

    @property
    def needs_text(self) -> bool:
        return any(m.needs_text for m in self.metrics)

    def reads(self) -> dict[str, Any]:
        """What these metrics read from a spill besides the ids; `compute_from_spill` decodes nothing else."""
        return {
            "columns": sorted({c for m in self.metrics for c in m.needs_columns}),
            "with_arrays": any(m.needs_arrays for m in self.metrics),
            "with_logprob": self.needs_logprob,
        }

    def specs(self) -> list[dict[str, Any]]:
        return [m.spec() for m in self.metrics]

    def check(self, *, has_logprob: bool, vocab_size: int | None = None, task: str | None = None) -> None:
        """Fail before evaluating when a metric cannot be served."""
        self.check_inputs(has_logprob=has_logprob, task=task)
        if self.needs_text and self.tokenizer is None:
            names = ", ".join(m.name for m in self.metrics if m.needs_text)
            raise MetricConfigError(f"metric(s) {names} decode text and need a tokenizer: pass tokenizer=...")
        if self.needs_text and vocab_size is not None:
            check_tokenizer_vocab(self.tokenizer, vocab_size)

    def check_inputs(self, *, has_logprob: bool, task: str | None = None) -> None:
        """`check` without the tokenizer: what the ids, log-probabilities and task must offer."""
        if task == GENERATION_TASK and any(m.needs_aligned_ids for m in self.metrics):
            names = ", ".join(m.name for m in self.metrics if m.needs_aligned_ids)
            raise MetricConfigError(
                f"metric(s) {names} compare ids position by position, which generated ids are not: score generation "
                "with text metrics (bleu, rouge, cider, squad, answer_macro_f1, ...) and keep token metrics for the "
                "teacher-forced evaluation."
            )
        if self.needs_logprob and not has_logprob:
            names = ", ".join(m.name for m in self.metrics if m.needs_logprob)
            raise MetricConfigError(f"metric(s) {names} need label log-probabilities: evaluate with keep_logprob=True")
        if task == GENERATION_TASK and self.needs_sample_nll:
            names = ", ".join(m.name for m in self.metrics if m.needs_sample_nll)
            raise MetricConfigError(f"metric(s) {names} need the label log-probabilities of a teacher-forced "
                                    "evaluation, which generated ids do not have")

    def reset(self) -> None:
        for metric in self.streaming:
            metric.reset()

    def update(self, batch: SampleBatch) -> None:
        """Update every streaming metric with one batch (decoding once if any of them reads text)."""
        if not self._inputs_checked and len(batch):
            check_batch_inputs(self.metrics, batch)
            self._inputs_checked = True
        self.update_streaming(batch)

    def update_streaming(self, batch: SampleBatch) -> None:
        """`update` without the check of every metric's inputs (a sweep checks those of the metrics it runs)."""
        if not self.streaming:
            return
        if self._streaming_needs_text:
            decode_batch(batch, self.tokenizer)
        for metric in self.streaming:
            metric.update(batch)

    def states(self) -> list[State]:
        return [m.state() for m in self.streaming]

    def merge(self, states: list[State]) -> None:
        for metric, state in zip(self.streaming, states, strict=True):
            metric.merge(state)

    def compute_streaming(self) -> dict[str, float]:
        return merge_results(self.computed(m, m.compute()) for m in self.streaming)

    def compute_corpus(self, reader: Any, *, workers: int = 1) -> dict[str, float]:
        """The corpus metrics over the spill, their passes in `workers` processes (`parallel.py`)."""
        from .parallel import compute_in_parallel
        from .pool import InlineExecutor, worker_pool

        with worker_pool(workers) as (executor, count):
            in_process = isinstance(executor, InlineExecutor)  # else the workers load the tokenizer
            corpus = MetricSuite(self.corpus, tokenizer=_tokenizer_for(self.corpus, reader) if in_process else None)
            results = compute_in_parallel(reader, corpus, executor=executor, workers=count)
        self._owner.update(corpus._owner)
        return results

    def computed(self, metric: Metric, results: dict[str, float]) -> dict[str, float]:
        """Note which metric reported these keys (for `in_order` and `scale_of`); returns them."""
        self._owner.update(dict.fromkeys(results, metric))
        return results

    def in_order(self, results: dict[str, Any]) -> dict[str, Any]:
        """`results` with the metrics' keys in the order the metrics were given (each metric's keys in its own
        order), the one order of results.json, `compute`, `inspect`, `report` and `diff`; other keys follow."""
        rank = {id(m): i for i, m in enumerate(self.metrics)}
        position = {key: rank[id(metric)] for key, metric in self._owner.items() if id(metric) in rank}
        return dict(sorted(results.items(), key=lambda item: position.get(item[0], len(rank))))

    def scale_of(self, key: str) -> str:
        """The scale of a computed result key ("0–1", "0–100", ...), "" when its metric does not say."""
        metric = self._owner.get(key)
        return metric.scale_of(key) if metric is not None else ""


def _tokenizer_for(metrics: list[CorpusMetric], reader: Any) -> Any:
    return reader.tokenizer if any(m.needs_text for m in metrics) else None


def check_batch_inputs(metrics: Iterable[Metric], batch: SampleBatch) -> None:
    """Fail at the first batch, not at the end of the evaluation, when a metric's column or array is missing."""
    for metric in metrics:
        for kind, needed, present in (("column", metric.needs_columns, batch.columns),
                                      ("array", metric.needs_arrays, batch.arrays)):
            missing = [name for name in needed if name not in present]
            if missing:
                have = ", ".join(sorted(present)) or "none"
                raise MetricConfigError(
                    f"metric {metric.name!r} reads the per-sample {kind} {missing[0]!r}, but the batch has: {have}. "
                    f"Pass it while evaluating (Evaluator.update(..., {kind}s={{{missing[0]!r}: ...}})) or name "
                    "another one in the metric's parameters."
                )


def compute_from_spill(
    spill_dir: str | os.PathLike,
    metrics: Iterable[MetricSpec] | None = None,
    *,
    allow_partial: bool = False,
    batch_size: int = 4096,
    progress: bool = False,
    workers: int | None = 1,
    executor: Any = None,
) -> dict[str, float]:
    """Recompute metrics from a spill directory alone (tokenizer and metric config read from it).

    `workers` processes read and score parts of the spill (None: every usable core); the results are the same bits
    for any number. `executor`: run the tasks elsewhere instead (anything with `submit`, e.g. a Dask client), with
    `workers` the number of tasks to keep in flight per worker pair."""
    from ..spill import SpillReader
    from .parallel import compute_in_parallel
    from .pool import InlineExecutor, worker_pool

    reader = SpillReader(spill_dir, allow_partial=allow_partial)
    with worker_pool(workers, executor) as (pool, count):
        # where workers decode, each loads the tokenizer and checks it: the parent does not wait for it
        suite = suite_for_spill(reader, metrics, load_tokenizer=isinstance(pool, InlineExecutor))
        results = compute_in_parallel(reader, suite, executor=pool, workers=count, batch_size=batch_size,
                                      progress=progress)
    return suite.in_order(results)


def suite_for_spill(reader: Any, metrics: Iterable[MetricSpec] | None = None, *,
                    load_tokenizer: bool = True) -> MetricSuite:
    """The metrics to recompute from a spill (default: those it recorded), checked against what it holds.

    `load_tokenizer=False`: the spill is only checked to have one (for a parent whose workers decode: loading it
    took 30-100 ms of every parallel `compute` with the workers idle, and the first load imports torch, 2 s)."""
    recorded = reader.manifest.metrics
    specs = _with_recorded_params(metrics, recorded) if metrics is not None else recorded
    suite = MetricSuite(specs)
    suite.check_inputs(has_logprob=reader.manifest.has_logprob, task=reader.manifest.task)
    if suite.needs_text:
        reader.check_has_tokenizer()
        if load_tokenizer:  # a suite only decodes with it: light, no torch import where it decodes the same
            suite.tokenizer = reader.require_tokenizer(light=True)
    return suite


def _with_recorded_params(names: Iterable[MetricSpec], recorded: list[dict[str, Any]]) -> list[MetricSpec]:
    """A metric named by name alone (`--metrics f1`) takes the parameters it was evaluated with (labels, columns)."""
    by_name = {spec["name"]: spec for spec in recorded}
    return [by_name.get(m, m) if isinstance(m, str) else m for m in names]


def merge_results(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        clash = set(out) & set(part)
        if clash:
            raise MetricConfigError(f"two metrics report the same key(s): {', '.join(sorted(clash))}")
        out.update(part)
    return out
