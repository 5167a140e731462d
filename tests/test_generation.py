"""Generation-mode evaluation against the references: `Seq2SeqTrainer(predict_with_generate=True)` for the ids,
sacrebleu / rouge-score / the SQuAD script / pycocoevalcap / scikit-learn for the metrics, and a LLaVA-style model
generating each sample alone for left padding with inserted image features.

Real parts only: config-built T5, BART and LLaVA-style Llama models, a real tokenizer, real spills, the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sacrebleu
import torch
from pycocoevalcap.cider.cider import Cider
from rouge_score.rouge_scorer import RougeScorer
from sklearn.metrics import f1_score
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    TrainingArguments,
)
from typer.testing import CliRunner

from spilleval import GenerationEval, SpillReader
from spilleval.cli import app
from spilleval.generation import GenerationRun
from spilleval.metrics.squad import exact_match_score, f1_score as squad_f1
from spilleval.metrics.translation import reference_streams
from spilleval.testing import (
    IMAGE_TOKEN,
    encode_qa,
    multimodal_qa_dataset,
    pad_batch,
    pad_multimodal_batch,
    qa_examples,
    tiny_llava,
)
from spilleval.trainer import SpillingTrainer

EOS = 3
MAX_NEW = 6
BATCH = 4
GEN_METRICS = ["bleu", "rouge", "squad", "cider", "answer_macro_f1"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eval_args(tmp_path: Path, cls: type = TrainingArguments, **kwargs: Any) -> Any:
    return cls(str(tmp_path / "out"), per_device_eval_batch_size=BATCH, report_to=[], use_cpu=True,
               disable_tqdm=True, save_strategy="no", logging_strategy="no", **kwargs)


def until_eos(row: list[int], skip: int = 0) -> list[int]:
    """A generated row up to and including its first </s> at position >= skip (generate pads after it)."""
    for k in range(skip, len(row)):
        if row[k] == EOS:
            return row[: k + 1]
    return row


# ----------------------------------------------------------------------------------------------- seq2seq
def seq2seq_item(example: dict[str, str], tokenizer: Any) -> dict[str, Any]:
    return {"input_ids": tokenizer(example["question"])["input_ids"],
            "labels": tokenizer(f"{example['answer']} </s>")["input_ids"]}


def pad_seq2seq(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width, label_width = max(len(i["input_ids"]) for i in items), max(len(i["labels"]) for i in items)
    return {
        "input_ids": torch.tensor([i["input_ids"] + [0] * (width - len(i["input_ids"])) for i in items]),
        "attention_mask": torch.tensor([[1] * len(i["input_ids"]) + [0] * (width - len(i["input_ids"]))
                                        for i in items]),
        "labels": torch.tensor([i["labels"] + [-100] * (label_width - len(i["labels"])) for i in items]),
    }


def tiny_seq2seq(kind: str, tokenizer: Any) -> torch.nn.Module:
    """T5 trained a few steps (its answers end in </s>, so rows end early), or a random BART (its decoder starts
    with </s>: the end-of-sequence cut must not stop there)."""
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if kind == "bart":
        config = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=EOS,
                            decoder_start_token_id=EOS, forced_eos_token_id=None, max_position_embeddings=64)
        return BartForConditionalGeneration(config).eval()
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    model = T5ForConditionalGeneration(config)
    train = [seq2seq_item(ex, tokenizer) for ex in qa_examples(200, seed=5)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        model(**pad_seq2seq(train[(step * 16) % len(train):][:16])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def reference_metrics(preds: list[str], refs: list[list[str]], labels: list[str]) -> dict[str, float]:
    """Every generation metric by its reference implementation on the whole data in memory."""
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    rouge = [scorer.score_multi(r, p) for p, r in zip(preds, refs)]
    cider = Cider().compute_score({i: [x.lower() for x in r] for i, r in enumerate(refs)},
                                  {i: [p.lower()] for i, p in enumerate(preds)})[0]
    return {
        "bleu": sacrebleu.corpus_bleu(preds, reference_streams(refs)).score,
        **{t: float(np.mean([s[t].fmeasure for s in rouge])) for t in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
        "squad_exact_match": 100 * float(np.mean([max(exact_match_score(p, x) for x in r)
                                                   for p, r in zip(preds, refs)])),
        "squad_f1": 100 * float(np.mean([max(squad_f1(p, x) for x in r) for p, r in zip(preds, refs)])),
        "cider": float(cider),
        "answer_macro_f1": f1_score(labels, preds, average="macro"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_generated_ids_equal_seq2seq_trainer_and_metrics_equal_references(kind, tokenizer, tmp_path):
    examples = qa_examples(22, seed=11)
    data = [seq2seq_item(ex, tokenizer) for ex in examples]
    model = tiny_seq2seq(kind, tokenizer)

    # the reference run: transformers' own predict_with_generate
    reference = Seq2SeqTrainer(model=model, args=eval_args(tmp_path / "ref", Seq2SeqTrainingArguments,
                                                           predict_with_generate=True),
                               data_collator=pad_seq2seq, processing_class=tokenizer)
    out = reference.predict(data, max_new_tokens=MAX_NEW)
    skip = 1 if kind == "bart" else 0
    # generate returns the decoder start and up to MAX_NEW ids; Seq2SeqTrainer pads that with <pad> and -100
    want_rows = [until_eos(row[: 1 + MAX_NEW], skip) for row in out.predictions.tolist()]
    preds = tokenizer.batch_decode(want_rows, skip_special_tokens=True)
    # several references per sample, some equal to the prediction, so that every metric is far from 0
    refs = [[ex["answer"], p if i % 2 else f"{p} red", f"the {ex['answer']}"][: 1 + i % 3]
            for i, (ex, p) in enumerate(zip(examples, preds))]

    spilling = SpillingTrainer(
        model=model, args=eval_args(tmp_path), data_collator=pad_seq2seq, processing_class=tokenizer,
        eval_dataset=[{**item, "references": r} for item, r in zip(data, refs)], metrics=["token_accuracy"],
        spill_dir=str(tmp_path / "spill-{prefix}"),
        generation=GenerationEval(GEN_METRICS, references_column="references", max_new_tokens=MAX_NEW),
    )
    metrics = spilling.evaluate()

    reader = SpillReader(tmp_path / "spill-eval" / "generation")
    assert reader.manifest.task == "generation" and len(reader) == len(data)
    for i, want in enumerate(want_rows):
        sample = reader.get(i)
        got_pred, got_label = sample.row(0)
        assert got_pred.tolist() == want, f"sample {i}"
        assert got_label.tolist() == data[i]["labels"]
        assert sample.columns["references"] == [refs[i]]
        assert set(out.predictions[i, len(want):].tolist()) <= {0, -100}  # only padding is not spilled
    if kind == "t5":
        assert sum(r[-1] == EOS for r in want_rows) > len(want_rows) // 2  # the trained T5 ends its answers

    labels = tokenizer.batch_decode([d["labels"] for d in data], skip_special_tokens=True)
    expected = reference_metrics(preds, refs, labels)
    assert 0 < expected["squad_exact_match"] < 100 and expected["cider"] > 0 and expected["rouge1"] > 0
    if kind == "bart":  # six-word rows: 4-gram matches, so BLEU is not 0 (the T5's one-word answers have none)
        assert expected["bleu"] > 0
    for key, value in expected.items():
        assert metrics[f"eval_gen_{key}"] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    # both parts in one evaluate(): the teacher-forced keys (and the eval loss) keep their names
    assert set(metrics) >= {"eval_loss", "eval_token_accuracy"}
    assert SpillReader(tmp_path / "spill-eval" / "teacher_forced").manifest.task == "seq2seq"
    assert reader.results() == {k[len("eval_gen_"):]: v for k, v in metrics.items() if k.startswith("eval_gen_")}

    if kind == "t5":
        check_cli_on_generation_spill(tmp_path / "spill-eval", reader.results_record()["metrics"])
        prediction = spilling.predict(data_with_refs(data, refs))
        assert prediction.reader.manifest.task == "generation"
        assert prediction.reader.get(0).row(0)[0].tolist() == want_rows[0]


def data_with_refs(data, refs):
    return [{**item, "references": r} for item, r in zip(data, refs)]


def check_cli_on_generation_spill(spill: Path, live: dict[str, Any]) -> None:
    """compute / show / worst / report read a generation spill; compute reproduces the live results (`live`: keyed
    as results.json keys them, `eval_gen_...`)."""
    runner = CliRunner()
    computed = runner.invoke(app, ["compute", str(spill / "generation"), "--json"])
    assert computed.exit_code == 0, computed.output
    assert json.loads(computed.output)["metrics"] == pytest.approx(live, rel=1e-12)
    shown = runner.invoke(app, ["show", str(spill / "generation"), "-n", "2", "--json"])
    assert shown.exit_code == 0, shown.output
    assert len(json.loads(shown.output)["samples"]) == 2
    worst = runner.invoke(app, ["worst", str(spill / "generation"), "--by", "token_f1", "-n", "3", "--json"])
    assert worst.exit_code == 0, worst.output
    report = runner.invoke(app, ["report", str(spill / "generation"), "-o", str(spill / "report.html"), "-q"])
    assert report.exit_code == 0, report.output
    assert "bleu" in (spill / "report.html").read_text()
    refused = runner.invoke(app, ["compute", str(spill / "generation"), "--metrics", "token_accuracy"])
    assert refused.exit_code != 0 and "position by position" in str(refused.exception)
    parent = runner.invoke(app, ["compute", str(spill), "--json"])  # the evaluation directory: both parts
    assert parent.exit_code == 0, parent.output
    assert json.loads(parent.output)["parts"]["generation"]["metrics"] == pytest.approx(live, rel=1e-12)


def test_generation_needs_labels_and_reference_column(tokenizer, tmp_path):
    model = tiny_seq2seq("bart", tokenizer)
    run = GenerationRun(GenerationEval(["bleu"]), tmp_path / "gen", model, tokenizer=tokenizer)
    batch = pad_seq2seq([seq2seq_item(qa_examples(1)[0], tokenizer)])
    with pytest.raises(ValueError, match="needs `labels`"):
        run.add(model, {k: v for k, v in batch.items() if k != "labels"}, torch.tensor([0]))
    run.abort()
    trainer = SpillingTrainer(model=model, args=eval_args(tmp_path), data_collator=pad_seq2seq,
                              processing_class=tokenizer, generation=GenerationEval(references_column="captions"))
    with pytest.raises(KeyError, match="no 'captions' column"):
        trainer.evaluate([seq2seq_item(qa_examples(1)[0], tokenizer)])
    with pytest.raises(ValueError, match="batch_eval_metrics=True.*teacher_forced=False"):
        SpillingTrainer(model=model, args=eval_args(tmp_path, batch_eval_metrics=True),
                        compute_metrics=lambda eval_pred, compute_result: {},
                        generation=GenerationEval(teacher_forced=False), processing_class=tokenizer)


class CrashAfter(TrainerCallback):
    """Raise after `steps` prediction steps: the evaluation dies with part of both spills committed."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_prediction_step(self, args, state, control, **kwargs):
        self.steps -= 1
        if self.steps == 0:
            raise RuntimeError("simulated crash")


