"""Generation-mode evaluation (captioning, VQA): score what the model generates, not its teacher-forced argmax.

    trainer = SpillingTrainer(..., metrics=["token_accuracy"],
                              generation=GenerationEval(["bleu", "cider", "squad"], references_column="captions",
                                                        max_new_tokens=32, num_beams=1))

Per eval batch, `GenerationRun.add` builds the prompts, calls `model.generate` with the batch's other inputs
(images, pixel_values, ...), keeps the new ids of each sample up to its first end-of-sequence token, and spills
them with the reference ids (the labels) and the dataset's reference strings (`references_column`, one string or a
list per sample). The spill's rows are ragged on both sides: a generated row and its reference row have lengths
of their own (`SampleBatch.label_offsets`). Streaming text metrics update in the spill writer's thread; corpus
metrics (CIDEr, open-set answer F1) run over the spill at the end. Nothing but files grows with the eval set.

Prompts. A decoder-only model gets, per sample, the tokens before the first supervised label (labels in the
transformers convention, `labels[p] == input_ids[p]` where supervised), re-padded on the left as generation needs;
its output is stripped of the prompt when `generate` echoes it. An encoder-decoder model gets the encoder inputs as
they are; its output keeps the decoder start token, as `Seq2SeqTrainer(predict_with_generate=True)` returns it.

Layout. With `generation=...` an evaluation directory holds one spill per part, `<spill>/teacher_forced` and
`<spill>/generation` (task "generation"), and the generation metrics carry their own prefix (`eval_gen_bleu`).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .batch import IGNORE_INDEX, SampleBatch, id_dtype_for_vocab
from .evaluator import Evaluator
from .metrics.registry import build_metric
from .metrics.runner import GENERATION_TASK, MetricSpec, MetricSuite
from .spill.parts import GENERATION_PART, TEACHER_FORCED_PART

# batch keys that describe the teacher-forced target, never passed to generate
TARGET_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask", "decoder_position_ids", "position_ids")


class GenerationEval:
    """How to evaluate by generation. Keyword arguments besides those below go to `model.generate`.

    metrics: text metrics on the generated text (names or objects; default BLEU, ROUGE, SQuAD EM/F1). String names
        of metrics that take `references_column` get this evaluation's `references_column`.
    references_column: the dataset column with each sample's reference strings (str or list[str]); it is carried
        around the data collator and stored in the spill. None: the decoded labels are the single reference.
    max_new_tokens: the generation budget per sample.
    teacher_forced: also run the teacher-forced evaluation (the eval loss and the trainer's `metrics`) in the
        same pass; False skips that forward (no eval loss).
    prefix: metric keys read `<metric_key_prefix>_<prefix>_<name>`, e.g. `eval_gen_bleu`.
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] = ("bleu", "rouge", "squad"),
        *,
        references_column: str | None = None,
        max_new_tokens: int = 32,
        teacher_forced: bool = True,
        prefix: str = "gen",
        **generate_kwargs: Any,
    ) -> None:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if not prefix:
            raise ValueError("prefix must be non-empty: it keeps generation metrics apart from teacher-forced ones")
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("num_return_sequences must be 1: the spill holds one generated row per sample")
        self.metrics = [_with_references(spec, references_column) for spec in metrics]
        self.references_column = references_column
        self.max_new_tokens = max_new_tokens
        self.teacher_forced = teacher_forced
        self.prefix = prefix
        self.generate_kwargs = generate_kwargs

    def check(self, tokenizer: Any) -> None:
        """Fail at construction time when a metric cannot score generated text."""
        MetricSuite(self.metrics, tokenizer=tokenizer).check(has_logprob=False, task=GENERATION_TASK)

    def to_json(self) -> dict[str, Any]:
        """What the manifest records about this generation (values that are not JSON as their repr)."""
        kwargs = {k: v if _is_json(v) else repr(v) for k, v in self.generate_kwargs.items()}
        return {"max_new_tokens": self.max_new_tokens, "references_column": self.references_column, **kwargs}


def spill_parts(spill_dir: Path, generation: GenerationEval | None) -> dict[str, Path]:
    """The spill of each part of one evaluation: the directory itself without generation, else a sub-directory
    per part."""
    if generation is None:
        return {TEACHER_FORCED_PART: spill_dir}
    parts = {GENERATION_PART: spill_dir / GENERATION_PART}
    if generation.teacher_forced:
        parts = {TEACHER_FORCED_PART: spill_dir / TEACHER_FORCED_PART, **parts}
    return parts


