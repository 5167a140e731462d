"""SpillingTrainer(resume=True): an evaluation that crashed mid-way finishes with the uninterrupted metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from spilleval import SpillReader
from spilleval.testing import encode_qa, pad_batch, qa_examples
from spilleval.trainer import SpillingTrainer

METRICS = ["token_accuracy", "sequence_exact_match", "nll", "text_match", "answer_macro_f1"]
EXACT = ["eval_token_accuracy", "eval_sequence_exact_match", "eval_nll", "eval_perplexity", "eval_bit_match_accuracy",
         "eval_exact_match_accuracy", "eval_answer_macro_f1"]


class CrashAfter(TrainerCallback):
    """Raise after `steps` prediction steps: the evaluation dies with part of its spill committed."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_prediction_step(self, args, state, control, **kwargs):
        self.steps -= 1
        if self.steps == 0:
            raise RuntimeError("simulated crash")


def args(tmp_path: Path) -> TrainingArguments:
    return TrainingArguments(str(tmp_path / "out"), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", logging_strategy="no")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far slower when torch threads oversubscribe the CI's two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_trainer_resume_skips_committed_batches_and_equals_the_uninterrupted_run(trained_model, tokenizer, tmp_path):
    model = trained_model  # partly right, partly wrong: no metric sits at 0 or 1
    data = [encode_qa(example, tokenizer) for example in qa_examples(20, seed=4)]

    def trainer(out: Path, **kwargs: Any) -> SpillingTrainer:
        return SpillingTrainer(model=model, args=args(out), eval_dataset=data, data_collator=pad_batch,
                               processing_class=tokenizer, metrics=METRICS, spill_dir=out / "spill", **kwargs)

    whole = trainer(tmp_path / "whole").evaluate()
    crashing = trainer(tmp_path / "crashed", callbacks=[CrashAfter(3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.evaluate()
    assert len(SpillReader(tmp_path / "crashed" / "spill", allow_partial=True)) == 9

    forwards: list[int] = []
    hook = model.register_forward_hook(lambda module, inputs, output: forwards.append(1))
    try:
        resumed = trainer(tmp_path / "crashed", resume=True).evaluate()
    finally:
        hook.remove()  # the model is shared by other tests
    assert len(forwards) == 7 - 3  # 20 samples in batches of 3: the 3 committed batches are not run again
    assert all(0 < whole[k] < 1 for k in ("eval_token_accuracy", "eval_exact_match_accuracy", "eval_answer_macro_f1"))
    assert {k: resumed[k] for k in EXACT} == {k: whole[k] for k in EXACT}
    assert len(SpillReader(tmp_path / "crashed" / "spill")) == 20