def test_resume_continues_both_parts_and_equals_the_uninterrupted_run(tokenizer, tmp_path):
    model = tiny_seq2seq("bart", tokenizer)
    data = [{**seq2seq_item(ex, tokenizer), "references": [ex["answer"]]} for ex in qa_examples(22, seed=11)]

    def trainer(out: Path, **kwargs: Any) -> SpillingTrainer:
        return SpillingTrainer(model=model, args=eval_args(out), eval_dataset=data, data_collator=pad_seq2seq,
                               processing_class=tokenizer, metrics=["token_accuracy"], spill_dir=out / "spill",
                               generation=GenerationEval(["bleu", "cider"], references_column="references",
                                                         max_new_tokens=MAX_NEW), **kwargs)

    whole = trainer(tmp_path / "whole").evaluate()
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "crashed", callbacks=[CrashAfter(3)]).evaluate()
    for part in ("teacher_forced", "generation"):
        assert len(SpillReader(tmp_path / "crashed" / "spill" / part, allow_partial=True)) == 3 * BATCH
    encoder_calls: list[int] = []
    hook = model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        resumed = trainer(tmp_path / "crashed", resume=True).evaluate()
    finally:
        hook.remove()
    assert len(encoder_calls) == 2 * (6 - 3)  # a forward and a generate per batch left; 3 of 6 were committed
    exact = [k for k in whole if k.startswith(("eval_gen_", "eval_token"))]
    assert len(exact) == 7  # token_accuracy; bleu and its four n-gram precisions; cider
    assert {k: resumed[k] for k in exact} == {k: whole[k] for k in exact}
    for part in ("teacher_forced", "generation"):
        want = SpillReader(tmp_path / "whole" / "spill" / part).table()
        assert SpillReader(tmp_path / "crashed" / "spill" / part).table().equals(want)


