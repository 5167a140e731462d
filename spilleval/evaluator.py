"""The evaluation engine for any loop: reduce each batch on device, update streaming metrics, spill, finalize.

    evaluator = Evaluator("runs/eval-1", metrics=["token_accuracy", "answer_macro_f1"], tokenizer=tok)
    for batch in loader:
        with torch.no_grad():
            logits = model(**batch).logits
        evaluator.update(logits, batch["labels"], sample_index=batch["index"])
    results = evaluator.finalize()

After a crash, run the same loop with `resume=True` into the same directory: samples the earlier run committed
are skipped (`evaluator.committed(index)` tells the loop which, so it can skip the forward too; `update` drops
them anyway), their streaming metric states are recomputed from the spill (`spilleval.spill.resume` explains
why), and the results equal those of an uninterrupted run.

In a `torch.distributed` job every rank builds its Evaluator (a collective) and passes the dataset indices of its
rows; each writes its own shard, a sample repeated by the sampler counts once (`spilleval.dedupe`), and
`finalize()` returns the same exact results on every rank (`spilleval.distributed`). Use `with Evaluator(...)`
(or `abort()` in an `except`) so that a failing rank stops the others instead of leaving them waiting.

`SpillingTrainer` drives the same engine from `transformers.Trainer`'s evaluation loop.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .accounting import (
    IncompleteEvaluationError,
    check_every_sample,
    checked_sample_index,
)
from .batch import SampleBatch, id_dtype_for_vocab
from .dedupe import FirstSeen, subtract_rows
from .distributed import (
    DEFAULT_TIMEOUT_S,
    Coordinator,
    DistributedEvaluationError,
    process_group,
)
from .intervals import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    check_resamples,
    confidence_intervals,
)
from .metrics.runner import MetricSpec, MetricSuite
from .provenance import RunClock, eval_set_fingerprint, git_record
from .reduce import DEFAULT_CHUNK_BYTES as DEFAULT_REDUCE_CHUNK_BYTES
from .reduce import PendingHostCopy, ReducedBatch, reduce_logits
from .spill import Manifest, SpillReader, SpillWriter
from .spill.integrity import seal
from .spill.manifest import (
    MANIFEST_NAME,
    RESULTS_NAME,
    library_versions,
    load_manifest,
    write_json_atomic,
)
from .spill.results import prefixed
from .spill.resume import CommittedSamples, keep_rows, replay_shard
from .spill.writer import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_COMMIT_INTERVAL_S,
    SpillExistsError,
    SpillWriteError,
    check_chunk_options,
    mark_spill_complete,
    mark_spill_partial,
    raise_if_locked,
)

__all__ = ["EmptyEvaluationError", "Evaluator", "IncompleteEvaluationError"]


class EmptyEvaluationError(ValueError):
    """finalize() was called before any sample was evaluated."""


class Evaluator:
    """Memory-bounded evaluation into a spill directory; see the module docstring for the loop.

    Arguments besides the metrics and the tokenizer (which text metrics decode with, saved in the spill):
        task, shift: "causal_lm" (logits[:, t] predicts labels[:, t + 1]), "seq2seq" (no shift) or "generation".
        keep_logprob: spill each supervised token's log-probability (default: when a metric needs them).
        dataset_length: the number of samples every `sample_index` must cover; `finalize()` refuses a subset
            (`spilleval.accounting`). None: the samples seen are the set.
        allow_repeats: in one process, a repeated sample index counts once instead of being an error.
        chunk_bytes, chunk_rows, commit_interval_s, compression: how the spill is cut and how often it commits
            (`spilleval.spill.writer`).
        resume: continue the spill of an evaluation that stopped (`spilleval.spill.resume`).
        metric_key_prefix: the prefix the caller reports metrics under (`SpillingTrainer`: "eval"), so that
            `results.json` holds them under the same keys.
        provenance: what the caller knows of what is evaluated (model, checkpoint, dataset), stored in
            `results.json` next to what the evaluator records itself (`spilleval.provenance`).
        extra: free-form values for the manifest.
        dist_timeout: seconds a rank waits for the others before naming the ones that did not finish.
        corpus_workers: processes for the corpus metrics' passes over the spill in `finalize()` (the map/merge of
            `spilleval compute --workers`; the same bits for any number).
    """

    def __init__(
        self,
        spill_dir: str | os.PathLike,
        metrics: Iterable[MetricSpec] = ("token_accuracy",),
        *,
        tokenizer: Any = None,
        task: str = "causal_lm",
        shift: bool | None = None,
        keep_logprob: bool | None = None,
        dataset_length: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        chunk_rows: int | None = None,
        commit_interval_s: float | None = DEFAULT_COMMIT_INTERVAL_S,
        compression: str | None = "zstd",
        reduce_chunk_bytes: int = DEFAULT_REDUCE_CHUNK_BYTES,
        resume: bool = False,
        extra: dict[str, Any] | None = None,
        dist_timeout: float = DEFAULT_TIMEOUT_S,
        allow_repeats: bool = False,
        metric_key_prefix: str | None = None,
        provenance: dict[str, Any] | None = None,
        confidence_resamples: int = DEFAULT_RESAMPLES,
        confidence_seed: int = DEFAULT_SEED,
        corpus_workers: int = 1,
    ) -> None:
        self.clock = RunClock()
        self.corpus_workers = corpus_workers
        self.spill_dir = Path(spill_dir)
        self.suite = MetricSuite(metrics, tokenizer=tokenizer)
        self.suite.reset()  # metric objects may be reused across evaluations; a resume replays into fresh states
        self.tokenizer = tokenizer
        self.task = task
        self.shift = (task == "causal_lm") if shift is None else shift
        self.keep_logprob = self.suite.needs_logprob if keep_logprob is None else keep_logprob
        # each sample's summed log-probability (8 bytes a sample) whenever the log-probs are computed anyway
        self.computes_nll = self.keep_logprob or self.suite.needs_sample_nll
        self.suite.check(has_logprob=self.keep_logprob, task=task)
        self.dataset_length = dataset_length
        check_chunk_options(chunk_bytes, chunk_rows, commit_interval_s)  # before any forward pass
        self.chunk_bytes, self.chunk_rows, self.compression = chunk_bytes, chunk_rows, compression
        self.commit_interval_s = commit_interval_s  # a crash loses at most this much work (`spilleval.spill.writer`)
        self.reduce_chunk_bytes = reduce_chunk_bytes
        self.resume = resume
        self.extra = dict(extra or {})
        self.metric_key_prefix = metric_key_prefix
        if metric_key_prefix:  # `spilleval compute --json` reports recomputed metrics under the same keys
            self.extra["metric_key_prefix"] = metric_key_prefix
        self.provenance = dict(provenance or {})
        check_resamples(confidence_resamples)
        self.confidence_resamples, self.confidence_seed = confidence_resamples, confidence_seed
        self.rank, self.world_size = process_group()
        self._writer: SpillWriter | None = None
        self._next_index = 0
        self._loss_sum = 0.0
        self._in_flight: tuple[PendingHostCopy, int, Any, Any] | None = None
        self._finalized = self._aborted = False
        self._committed = CommittedSamples()
        # streaming metrics count a sample once, as the reader does; one process has no sampler padding to repeat one
        self._first_seen = FirstSeen(allow_repeats=allow_repeats or self.world_size > 1)
        # a collective: every rank constructs its Evaluator (see spilleval.distributed)
        self._coordinator = Coordinator(self.spill_dir, timeout=dist_timeout) if self.world_size > 1 else None
        try:
            if dataset_length == 0:
                raise EmptyEvaluationError("the eval dataset is empty (dataset_length=0): nothing to evaluate.")
            if (self.spill_dir / MANIFEST_NAME).exists():
                raise_if_locked(self.spill_dir, self.rank)  # another live writer: name it, whatever `resume` says
                if not resume and self.rank == 0:
                    raise SpillExistsError(
                        f"{self.spill_dir} already holds a spill. spilleval never overwrites one: choose a new "
                        "spill_dir, delete this one, or pass resume=True to continue it."
                    )
                if resume:
                    self._resume()
        except BaseException as error:
            self.abort(error)
            raise

    # ------------------------------------------------------------------------------------------- per batch
    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        sample_index: torch.Tensor | np.ndarray | list[int] | None = None,
        *,
        columns: dict[str, list[Any]] | None = None,
        arrays: dict[str, Any] | None = None,
    ) -> ReducedBatch:
        """Reduce one batch of logits on their device and hand the ids to the spill writer.

        `columns` are per-sample dataset values stored next to the predictions (e.g. `{"references": [...]}`);
        `arrays` are fixed-shape per-sample arrays (e.g. `{"class_scores": probs}`), stored in zarr.
        Rows an earlier run already committed (`resume=True`) are dropped; returns None when that is all of them.
        """
        index = self._sample_index(sample_index, logits.shape[0])
        if len(self._committed) and self.committed(index).all():
            return None
        reduced = reduce_logits(
            logits,
            labels,
            shift=self.shift,
            sample_index=index,
            keep_logprob=self.computes_nll,
            chunk_bytes=self.reduce_chunk_bytes,
        )
        self._add(reduced, logits.shape[-1], columns, arrays)
        return reduced

    def add(self, batch: SampleBatch, *, vocab_size: int) -> None:
        """Add an already reduced batch (e.g. generated ids) through the same metrics and spill."""
        self._add(batch, vocab_size, None, None)

    def add_reduced(
        self,
        reduced: ReducedBatch,
        *,
        columns: dict[str, list[Any]] | None = None,
        arrays: dict[str, Any] | None = None,
    ) -> None:
        """Add a batch already reduced on its device (e.g. inside the loss call by `SpillingTrainer`).

        Log-probabilities it carries are spilled only when this evaluation keeps them; its loss sum always counts.
        """
        self._add(reduced, reduced.vocab_size, columns, arrays)

    # ------------------------------------------------------------------------------------------- the end
    def finalize(self) -> dict[str, float]:
        """Close the spill, compute streaming and corpus metrics, store them in results.json, return them."""
        if self._finalized:
            raise RuntimeError("finalize() was already called")
        self._finalized = True
        if self._coordinator is not None:
            try:
                return self._finalize_distributed(self._coordinator)
            except BaseException:
                self._coordinator.discard()  # destroys the gloo group if no collective ran on it yet
                raise
            finally:
                if self._writer is not None:
                    self._writer.release_lock()  # held until rank 0 had written results.json
        try:
            self._spill_in_flight()
        except BaseException:
            self.abort()
            raise
        if self._writer is None:
            raise EmptyEvaluationError(
                "no sample was evaluated: the eval dataset is empty (check its length and the dataloader)."
            )
        try:  # the shard stays locked until results.json is written: no second writer enters during finalize
            summary = self._writer.close(mark_complete=False, keep_lock=True)
            if summary.rows == 0:
                raise EmptyEvaluationError("no sample was evaluated: the eval dataset is empty.")
            self._mark_spill(self._first_seen.present)
            return self._compute_results()
        finally:
            self._writer.release_lock()

    def abort(self, error: BaseException | None = None) -> None:
        """Stop after an error; committed chunks stay readable as a partial spill.

        In a distributed evaluation the other ranks are told, and stop with an error naming this rank and `error`
        (default: the exception being handled, so `except ...: evaluator.abort(); raise` reports it).
        `with Evaluator(...) as evaluator:` calls this when the block raises.
        """
        if self._aborted:
            return
        self._aborted = self._finalized = True
        try:
            self._spill_in_flight()  # a batch already handed over is kept when it is sound
        except Exception:  # noqa: BLE001 - its own error, or the writer's; the error being handled matters
            pass
        if self._writer is not None:
            self._writer.abort()
        if self._coordinator is not None:
            self._tell_other_ranks(error if error is not None else sys.exc_info()[1])

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._finalized:
            self.abort(exc)

    # ------------------------------------------------------------------------------------------- distributed
    def _finalize_distributed(self, coordinator: Coordinator) -> dict[str, float]:
        """Close this rank's shard; then, with every rank: check that all finished, take the samples a lower rank
        also holds out of the streaming states (`spilleval.dedupe`), merge the states on rank 0, which marks the
        spill complete, runs the corpus metrics over the merged spill and sends the results to every rank."""
        try:
            self._spill_in_flight()
            if self._writer is not None:
                self._writer.close(mark_complete=False, keep_lock=True)  # rank 0: until results.json is written
        except BaseException as error:
            self._tell_other_ranks(error)
            raise
        coordinator.post(vocab_size=self._writer.manifest.vocab_size if self._writer is not None else None)
        statuses = coordinator.wait_for_all()
        if self._writer is None:  # this rank got no sample: an empty shard (on rank 0, the manifest)
            vocab_sizes = [s.vocab_size for s in statuses if s.vocab_size is not None]
            if not vocab_sizes:
                raise EmptyEvaluationError("no sample was evaluated on any rank: the eval dataset is empty.")
            self._open_writer(vocab_sizes[0]).close(mark_complete=False, keep_lock=True)
        assert self._writer is not None
        ownership = coordinator.sample_owners(self._first_seen.present)
        try:  # every rank sees the same `held`, so every rank raises alike when samples are missing
            if self.rank == 0:
                self._mark_spill(ownership.held)
            else:
                check_every_sample(ownership.held, self.dataset_length, self.spill_dir)
        except IncompleteEvaluationError:
            coordinator.close()  # no collective failed: the group is closed cleanly on every rank
            raise
        subtract_rows(self.suite, self._writer.shard_dir, ownership.foreign)
        states = coordinator.gather_to_root(self.suite.states())
        outcome = coordinator.broadcast_from_root(self._results_on_root(states) if self.rank == 0 else None)
        coordinator.close()  # joins the gloo threads: none may outlive the evaluation (`spilleval.distributed`)
        if "error" in outcome:
            if self.rank == 0:
                raise self._root_error
            raise DistributedEvaluationError(
                f"rank 0 failed computing the metrics of {self.spill_dir}: {outcome['error']}. Every shard is "
                f"complete: recompute with `spilleval compute {self.spill_dir}` once the cause is fixed."
            )
        return outcome["results"]

    def _results_on_root(self, states: list[Any]) -> dict[str, Any]:
        """Rank 0: merge every rank's streaming states and compute all metrics (the spill is complete)."""
        try:
            for state in states[1:]:
                self.suite.merge(state)
            return {"results": self._compute_results()}
        except Exception as error:  # noqa: BLE001 - reported to every rank, re-raised here
            self._root_error = error
            return {"error": f"{type(error).__name__}: {error}"}

    def _mark_spill(self, held: np.ndarray) -> None:
        """Mark the spill complete when the samples `held` cover the dataset; else partial, and raise
        `IncompleteEvaluationError` naming what is missing (`spilleval.accounting`)."""
        assert self._writer is not None
        try:
            check_every_sample(held, self.dataset_length, self.spill_dir)
        except IncompleteEvaluationError:
            mark_spill_partial(self.spill_dir, self._writer.manifest)
            raise
        mark_spill_complete(self.spill_dir, self._writer.manifest)

    def _tell_other_ranks(self, error: BaseException | None) -> None:
        """Post this rank's failure and give the others time to read it; never masks `error` itself."""
        assert self._coordinator is not None
        try:
            self._coordinator.post(error=error if error is not None else "aborted")
            self._coordinator.wait_quietly()
        except DistributedEvaluationError:
            pass
        self._coordinator.discard()
        if isinstance(error, Exception) and not isinstance(error, DistributedEvaluationError):
            error.add_note(
                f"spilleval: rank {self.rank} of {self.world_size} failed; the other ranks were told and stop too. "
                f"Committed chunks stay readable: SpillReader('{self.spill_dir}', allow_partial=True)."
            )

    def _compute_results(self) -> dict[str, float]:
        """Streaming results, then corpus metrics over the (complete) spill; stored in results.json with what
        produced them (`spilleval.provenance`)."""
        results = self.suite.compute_streaming()
        reader = SpillReader(self.spill_dir)
        if self.suite.corpus:
            results.update(self.suite.compute_corpus(reader, workers=self.corpus_workers))
        results = self.suite.in_order(results)
        record = {"metrics": prefixed(results, self.metric_key_prefix), "provenance": self._provenance(reader)}
        intervals = self._intervals(reader, results)
        if intervals:
            record["intervals"] = prefixed(intervals, self.metric_key_prefix)
        try:
            write_json_atomic(self.spill_dir / RESULTS_NAME, record, sort_keys=False)  # metrics in spec order
            seal(self.spill_dir)  # the seal (integrity.json) now covers the results too
        except OSError as e:
            raise SpillWriteError(
                f"could not write {RESULTS_NAME} ({e}); the spill itself is complete: free space or fix the "
                f"permissions, then recompute the metrics with `spilleval compute {self.spill_dir}`."
            ) from e
        return results

    def _intervals(self, reader: SpillReader, results: dict[str, Any]) -> dict[str, Any]:
        """95% confidence intervals (`spilleval.intervals`: a second pass over the spill), {} when turned off.

        They are a statistic about the metrics, not the metrics: when they cannot be computed the evaluation's
        results are still written, with a warning that says why."""
        if not self.confidence_resamples:
            return {}
        try:
            report = confidence_intervals(reader, self.suite.specs(), results=results,
                                          resamples=self.confidence_resamples, seed=self.confidence_seed,
                                          workers=self.corpus_workers)
        except Exception as e:  # noqa: BLE001 - see the docstring
            warnings.warn(f"spilleval: no confidence intervals for this evaluation ({type(e).__name__}: {e}); the "
                          f"metrics are written. Recompute them with `spilleval compute {self.spill_dir}`.",
                          stacklevel=3)
            return {}
        return report.to_json()

    def _provenance(self, reader: SpillReader) -> dict[str, Any]:
        """The caller's record (model, checkpoint, dataset) completed with the evaluation's own."""
        samples, fingerprint = eval_set_fingerprint(reader)
        dataset = {**self.provenance.get("dataset", {}), "samples": samples, "dataset_length": self.dataset_length,
                   "fingerprint": fingerprint}
        return {
            **self.provenance,
            "metric_key_prefix": self.metric_key_prefix,
            "dataset": dataset,
            "metrics": self.suite.specs(),
            "task": self.task,
            "world_size": self.world_size,
            "versions": reader.manifest.versions,
            "git": git_record(),
            "run": self.clock.record(),
        }

    @property
    def reader(self) -> SpillReader:
        return SpillReader(self.spill_dir)

    # ------------------------------------------------------------------------------------------- resume
    def committed(self, sample_index: Any) -> np.ndarray:
        """Boolean mask over `sample_index`: rows an earlier run already committed (skip their forward pass)."""
        if isinstance(sample_index, torch.Tensor):
            sample_index = sample_index.detach().cpu().numpy()
        return self._committed.contains(sample_index)

    @property
    def num_committed(self) -> int:
        """Samples this rank's earlier run(s) committed (0 unless resuming)."""
        return len(self._committed)

    def pending_indices(self) -> np.ndarray:
        """Dataset indices still to evaluate (needs dataset_length), e.g. for `torch.utils.data.Subset`."""
        if self.dataset_length is None:
            raise ValueError("pending_indices() needs dataset_length=...; otherwise use committed(sample_index)")
        return self._committed.pending(self.dataset_length)

    def _resume(self) -> None:
        """Continue the spill on disk: open its shard, replay what it committed through the streaming metrics."""
        writer = self._open_writer(load_manifest(self.spill_dir).vocab_size)
        self._committed = replay_shard(writer.shard_dir, writer.resumed_chunks, self._replay_batch)

    def _replay_batch(self, batch: SampleBatch) -> None:
        self._count(batch)
        if batch.sample_nll is not None:
            self._loss_sum += float(np.sum(batch.sample_nll, dtype=np.float64))
        elif batch.label_logprob is not None:
            self._loss_sum -= float(np.sum(batch.label_logprob, dtype=np.float64))

    @property
    def loss_sum(self) -> float:
        """-sum of label log-probabilities of the batches spilled so far: the eval loss numerator. The last batch
        added from the device counts once it is spilled (at the next batch, or at `finalize`)."""
        return self._loss_sum

    # ------------------------------------------------------------------------------------------- helpers
    def _add(self, batch, vocab_size: int, columns, arrays) -> None:
        """Drop rows committed by an earlier run, count the loss, spill (the writer thread updates the metrics).

        A batch on a GPU is copied to the host asynchronously and spilled one call later, when its copy is long
        done: the loop never waits for the GPU (`spilleval.reduce.ReducedBatch`). Its checks (label range,
        NaN/Inf) therefore raise at the next `update`/`add` or at `finalize`, before anything is lost.
        """
        if self._coordinator is not None:
            self._coordinator.raise_if_peer_failed()  # another rank failed: stop now, not at finalize
        checked_sample_index(batch.sample_index, len(batch), self.dataset_length)
        if len(self._committed):
            keep = ~self.committed(batch.sample_index)
            if not keep.any():
                return
            if not keep.all():
                batch, columns, arrays = keep_rows(batch, keep, columns, arrays)
        if isinstance(batch, ReducedBatch):
            if not self.keep_logprob:
                batch.label_logprob = None
            copy = batch.start_host_copy()
            self._spill_in_flight()
            self._in_flight = (copy, vocab_size, columns, arrays)
            if copy.event is None:  # a CPU batch: its copy is already done, nothing to overlap
                self._spill_in_flight()
            return
        self._spill_in_flight()
        self._write(batch, vocab_size, columns, arrays)

    def _spill_in_flight(self) -> None:
        """Spill the batch whose host copy is under way (checking it on the way: this may raise)."""
        if self._in_flight is None:
            return
        copy, vocab_size, columns, arrays = self._in_flight
        self._in_flight = None
        batch = copy.wait()
        self._loss_sum += copy.loss_sum
        self._write(batch, vocab_size, columns, arrays)

    def _write(self, batch, vocab_size: int, columns, arrays) -> None:
        writer = self._writer or self._open_writer(vocab_size)
        if int(vocab_size) != writer.manifest.vocab_size:
            raise ValueError(
                f"this batch has a vocabulary of {vocab_size} but the spill was started with "
                f"{writer.manifest.vocab_size}: every batch of one evaluation must come from the same model."
            )
        try:
            writer.write(batch, columns=columns, arrays=arrays)
        except SpillWriteError:
            self.abort()  # release the shard; what was committed stays readable, resume=True continues it
            raise

    def _open_writer(self, vocab_size: int) -> SpillWriter:
        self.suite.check(has_logprob=self.keep_logprob, vocab_size=vocab_size)
        manifest = Manifest(
            task=self.task,
            vocab_size=int(vocab_size),
            id_dtype=id_dtype_for_vocab(vocab_size).name,
            dataset_length=self.dataset_length,
            world_size=self.world_size,
            metrics=self.suite.specs(),
            has_logprob=self.keep_logprob,
            versions=library_versions(),
            extra=self.extra,
        )
        self._writer = SpillWriter(
            self.spill_dir,
            manifest,
            rank=self.rank,
            chunk_bytes=self.chunk_bytes,
            chunk_rows=self.chunk_rows,
            commit_interval_s=self.commit_interval_s,
            tokenizer=self.tokenizer,
            listeners=[self._count],
            compression=self.compression,
            resume=self.resume,
        )
        return self._writer

    def _count(self, batch: SampleBatch) -> None:
        """Update the streaming metrics with the rows whose sample this rank sees for the first time."""
        self.suite.update(self._first_seen.fresh(batch))

    def _sample_index(self, sample_index, batch_size: int) -> np.ndarray:
        if sample_index is not None:
            return checked_sample_index(sample_index, batch_size, self.dataset_length)
        if self.world_size > 1:
            raise ValueError(
                "sample_index is required in a distributed evaluation (each rank sees a different shard): pass the "
                "dataset indices of the batch's rows."
            )
        index = np.arange(self._next_index, self._next_index + batch_size, dtype=np.int64)
        self._next_index += batch_size
        return index
