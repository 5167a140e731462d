"""Every command on `trainer.last_spill_dir` of a run with `generation=`: the parent of `teacher_forced/` and
`generation/`, one section (or JSON entry, or output file) per part. A real SpillingTrainer run of a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainingArguments
from typer.testing import CliRunner

from spilleval import GenerationEval
from spilleval.cli import app
from spilleval.metrics import compute_from_spill
from spilleval.testing import encode_qa, pad_batch, qa_examples
from spilleval.trainer import SpillingTrainer

runner = CliRunner()
PARTS = ["teacher_forced", "generation"]


@pytest.fixture(scope="module")
def evaluation_dir(tiny_model, tokenizer, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("parts")
    data = [{**encode_qa(ex, tokenizer), "answers": [ex["answer"], "red"]} for ex in qa_examples(10, seed=6)]
    args = TrainingArguments(str(tmp / "out"), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", logging_strategy="no")
    trainer = SpillingTrainer(model=tiny_model, args=args, eval_dataset=data, data_collator=pad_batch,
                              processing_class=tokenizer, metrics=["token_accuracy"], spill_dir=tmp / "spill",
                              generation=GenerationEval(["squad"], references_column="answers", max_new_tokens=4))
    trainer.evaluate()
    assert sorted(p.name for p in trainer.last_spill_dir.iterdir()) == sorted(PARTS)
    return trainer.last_spill_dir


def invoke(*args: str) -> str:
    result = runner.invoke(app, [*args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_json_commands_give_one_entry_per_part(evaluation_dir):
    computed = json.loads(invoke("compute", str(evaluation_dir), "--json"))
    assert list(computed["parts"]) == PARTS
    for part in PARTS:
        want = compute_from_spill(evaluation_dir / part)
        assert computed["parts"][part]["metrics"] == pytest.approx(
            {f"eval_{'gen_' if part == 'generation' else ''}{k}": v for k, v in want.items()})
    inspected = json.loads(invoke("inspect", str(evaluation_dir), "--json"))
    assert [inspected["parts"][p]["manifest"]["task"] for p in PARTS] == ["causal_lm", "generation"]
    shown = json.loads(invoke("show", str(evaluation_dir), "-n", "2", "--json"))
    assert [len(shown["parts"][p]["samples"]) for p in PARTS] == [2, 2]
    worst = json.loads(invoke("worst", str(evaluation_dir), "-n", "3", "--json", "-q"))
    assert [worst["parts"][p]["by"] for p in PARTS] == ["token_accuracy", "squad_f1"]  # each part's default
    diffed = json.loads(invoke("diff", str(evaluation_dir), str(evaluation_dir), "--json", "-q"))
    assert [diffed["parts"][p]["samples"]["compared"] for p in PARTS] == [10, 10]


def test_text_commands_print_a_section_per_part_and_files_get_one_per_part(evaluation_dir, tmp_path):
    for command in (["compute"], ["inspect"], ["show", "-n", "1"], ["worst", "-n", "1", "-q"]):
        output = invoke(command[0], str(evaluation_dir), *command[1:])
        headings = [line for line in output.splitlines() if line.strip().startswith("─") and ": " in line]
        assert [h.split(":")[0].strip("─ ") for h in headings] == PARTS, command
    invoke("report", str(evaluation_dir), "-o", str(tmp_path / "report.html"), "-q")
    assert sorted(p.name for p in tmp_path.glob("report*.html")) == ["report-generation.html",
                                                                      "report-teacher_forced.html"]
    assert "squad_f1" in (tmp_path / "report-generation.html").read_text()
    invoke("export", str(evaluation_dir), "-o", str(tmp_path / "rows.jsonl"), "--scores", "-q")
    for part in PARTS:
        assert len((tmp_path / f"rows-{part}.jsonl").read_text().splitlines()) == 10
    refused = runner.invoke(app, ["export", str(evaluation_dir), "-o", "-"])
    assert refused.exit_code == 2 and "name one" in refused.output
    # a score only one part has: the other part says why (and the command fails)
    refused = runner.invoke(app, ["worst", str(evaluation_dir), "--by", "token_accuracy", "-n", "1"])
    assert refused.exit_code != 0 and "position by position" in str(refused.exception)