# ----------------------------------------------------------------------------------------------- LLaVA-style
def test_llava_left_padded_generation_with_image_features_equals_each_sample_alone(tokenizer, tmp_path):
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = tiny_llava(len(tokenizer), image_token_id=image_token, padding_side="right").eval()
    data = multimodal_qa_dataset(10, tokenizer, seed=3, max_features=5)
    answers = [[tokenizer.decode([t for t in it["labels"] if t != -100], skip_special_tokens=True)] for it in data]
    trainer = SpillingTrainer(
        model=model, args=eval_args(tmp_path), data_collator=pad_multimodal_batch, processing_class=tokenizer,
        eval_dataset=[{**it, "answers": a} for it, a in zip(data, answers)], spill_dir=tmp_path / "spill",
        generation=GenerationEval(["squad", "answer_macro_f1"], references_column="answers", max_new_tokens=MAX_NEW,
                                  teacher_forced=False),
    )
    metrics = trainer.evaluate()
    assert "eval_loss" not in metrics and {"eval_gen_squad_f1", "eval_gen_answer_macro_f1"} <= set(metrics)
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["generation"]

    reader = SpillReader(tmp_path / "spill" / "generation")
    rows = []
    for i, item in enumerate(data):
        answer_start = next(k for k, t in enumerate(item["labels"]) if t != -100)
        alone = model.generate(
            input_ids=torch.tensor([item["input_ids"][:answer_start]]), images=item["images"][None],
            num_image_features=torch.tensor([len(item["images"])]), max_new_tokens=MAX_NEW, do_sample=False,
        )
        got_pred, got_label = reader.get(i).row(0)
        assert got_pred.tolist() == until_eos(alone[0].tolist()), f"sample {i}"
        assert got_label.tolist() == item["labels"][answer_start:]
        rows.append(got_pred.tolist())
    assert len({tuple(r) for r in rows}) > 1  # the samples really generate different things
    assert len({len(it["images"]) for it in data}) > 1 and len({len(it["input_ids"]) for it in data}) > 1


def test_plain_decoder_only_generation_strips_the_prompt_and_equals_each_sample_alone(tiny_model, tokenizer,
                                                                                      tmp_path):
    data = [encode_qa(ex, tokenizer) for ex in qa_examples(9, seed=6)]
    trainer = SpillingTrainer(model=tiny_model, args=eval_args(tmp_path), eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, spill_dir=tmp_path / "spill",
                              generation=GenerationEval(["squad"], max_new_tokens=MAX_NEW, teacher_forced=False))
    assert "eval_gen_squad_f1" in trainer.evaluate()
    reader = SpillReader(tmp_path / "spill" / "generation")
    rows = []
    for i, item in enumerate(data):
        start = next(k for k, t in enumerate(item["labels"]) if t != -100)
        prompt = torch.tensor([item["input_ids"][:start]])
        alone = tiny_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
                                    do_sample=False)[0, start:]  # returned after the prompt
        rows.append(reader.get(i).row(0)[0].tolist())
        assert rows[-1] == until_eos(alone.tolist()), f"sample {i}"
    assert len({tuple(r) for r in rows}) > 1 and len({len(d["input_ids"]) for d in data}) > 1
