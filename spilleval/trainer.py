"""`SpillingTrainer`: `transformers.Trainer` with exact, memory-bounded evaluation. Change one import:

    from spilleval import SpillingTrainer as Trainer
    trainer = Trainer(model, args, ..., metrics=["token_accuracy", "text_match", "answer_macro_f1"])

Per eval batch, on the device: the labels the model's loss saw are captured (`spilleval.capture`), the logits are
reduced to token ids (`reduce_logits`, inside the loss call for causal LMs), the ids go to the spill writer (whose
thread updates the streaming metrics), and the logits, hidden states, attentions and caches are dropped. At the end,
corpus metrics run over the spill. Nothing on the host or the device grows with the number of eval samples.

Only `prediction_step` and `evaluation_loop` change; `Trainer.evaluation_loop` still drives the loop (model
preparation, callbacks), it just receives no logits and no losses to keep. `eval_loss` is the exact token-weighted
cross-entropy of the labels the loss saw (the `loss` metric, from each sample's summed log-probability in the spill):
unlike transformers' own (a mean of per-batch means, scaled by the number of processes under DDP), it does not depend
on the batch size, the padding of the last batch or the world size.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Trainer
from transformers.trainer_pt_utils import find_batch_size, nested_detach
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction, has_length

from . import compat
from .batch import IGNORE_INDEX
from .capture import LabelFn, LossCapture, find_logits, reduce_aligned, resolve_labels
from .evaluator import Evaluator
from .generation import (
    GENERATION_PART,
    TEACHER_FORCED_PART,
    GenerationEval,
    GenerationRun,
    prediction_part,
    spill_parts,
)
from .intervals import DEFAULT_RESAMPLES
from .loggers import SampleLoggingCallback, check_sample_logging
from .metrics.registry import build_metrics
from .metrics.runner import MetricSpec, MetricSuite
from .provenance import checkpoint_step, hf_dataset_fingerprint, model_record
from .spill import SpillReader
from .spill.writer import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_COMMIT_INTERVAL_S,
    SpillExistsError,
)

logger = logging.getLogger(__name__)

INDEX_KEY = "spilleval_index"  # the dataset index of each row, added by the eval dataloader, removed before forward
DEFAULT_SPILL_DIR = "spill-{prefix}-step-{step}"  # under args.output_dir


class SpillPredictionOutput(NamedTuple):
    """What `SpillingTrainer.predict()` returns: `PredictionOutput`'s fields, with a lazy reader for predictions.

    `predictions` is a `SpillReader` over the spill (predicted and label ids of every sample, read in bounded memory:
    `iter_batches()`, `get(i)`, `table()`); `label_ids` is None because the labels are in the same reader.
    With `generation=...` it reads the generation spill (generated and reference ids).
    """

    predictions: SpillReader
    label_ids: None
    metrics: dict[str, float]

    @property
    def reader(self) -> SpillReader:
        return self.predictions


@dataclass
class _Forward:
    """One eval forward: the loss `Trainer` reports, the outputs, and what the loss computation did."""

    loss: torch.Tensor | None
    outputs: Any
    trainer_loss_took_labels: bool = False  # compute_loss took the labels (label smoothing, compute_loss_func)
    num_items_in_batch: Any = None  # passed to the model's loss (transformers >= 4.57)


class SpillingTrainer(Trainer):
    """A drop-in `transformers.Trainer` whose evaluation spills reduced ids instead of keeping logits.

    Extra arguments:
        metrics: metric names or objects (default: token accuracy); results carry the usual `eval_` prefix.
        spill_dir: where each evaluation spills. Default `<output_dir>/spill-{prefix}-step-{step}`, a fresh directory
            per evaluation (a numeric suffix is added rather than overwriting one). A path may use `{prefix}` and
            `{step}`; a path without them can serve one evaluation only and is never overwritten.
        label_fn: `label_fn(inputs, outputs) -> labels` aligned with `outputs.logits`, for models whose processed
            labels are neither returned nor passed to `self.loss_function` (see `spilleval.capture`).
        trust_batch_labels: use the batch's raw labels (of the logits' shape) without checking them against the
            model's own loss. Only for models whose loss the raw labels cannot reproduce (label smoothing or
            weighting inside forward) and which do not rewrite their labels.
        generation: a `GenerationEval`: also (or only) evaluate what `model.generate` produces, into
            `<spill_dir>/generation` (the teacher-forced spill moves to `<spill_dir>/teacher_forced`), metrics
            prefixed `eval_gen_` (see `spilleval.generation`). `compute_metrics` then gets the generated ids.
        resume: continue an evaluation that crashed: reuse its spill directory (`spill_dir` formatted, no numeric
            suffix), skip the forward pass of batches it committed, recompute their streaming metrics from the spill.
            The metrics, `eval_loss` included, equal an uninterrupted run's. Not yet with `generation`.
        chunk_bytes, chunk_rows, commit_interval_s: how the spill is cut into chunks and how often it commits,
            as `Evaluator` takes them (a crash loses at most `commit_interval_s` of evaluation, default 60 s).
        log_samples: after each evaluation, log its N worst samples (decoded, with per-sample scores) and the
            per-sample score histograms to the W&B run / TensorBoard writer of `report_to` (`spilleval.loggers`).
            0 (the default): off.

    `compute_metrics` still works: with `batch_eval_metrics=True` it is called per batch, as `Trainer` calls it;
    otherwise it is called once with the arrays `Trainer` would have built, read back from the spill: what
    `preprocess_logits_for_metrics` returned per batch (without it, the argmax ids stand in for the logits) and the
    labels, padded with -100, unshifted (`spilleval.compat`). Either way the labels are the aligned ones when the model
    rewrites its labels.
    `predict()` returns a `SpillPredictionOutput`: the metrics and a lazy reader instead of arrays.
    """

    def __init__(
        self,
        *args: Any,
        metrics: Iterable[MetricSpec] = ("token_accuracy",),
        spill_dir: str | os.PathLike | None = None,
        label_fn: LabelFn | None = None,
        trust_batch_labels: bool = False,
        generation: GenerationEval | None = None,
        resume: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        chunk_rows: int | None = None,
        commit_interval_s: float | None = DEFAULT_COMMIT_INTERVAL_S,
        confidence_resamples: int = DEFAULT_RESAMPLES,
        log_samples: int = 0,
        **kwargs: Any,
    ) -> None:
        # before Trainer builds the report_to callbacks, whose error for a missing library does not name the extra
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        check_sample_logging(getattr(training_args, "report_to", None), log_samples)
        super().__init__(*args, **kwargs)
        if log_samples:
            self.add_callback(SampleLoggingCallback.for_trainer(self, log_samples))
        self.spill_resume = resume
        self.spill_options = {"chunk_bytes": chunk_bytes, "chunk_rows": chunk_rows,
                              "commit_interval_s": commit_interval_s, "confidence_resamples": confidence_resamples}
        self.spill_metrics = list(metrics)
        self.spill_dir = spill_dir
        self.label_fn = label_fn
        self.trust_batch_labels = trust_batch_labels
        self.generation = generation
        self.last_spill_dir: Path | None = None
        self._session: _EvalSession | None = None
        self._loaded_checkpoint: str | None = None  # set when load_best_model_at_end loads the best checkpoint
        suite = MetricSuite(self.spill_metrics, tokenizer=self._spill_tokenizer())
        suite.check(has_logprob=True)
        # dataset columns the metrics read (spilled with each row) -> the metrics that read them
        self._metric_columns = {c: [m.name for m in suite.metrics if c in m.needs_columns]
                                for c in suite.reads()["columns"]}
        if generation is not None:
            generation.check(self._spill_tokenizer())
            if not generation.teacher_forced and self.compute_metrics is not None and self.args.batch_eval_metrics:
                raise ValueError(
                    "batch_eval_metrics=True calls compute_metrics with each batch's teacher-forced outputs, which "
                    "GenerationEval(teacher_forced=False) does not compute: keep teacher_forced=True, or use a "
                    "classic compute_metrics(eval_pred), which gets the generated ids."
                )
        self._check_spill_dir_template()

    # ------------------------------------------------------------------------------------------- dataloaders
    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            return super().get_eval_dataloader(eval_dataset)  # raises transformers' own error
        dataset = indexed(dataset)
        with self._index_carrying_collator(dataset):
            return super().get_eval_dataloader(dataset)

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        dataset = indexed(test_dataset)
        with self._index_carrying_collator(dataset):
            return super().get_test_dataloader(dataset)

    @contextmanager
    def _index_carrying_collator(self, dataset: torch.utils.data.Dataset) -> Iterator[None]:
        """Let INDEX_KEY (and the generation's references column) through `remove_unused_columns` and the user's
        collator, for the dataloader built inside.

        The index travels as a numpy array: the dataloader leaves it on the host, so reading it never waits for the
        GPU. An iterable dataset's batches are dispatched by accelerate (rank 0 reads, concatenates and slices them
        for every rank), which carries tensors only: there the index is a tensor."""
        self._set_signature_columns_if_needed()
        carried = self._carried_columns()
        for name in (INDEX_KEY, *carried):
            if name not in self._signature_columns:
                self._signature_columns.append(name)
        user_collator = self.data_collator
        self.data_collator = IndexCarryingCollator(
            user_collator, carry=carried, index_as_tensor=isinstance(dataset, IndexedIterableDataset)
        )
        try:
            yield
        finally:
            self.data_collator = user_collator

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """`Trainer.evaluation_loop` with a spilling `prediction_step`; the spilled metrics (`eval_loss` among them)
        join its own (runtime, samples per second)."""
        spill_dir = self._new_spill_dir(metric_key_prefix)
        parts = spill_parts(spill_dir, self.generation)
        session = self._open_session(parts, dataloader, metric_key_prefix)
        self._session = session
        try:
            with session.capture:
                output = super().evaluation_loop(
                    dataloader, description, prediction_loss_only=False, ignore_keys=ignore_keys,
                    metric_key_prefix=metric_key_prefix,
                )
        except BaseException:
            session.abort()
            raise
        finally:
            self._session = None
        results = session.finalize()
        self.last_spill_dir = spill_dir
        results.update(self._user_metrics(session, prediction_part(parts), results))
        metrics = dict(output.metrics or {})
        for key, value in results.items():
            metrics[key if key.startswith(f"{metric_key_prefix}_") else f"{metric_key_prefix}_{key}"] = value
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=output.num_samples)

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        """Forward, capture the aligned labels, reduce and spill; only the loss goes back to the loop."""
        session = self._session
        if session is None:  # called outside SpillingTrainer's evaluation loop
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        index = session.sample_index(inputs)
        session.step += 1
        evaluator = session.evaluator
        # each part skips a batch it committed before a crash (resume=True); no part: no forward, no generate
        forward_done = evaluator is None or bool(evaluator.num_committed and evaluator.committed(index).all())
        generated = session.generation is None or session.generation.committed(index)
        if forward_done and generated:
            return (None, None, None)
        carried = {k: inputs[k] for k in session.carried if k in inputs}
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != INDEX_KEY and k not in carried})
        if not generated:
            references = carried.get(session.generation.config.references_column)
            session.generation.add(self.accelerator.unwrap_model(model), inputs, index, references)
        if forward_done:
            return (None, None, None)
        columns = {k: carried[k] for k in self._metric_columns if k in carried}
        self._teacher_forced_step(session, model, inputs, index, ignore_keys, columns)
        return (None, None, None)  # eval_loss comes from the spill, exact (`loss` metric): Trainer keeps no losses

    def _teacher_forced_step(
        self, session: "_EvalSession", model: torch.nn.Module, inputs: dict[str, Any], index: torch.Tensor,
        ignore_keys: list[str] | None, columns: dict[str, list[Any]],
    ) -> None:
        """Forward, resolve the labels the loss saw, reduce and spill (with the dataset `columns` metrics read)."""
        evaluator = session.evaluator
        session.capture.start_batch(index)
        forward = self._forward(model, inputs)
        logits = find_logits(forward.outputs)
        replicas = model.device_ids if isinstance(model, torch.nn.DataParallel) else None
        call = session.capture.batch_call(replicas)
        aligned = resolve_labels(
            forward.outputs, logits, inputs,
            loss_call=call,
            label_fn=self.label_fn,
            shift=session.shift,
            label_name=self.label_names[0] if self.label_names else "labels",
            loss_calls=session.capture.num_calls,
            trainer_loss_took_labels=forward.trainer_loss_took_labels,
            trust_batch_labels=self.trust_batch_labels,
        )
        if aligned.source == "loss_function" and call is not None and call.reduced is not None:
            reduced = call.reduced  # reduced inside the loss call, from the same logits and labels
        else:
            reduced = reduce_aligned(
                logits, aligned, sample_index=index, keep_logprob=evaluator.keep_logprob, nll=evaluator.computes_nll,
                chunk_bytes=evaluator.reduce_chunk_bytes, num_items_in_batch=forward.num_items_in_batch,
            )
        labels = aligned.unshifted()
        if session.records_for_compute_metrics:
            columns |= self._compute_metrics_columns(session, forward, logits, labels, inputs, ignore_keys)
        evaluator.add_reduced(reduced, columns=columns or None)
        if self.compute_metrics is not None and self.args.batch_eval_metrics:
            self._batch_compute_metrics(session, forward, labels, inputs, ignore_keys)

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> SpillPredictionOutput:  # type: ignore[override]
        """Evaluate `test_dataset` into a spill; returns its metrics and a lazy `SpillReader` (no arrays)."""
        output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        assert self.last_spill_dir is not None
        reader = SpillReader(prediction_part(spill_parts(self.last_spill_dir, self.generation)))
        return SpillPredictionOutput(reader, None, output.metrics or {})

    # ------------------------------------------------------------------------------------------- helpers
    def _forward(self, model: torch.nn.Module, inputs: dict[str, Any]) -> "_Forward":
        """The forward `Trainer.prediction_step` runs: through `compute_loss` when the batch has labels.

        `compute_loss` gets a copy of `inputs`: with label smoothing or `compute_loss_func` it pops the labels for
        its own loss, and those are then the labels the loss saw (`trainer_loss_took_labels`).
        """
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        with torch.no_grad(), self.compute_loss_context_manager():
            if not has_labels:
                return _Forward(None, model(**inputs))
            loss_inputs = dict(inputs)
            count_items = getattr(self, "_get_num_items_in_batch", None)  # transformers >= 4.57
            num_items = None if count_items is None else count_items([inputs], self.args.device)
            if num_items is None:
                loss, outputs = self.compute_loss(model, loss_inputs, return_outputs=True)
            else:
                loss, outputs = self.compute_loss(model, loss_inputs, return_outputs=True, num_items_in_batch=num_items)
        took = any(k in inputs and k not in loss_inputs for k in self.label_names)
        return _Forward(loss.detach().mean(), outputs, trainer_loss_took_labels=took, num_items_in_batch=num_items)

    def _compute_metrics_columns(
        self, session: "_EvalSession", forward: "_Forward", logits: torch.Tensor, labels: torch.Tensor,
        inputs: dict[str, Any], ignore_keys: list[str] | None,
    ) -> dict[str, list[Any]]:
        """This batch's share of a classic compute_metrics' arrays, spilled as per-sample columns (`spilleval.compat`).
        Without preprocess_logits_for_metrics the argmax ids stand in for the logits, which are never kept."""
        if self.preprocess_logits_for_metrics is None:
            predictions = logits.argmax(dim=-1)
        else:
            outputs = _predictions_like_trainer(forward.outputs, ignore_keys, self.model)
            predictions = self.preprocess_logits_for_metrics(outputs, labels)
        include = getattr(self.args, "include_for_metrics", None) or []
        main_input = getattr(self.model, "main_input_name", "input_ids")
        columns = compat.batch_columns(
            predictions, labels, step=session.step, rank=self.args.process_index,
            loss=forward.loss, inputs=inputs.get(main_input) if "inputs" in include else None,
        )
        session.metrics_columns.update(columns)
        return columns

    def _user_metrics(self, session: "_EvalSession", spill_dir: Path, spilled: dict[str, Any]) -> dict[str, Any]:
        """What `compute_metrics` reports: the closure's last result, or one call on the arrays `Trainer` would have
        built, read back from the spill (`spilleval.compat`)."""
        if self.compute_metrics is None or self.args.prediction_loss_only:
            return {}
        if self.args.batch_eval_metrics:
            found = dict(session.batch_metrics or {})
        elif session.records_for_compute_metrics:
            prediction = compat.eval_prediction(
                SpillReader(spill_dir), sorted(session.metrics_columns),
                concat_batches=self.args.eval_do_concat_batches,
                include=getattr(self.args, "include_for_metrics", None) or [],
            )
            found = compat.call_compute_metrics(self.compute_metrics, prediction,
                                                substituted_argmax=self.preprocess_logits_for_metrics is None)
            found = dict(found or {})
        else:  # generated ids, as Seq2SeqTrainer(predict_with_generate=True) gives them
            found = dict(self.compute_metrics(EvalPrediction(*padded_ids(SpillReader(spill_dir)))) or {})
        clash = sorted(set(found) & set(spilled))
        if clash:
            logger.warning("compute_metrics and spilleval metrics both report %s; compute_metrics' values are "
                           "kept (spilleval's are in %s/results.json).", ", ".join(clash), spill_dir)
        return found

    def _batch_compute_metrics(
        self, session: "_EvalSession", forward: "_Forward", labels: torch.Tensor, inputs: dict[str, Any],
        ignore_keys: list[str] | None,
    ) -> None:
        """Call a `batch_eval_metrics` closure as `Trainer` does (padded across processes, through
        `preprocess_logits_for_metrics`, gathered), with the aligned labels instead of the raw ones."""
        include = getattr(self.args, "include_for_metrics", None) or []
        labels = self.accelerator.pad_across_processes(labels, dim=1, pad_index=IGNORE_INDEX)
        predictions = _predictions_like_trainer(forward.outputs, ignore_keys, self.model)
        predictions = self.accelerator.pad_across_processes(predictions, dim=1, pad_index=IGNORE_INDEX)
        if self.preprocess_logits_for_metrics is not None:
            predictions = self.preprocess_logits_for_metrics(predictions, labels)
        losses = None
        if forward.loss is not None and "loss" in include:
            losses = self.gather_function(forward.loss.repeat(self.args.eval_batch_size))
        prediction = EvalPrediction(
            predictions=self.gather_function(predictions),
            label_ids=self.gather_function(labels),
            losses=losses,
            inputs=inputs if "inputs" in include else None,
        )
        is_last = self.accelerator.gradient_state.end_of_dataloader
        result = self.compute_metrics(prediction, compute_result=is_last)
        if is_last:
            session.batch_metrics = dict(result or {})

    def _open_session(self, parts: dict[str, Path], dataloader: Any, prefix: str) -> "_EvalSession":
        session = _EvalSession(evaluator=None, capture=nullcontext(), shift=False, carried=self._carried_columns())
        provenance = self._provenance(dataloader)
        if TEACHER_FORCED_PART in parts:
            session = self._open_teacher_forced(parts[TEACHER_FORCED_PART], dataloader, prefix, provenance)
        if GENERATION_PART in parts:
            try:
                session.generation = GenerationRun(
                    self.generation, parts[GENERATION_PART], self.accelerator.unwrap_model(self.model),
                    tokenizer=self._spill_tokenizer(), dataset_length=self._expected_samples(dataloader),
                    extra=self._spill_extra(prefix), resume=self.spill_resume, provenance=provenance,
                    metric_key_prefix=f"{prefix}_{self.generation.prefix}", **self.spill_options,
                )
            except BaseException:
                session.abort()
                raise
        return session

    def _open_teacher_forced(self, spill_dir: Path, dataloader: Any, prefix: str,
                             provenance: dict[str, Any]) -> "_EvalSession":
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        task = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal_lm"
        evaluator = Evaluator(
            spill_dir,
            self._teacher_forced_metrics(),
            tokenizer=self._spill_tokenizer(),
            task=task,
            dataset_length=self._expected_samples(dataloader),
            extra=self._spill_extra(prefix),
            resume=self.spill_resume,
            metric_key_prefix=prefix,
            provenance=provenance,
            **self.spill_options,
        )  # the Evaluator resets reused metric objects itself, before a resume replays into them
        capture = LossCapture(
            self.model, shift=evaluator.shift, keep_logprob=evaluator.keep_logprob,
            chunk_bytes=evaluator.reduce_chunk_bytes,
        )
        classic = self.compute_metrics is not None and not self.args.batch_eval_metrics and self.generation is None
        return _EvalSession(evaluator=evaluator, capture=capture, shift=evaluator.shift,
                            carried=self._carried_columns(),
                            records_for_compute_metrics=classic and not self.args.prediction_loss_only)

    def _provenance(self, dataloader: Any) -> dict[str, Any]:
        """What this evaluation evaluates, for results.json: the model and its weights' fingerprint, the step and
        the checkpoint whose weights were loaded (`load_best_model_at_end`), the eval set (`spilleval.provenance`)."""
        model = self.accelerator.unwrap_model(self.model)
        dataset = getattr(dataloader, "dataset", None)
        dataset = getattr(dataset, "dataset", dataset)  # inside IndexedDataset / IndexedIterableDataset
        return {
            "trainer": type(self).__name__,
            "model": model_record(model),
            "checkpoint": {
                "global_step": int(self.state.global_step),
                "epoch": self.state.epoch,
                "loaded_checkpoint": self._loaded_checkpoint,
                "loaded_checkpoint_step": checkpoint_step(self._loaded_checkpoint),
                "output_dir": self.args.output_dir,
            },
            "dataset": {"class": type(dataset).__name__, "hf_fingerprint": hf_dataset_fingerprint(dataset)},
        }

    def _load_best_model(self) -> None:
        """Trainer's own, remembered: the evaluations that follow run this checkpoint's weights, and say so."""
        super()._load_best_model()
        self._loaded_checkpoint = self.state.best_model_checkpoint

    def _teacher_forced_metrics(self) -> list[MetricSpec]:
        """The trainer's metrics and `loss`, which `eval_loss` reports: the exact token-weighted cross-entropy of the
        labels the loss saw, whatever the batches or the world size (`spilleval.metrics.token.TokenWeightedLoss`)."""
        names = {metric.name for metric in build_metrics(self.spill_metrics)}
        return self.spill_metrics if "loss" in names else [*self.spill_metrics, "loss"]

    def _expected_samples(self, dataloader: Any) -> int | None:
        """The dataset length every sample index must cover, so that finalize can check nothing was missed: unknown
        for an iterable dataset, and with `dataloader_drop_last=True`, which evaluates a subset on purpose."""
        dataset = getattr(dataloader, "dataset", None)
        if self.args.dataloader_drop_last or not has_length(dataset):
            return None
        return len(dataset)

    def _spill_extra(self, prefix: str) -> dict[str, Any]:
        return {"metric_key_prefix": prefix, "global_step": int(self.state.global_step), "trainer": "SpillingTrainer"}

    def _carried_columns(self) -> dict[str, str]:
        """Dataset columns the eval batches carry as python lists (not collated, not passed to the model): the
        generation's references and the columns the metrics read, each with what reads it (for a clear error)."""
        carried = {name: f"metric(s) {', '.join(names)} read" for name, names in self._metric_columns.items()}
        column = self.generation.references_column if self.generation is not None else None
        if column:
            carried[column] = (f"GenerationEval(references_column={column!r}) names (or set references_column=None "
                               "to score against the decoded labels)")
        return carried

    def _spill_tokenizer(self) -> Any:
        """The tokenizer to save with the spill and decode with: `processing_class` or a processor's tokenizer."""
        owner = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if owner is None or isinstance(owner, PreTrainedTokenizerBase):
            return owner
        return getattr(owner, "tokenizer", None)

    def _spill_dir_template(self) -> str:
        if self.spill_dir is None:
            return os.path.join(self.args.output_dir or ".", DEFAULT_SPILL_DIR)
        return os.fspath(self.spill_dir)

    def _check_spill_dir_template(self) -> None:
        template = self._spill_dir_template()
        evaluates_often = str(getattr(self.args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
        if evaluates_often and "{step}" not in template:
            raise ValueError(
                f"spill_dir={template!r} would be reused by every evaluation during training, and spilleval never "
                "overwrites a spill. Put '{step}' (and '{prefix}' for several eval sets) in it, e.g. "
                "spill_dir='runs/spill-{prefix}-step-{step}', or leave spill_dir unset."
            )

    def _new_spill_dir(self, prefix: str) -> Path:
        """A directory no spill has used yet; every rank gets the same one."""
        template = self._spill_dir_template()
        path = Path(template.format(prefix=prefix, step=self.state.global_step))
        if self.spill_resume:  # the interrupted evaluation's own directory
            return _same_on_every_rank(path)
        if "{" in template and self.args.process_index == 0:
            base, n = path, 1
            while path.exists():
                path, n = base.with_name(f"{base.name}-{n}"), n + 1
        elif path.exists() and any(path.iterdir()) and self.args.process_index == 0:
            raise SpillExistsError(
                f"spill_dir {path} already exists and spilleval never overwrites a spill: choose a new spill_dir "
                "or delete it."
            )
        return _same_on_every_rank(path)


# ----------------------------------------------------------------------------------------------- sessions
@dataclass
class _EvalSession:
    """The state of one evaluation: its engines (teacher-forced, generation), the loss capture, and a closure's
    final result."""

    evaluator: Evaluator | None  # None: generation only
    capture: LossCapture | Any
    shift: bool
    batch_metrics: dict[str, Any] | None = None
    generation: GenerationRun | None = None
    carried: dict[str, str] = field(default_factory=dict)  # carried dataset column -> what reads it
    records_for_compute_metrics: bool = False  # a classic compute_metrics reads its arrays back from this spill
    metrics_columns: set[str] = field(default_factory=set)  # the spill columns recorded for it
    step: int = -1  # the eval loop's step (batch number) of the batch being evaluated
    _next_index: int = field(default=0, repr=False)

    def finalize(self) -> dict[str, Any]:
        """Every part's results (generation keys prefixed); a failing part aborts the parts not yet finalized."""
        results: dict[str, Any] = {}
        try:
            if self.evaluator is not None:
                results.update(self.evaluator.finalize())
        except BaseException:
            if self.generation is not None:
                self.generation.abort()
            raise
        if self.generation is not None:
            results.update(self.generation.finalize())
        return results

    def abort(self) -> None:
        if self.evaluator is not None:
            self.evaluator.abort()
        if self.generation is not None:
            self.generation.abort()

    def sample_index(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The batch's dataset indices; a running count when the dataloader did not come from this trainer."""
        index = inputs.get(INDEX_KEY)
        if index is not None:  # on the host; a tensor index (iterable datasets) may have been moved to the device
            return torch.as_tensor(index).to("cpu", torch.int64).reshape(-1)
        engine = self.evaluator if self.evaluator is not None else self.generation.evaluator  # type: ignore[union-attr]
        if engine.world_size > 1:
            raise ValueError(
                "eval batches carry no dataset index (a custom get_eval_dataloader?): in a distributed evaluation "
                f"every row needs one. Keep SpillingTrainer's dataloader, or put the indices under {INDEX_KEY!r}."
            )
        size = find_batch_size(dict(inputs))
        start, self._next_index = self._next_index, self._next_index + int(size)
        return torch.arange(start, self._next_index, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- sample identity
class IndexedDataset(torch.utils.data.Dataset):
    """Each item carries its dataset index (under INDEX_KEY), so spilled rows map back to dataset rows."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return _with_index(self.dataset[i], i)


class IndexedIterableDataset(torch.utils.data.IterableDataset):
    """Index = `position * num_workers + worker_id`: the item's position in the stream that its dataloader worker
    yields, interleaved over the workers.

    Each worker of a `DataLoader` iterates its own copy of the dataset (which typically shards the stream with
    `get_worker_info()`), so a plain position would start at 0 in every worker and the workers' rows would look like
    repeats of each other. Without workers it is the position in the stream; with workers that split the stream
    round-robin (item i to worker i % num_workers) it is still the position in the whole stream.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        for position, item in enumerate(self.dataset):
            yield _with_index(item, position * workers + worker)


@dataclass
class IndexedItem:
    """A non-mapping dataset item and its index (mapping items get INDEX_KEY instead)."""

    index: int
    item: Any


def indexed(dataset: Any) -> torch.utils.data.Dataset:
    if isinstance(dataset, (IndexedDataset, IndexedIterableDataset)):
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return IndexedIterableDataset(dataset)
    return IndexedDataset(dataset)


def _with_index(item: Any, index: int) -> Any:
    return {**item, INDEX_KEY: index} if isinstance(item, Mapping) else IndexedItem(index, item)


class IndexCarryingCollator:
    """Take the index (and the carried columns) off each item, collate the rest with the user's collator, put the
    indices (a numpy array, or an int64 tensor with `index_as_tensor`) and the carried columns (python lists, e.g.
    reference strings) on the batch."""

    def __init__(self, collator: Callable[[list[Any]], Any], carry: Mapping[str, str] | None = None, *,
                 index_as_tensor: bool = False) -> None:
        self.collator = collator
        self.carry = dict(carry or {})  # column -> what reads it
        self.index_as_tensor = index_as_tensor

    def __call__(self, features: list[Any]) -> Any:
        index = [f.index if isinstance(f, IndexedItem) else f[INDEX_KEY] for f in features]
        plain = [f.item if isinstance(f, IndexedItem) else {k: v for k, v in f.items() if k != INDEX_KEY}
                 for f in features]
        carried = {name: [_take_column(f, name, reader) for f in plain] for name, reader in self.carry.items()}
        batch = self.collator(plain)
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"the data collator returned a {type(batch).__name__}; SpillingTrainer needs batches that are "
                "mappings (dict or BatchEncoding) to carry each row's dataset index."
            )
        batch[INDEX_KEY] = torch.tensor(index, dtype=torch.int64) if self.index_as_tensor else np.asarray(
            index, dtype=np.int64)
        batch.update(carried)
        return batch


def _take_column(item: Any, name: str, reader: str) -> Any:
    if not isinstance(item, dict) or name not in item:
        raise KeyError(
            f"an eval dataset item has no {name!r} column, which {reader}: give every eval item a value under that "
            "key."
        )
    return item.pop(name)




# ----------------------------------------------------------------------------------------------- compatibility
def _predictions_like_trainer(outputs: Any, ignore_keys: list[str] | None, model: Any) -> Any:
    """The `predictions` `Trainer.prediction_step` would give a closure: output values but the loss, detached."""
    if ignore_keys is None:
        config = getattr(model, "config", None)
        ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", None) or ["cache"])
    if isinstance(outputs, Mapping):
        values = tuple(v for k, v in outputs.items() if k not in ignore_keys + ["loss"])
    else:
        values = tuple(outputs[1:]) if isinstance(outputs[0], torch.Tensor) and outputs[0].dim() == 0 else tuple(outputs)
    values = nested_detach(values)
    return values[0] if len(values) == 1 else values


def padded_ids(reader: SpillReader) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, label_ids): `[samples, max supervised tokens]` int64, padded with -100, by sample index.

    This is what a classic `compute_metrics(eval_pred)` receives: token ids, never logits. It holds every sample's
    supervised ids in memory, as `compute_metrics` demands; spilleval metrics do not need it.
    """
    rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    for batch in reader.iter_batches(4096, with_arrays=False):
        for i, (pred, label) in enumerate(batch.rows()):
            rows.append((int(batch.sample_index[i]), pred, label))
    rows.sort(key=lambda r: r[0])
    width = max((max(len(p), len(lab)) for _, p, lab in rows), default=0)  # generated rows: either side longer
    preds = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for j, (_, pred, label) in enumerate(rows):
        preds[j, : len(pred)] = pred
        labels[j, : len(label)] = label
    return preds, labels


def _same_on_every_rank(path: Path) -> Path:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        holder = [str(path)]
        torch.distributed.broadcast_object_list(holder, src=0)
        return Path(holder[0])
    return path
