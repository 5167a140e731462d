"""`coco_caption` against pycocoevalcap's own `COCOEvalCap` (pycocotools COCO objects, PTB tokenizer and METEOR
jars) on a few hundred generated captions with several references each, punctuation, capitals and quotes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from inspect_spills import caption_generation_rows, write_generation_spill

from spilleval.metrics import build_metric, compute_from_spill
from spilleval.metrics.base import MetricConfigError

needs_java = pytest.mark.skipif(
    shutil.which("java") is None and os.environ.get("CI") != "true",
    reason="no `java` here (apt-get install default-jre-headless): coco_caption runs pycocoevalcap's Java jars; "
           "CI installs Java and runs this test",
)
KEYS = {"coco_bleu_1": "Bleu_1", "coco_bleu_2": "Bleu_2", "coco_bleu_3": "Bleu_3", "coco_bleu_4": "Bleu_4",
        "coco_meteor": "METEOR", "coco_rouge_l": "ROUGE_L", "coco_cider": "CIDEr"}


def punctuated(refs: list[str], i: int) -> list[str]:
    """References as people write them: capitals, commas, full stops, quotes, parentheses, an accent."""
    styles = [lambda r: r.capitalize() + ".", lambda r: r.replace(" with ", ", with "), lambda r: f'"{r}"',
              lambda r: f"{r} (café)", lambda r: r.upper() + " !", lambda r: r]
    return [styles[(i + k) % len(styles)](r) for k, r in enumerate(refs)]


def coco_eval_cap(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap's COCOEvalCap on pycocotools COCO objects. SPICE is left out (it downloads Stanford CoreNLP
    models at first use, and coco_caption does not report it): the only stand-in of this test."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    coco = COCO()
    annotations = [{"image_id": i, "caption": r} for i, refs in enumerate(references) for r in refs]
    coco.dataset = {"images": [{"id": i} for i in range(len(references))],
                    "annotations": [{**a, "id": k} for k, a in enumerate(annotations)]}
    coco.createIndex()
    results = coco.loadRes([{"image_id": i, "caption": p} for i, p in enumerate(predictions)])
    evaluator = coco_eval.COCOEvalCap(coco, results)
    original, coco_eval.Spice = coco_eval.Spice, NoSpice
    try:
        evaluator.evaluate()
    finally:
        coco_eval.Spice = original
    return evaluator.eval


@needs_java
@pytest.mark.slow
def test_coco_caption_equals_coco_eval_cap(tokenizer, tmp_path):
    rows = caption_generation_rows(tokenizer, 300, seed=7)
    rows.columns["captions"] = [punctuated(refs, i) for i, refs in enumerate(rows.columns["captions"])]
    spill = write_generation_spill(tmp_path / "spill", tokenizer, rows, references_column="captions", metrics=[],
                                   chunk_rows=64)
    spec = {"name": "coco_caption", "params": {"references_column": "captions", "batch_size": 97}}
    got = compute_from_spill(spill, [spec])
    predictions = tokenizer.batch_decode([rows.row(i)[0].tolist() for i in range(len(rows))],
                                         skip_special_tokens=True)
    want = coco_eval_cap(predictions, rows.columns["captions"])
    assert set(got) == set(KEYS)
    for key, name in KEYS.items():
        assert got[key] == pytest.approx(want[name], rel=1e-12, abs=1e-15), key
    assert 0 < want["Bleu_4"] < want["Bleu_1"] < 1 and want["METEOR"] > 0 and want["CIDEr"] > 0.5
    counts = [len(r) for r in rows.columns["captions"]]
    assert min(counts) >= 2 and np.mean(counts) > 2  # several references per caption


def test_coco_caption_without_java_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MetricConfigError, match="no `java` command on PATH: install a Java runtime"):
        build_metric("coco_caption")