def prediction_part(parts: dict[str, Path]) -> Path:
    """The spill whose ids stand for "the predictions" (`predict()`, a classic `compute_metrics`): the generated
    ids when generating, as `Seq2SeqTrainer(predict_with_generate=True)` gives them."""
    return parts.get(GENERATION_PART, parts.get(TEACHER_FORCED_PART))  # type: ignore[return-value]


class GenerationRun:
    """One generation evaluation: generate per batch, spill generated and reference ids, finalize the metrics."""

    def __init__(
        self,
        config: GenerationEval,
        spill_dir: str | os.PathLike,
        model: Any,
        *,
        tokenizer: Any = None,
        dataset_length: int | None = None,
        extra: dict[str, Any] | None = None,
        resume: bool = False,
        **spill_options: Any,
    ) -> None:
        """`spill_options` go to the `Evaluator`: chunk_bytes, chunk_rows, commit_interval_s, compression, and
        metric_key_prefix / provenance for results.json."""
        self.config = config
        model_config = model.config
        self.encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
        self.vocab_size = _vocab_size(model)
        generation_config = getattr(model, "generation_config", None)
        self.eos_token_ids = _ids(getattr(generation_config, "eos_token_id", None) or model_config.eos_token_id)
        self.pad_token_id = _pad_token_id(generation_config, model_config, self.eos_token_ids)
        self.evaluator = Evaluator(
            spill_dir,
            config.metrics,
            tokenizer=tokenizer,
            task=GENERATION_TASK,
            keep_logprob=False,
            dataset_length=dataset_length,
            extra={**(extra or {}), "generation": config.to_json()},
            resume=resume,
            **spill_options,
        )

    def committed(self, sample_index: torch.Tensor) -> bool:
        """True when an earlier, interrupted run (resume) already spilled every row of this batch."""
        return bool(self.evaluator.num_committed and self.evaluator.committed(sample_index).all())

    def add(self, model: Any, inputs: Mapping[str, Any], sample_index: torch.Tensor,
            references: Sequence[Any] | None = None) -> SampleBatch:
        """Generate for one batch (inputs on the model's device) and spill the result."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "generation evaluation needs `labels` in every eval batch: they give the reference ids and, for a "
                "decoder-only model, where each prompt ends (the first supervised position)."
            )
        generate_inputs = {k: v for k, v in inputs.items() if k not in TARGET_KEYS}
        prompt_width = None
        if not self.encoder_decoder:
            prompt, prompt_mask = left_padded_prompts(
                inputs["input_ids"], inputs.get("attention_mask"), labels, self.pad_token_id
            )
            generate_inputs.update(input_ids=prompt, attention_mask=prompt_mask)
            prompt_width = prompt.shape[1]
        kwargs = {"max_new_tokens": self.config.max_new_tokens, **self.config.generate_kwargs}
        with torch.no_grad():
            sequences = model.generate(**generate_inputs, **kwargs)
        if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate=True
            sequences = sequences.sequences
        if prompt_width is not None and echoes_prompt(sequences, generate_inputs["input_ids"]):
            sequences = sequences[:, prompt_width:]
        batch = self.sample_batch(sequences, labels, sample_index, references)
        self.evaluator.add(batch, vocab_size=self.vocab_size)
        return batch

    def sample_batch(self, sequences: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor,
                     references: Sequence[Any] | None) -> SampleBatch:
        """Generated rows (cut after the first end-of-sequence id) and reference rows as one ragged host batch."""
        keep = generated_mask(sequences, self.eos_token_ids, skip=1 if self.encoder_decoder else 0)
        supervised = labels != IGNORE_INDEX
        dtype = id_dtype_for_vocab(self.vocab_size)
        label_ids = labels[supervised]
        if len(label_ids) and (int(label_ids.min()) < 0 or int(label_ids.max()) >= self.vocab_size):
            raise ValueError(
                f"labels hold ids outside [0, {self.vocab_size}) other than {IGNORE_INDEX}: they are not token ids of "
                "this model. Mask ignored positions with -100."
            )
        columns = {}
        if self.config.references_column is not None:
            if references is None:
                raise ValueError(f"the batch carries no {self.config.references_column!r} column")
            columns[self.config.references_column] = list(references)
        return SampleBatch(
            sample_index=torch.as_tensor(sample_index).cpu().numpy(),
            offsets=_offsets(keep.sum(1)),
            label_offsets=_offsets(supervised.sum(1)),
            pred_ids=sequences[keep].cpu().numpy().astype(dtype),
            label_ids=label_ids.cpu().numpy().astype(dtype),
            columns=columns,
        )

    def finalize(self) -> dict[str, float]:
        """The generation metrics, keys prefixed with `<prefix>_` (the spill's results.json keeps plain names)."""
        return {f"{self.config.prefix}_{k}": v for k, v in self.evaluator.finalize().items()}

    def abort(self) -> None:
        self.evaluator.abort()


# ----------------------------------------------------------------------------------------------- tensors
def left_padded_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, attention mask), left-padded: each row's attended tokens before its first supervised label.

    Works on right- or left-padded batches alike; a row without supervised labels is all prompt.
    """
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    supervised = (labels != IGNORE_INDEX) & attended
    first_label = torch.where(
        supervised.any(1), torch.where(supervised, positions, input_ids.shape[1]).amin(1), input_ids.shape[1]
    )
    in_prompt = attended & (positions < first_label[:, None])
    lengths = in_prompt.sum(1)
    width = int(lengths.max()) if len(lengths) else 0
    # the k-th prompt token of row i goes to column width - length_i + k
    column = width - lengths[:, None] + in_prompt.long().cumsum(1) - 1
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    prompt = input_ids.new_full((input_ids.shape[0], width), pad_token_id)
    mask = torch.zeros((input_ids.shape[0], width), dtype=torch.long, device=input_ids.device)
    prompt[rows[in_prompt], column[in_prompt]] = input_ids[in_prompt]
    mask[rows[in_prompt], column[in_prompt]] = 1
    return prompt, mask


def echoes_prompt(sequences: torch.Tensor, prompt: torch.Tensor) -> bool:
    """True when `generate` returned prompt + new tokens (input_ids given), False for new tokens only
    (`inputs_embeds`, as LLaVA-style models generate)."""
    width = prompt.shape[1]
    return sequences.shape[1] >= width and bool(torch.equal(sequences[:, :width], prompt))


def generated_mask(sequences: torch.Tensor, eos_token_ids: Sequence[int], *, skip: int = 0) -> torch.Tensor:
    """Boolean [B, T]: each row's ids up to and including its first end-of-sequence id at position >= skip.

    After it, `generate` only pads; an unfinished row is kept whole. `skip` protects an encoder-decoder's decoder
    start token (BART starts with </s>).
    """
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    if not eos_token_ids:
        return torch.ones_like(sequences, dtype=torch.bool)
    eos = torch.isin(sequences, torch.tensor(list(eos_token_ids), device=sequences.device)) & (positions >= skip)
    end = torch.where(eos.any(1), torch.where(eos, positions, sequences.shape[1]).amin(1) + 1, sequences.shape[1])
    return positions < end[:, None]


# ----------------------------------------------------------------------------------------------- helpers
def _offsets(lengths: torch.Tensor) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths.cpu().numpy(), out=offsets[1:])
    return offsets


def _vocab_size(model: Any) -> int:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "out_features", None):
        return int(output.out_features)
    return int(model.config.get_text_config(decoder=True).vocab_size)


def _ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def _pad_token_id(generation_config: Any, model_config: Any, eos_token_ids: list[int]) -> int:
    """The id prompts are left-padded with: generation config, model config, else end-of-sequence (as generate)."""
    for candidate in (getattr(generation_config, "pad_token_id", None), getattr(model_config, "pad_token_id", None)):
        if _ids(candidate):
            return _ids(candidate)[0]
    if eos_token_ids:
        return eos_token_ids[0]
    raise ValueError("generation needs a pad token id to left-pad prompts: set model.generation_config.pad_token_id")


def _with_references(spec: MetricSpec, column: str | None) -> MetricSpec:
    """A metric name becomes {"name", "params": {"references_column": column}} when its class takes one."""
    if column is None or not isinstance(spec, str):
        return spec
    cls = type(build_metric(spec))
    if "references_column" not in inspect.signature(cls.__init__).parameters:
        return spec
    return {"name": spec, "params": {"references_column": column}}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
