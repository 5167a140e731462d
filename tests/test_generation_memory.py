"""Flat host memory in generation mode: SpillingTrainer(generation=...) on the LLaVA-style model over 1,024 and
then 4,096 samples in one subprocess (this file is also the child script), each sample with 16 KiB of image
features and a reference answer.

The child warms up on 1,024 samples (every lazy import, buffer and queue reaches its size), evaluates them again,
then the large set, and reports its peak RSS after each of the two. Keeping what each extra sample brings (its
image features alone: 3,072 x 16 KiB = 48 MiB) would be three times the asserted bound.

Two fixed footprints are kept out of the measurement. The spill writer buffers up to `chunk_bytes` before it
commits a chunk (bounded by design, 64 MiB by default): the child uses 256 KiB chunks. Arrow's default jemalloc
pool keeps freed pages for reuse, a footprint that here grows by ~16 MiB over the first 16k samples and then
settles (+4, then +2 MiB over the next 32k and 32k): the child uses Arrow's system memory pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WARMUP, SMALL, LARGE = 1_024, 1_024, 4_096
FEATURES, FEATURE_DIM = 4, 1_024  # 16 KiB of float32 image features per sample
BOUND_MIB = 16.0


@pytest.mark.slow
def test_generation_host_memory_is_flat_as_samples_grow(tmp_path):
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}  # see the module docstring
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = report["peak_large_mib"] - report["peak_small_mib"]
    payload = (LARGE - SMALL) * FEATURES * FEATURE_DIM * 4 / 2**20
    print(f"\npeak RSS {report['peak_small_mib']:.1f} MiB after {SMALL} samples, {report['peak_large_mib']:.1f} MiB "
          f"after {LARGE} (growth {growth:+.1f} MiB; the extra samples' image features: {payload:.0f} MiB)")
    assert report["samples"] == [SMALL, LARGE]
    assert BOUND_MIB < payload / 2, "the samples are too small for the test to see a leak"
    assert growth < BOUND_MIB, f"peak RSS grew by {growth:.1f} MiB from {SMALL} to {LARGE} samples"


# ----------------------------------------------------------------------------------------------- the child
def peak_rss_mib() -> float:
    from spilleval.testing import peak_rss

    return peak_rss() / 2**20


def _child(out: str) -> None:
    import torch
    from transformers import TrainingArguments

    from spilleval import GenerationEval, SpillReader
    from spilleval.evaluator import Evaluator
    from spilleval.testing import (
        IMAGE_TOKEN,
        build_tokenizer,
        encode_multimodal_qa,
        pad_multimodal_batch,
        qa_examples,
        tiny_llava,
    )
    from spilleval.trainer import SpillingTrainer

    torch.set_num_threads(1)
    Evaluator.__init__.__kwdefaults__["chunk_bytes"] = 256 * 2**10  # see the module docstring
    tokenizer = build_tokenizer()
    questions = qa_examples(97, seed=3)

    class ImageQuestions(torch.utils.data.Dataset):
        """Built on access from the index: the dataset itself holds nothing that grows with its length."""

        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict:
            example = questions[i % len(questions)]
            item = encode_multimodal_qa(example, tokenizer, num_features=FEATURES, feature_dim=FEATURE_DIM, seed=i)
            return {**item, "answers": [example["answer"]]}

    model = tiny_llava(len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       feature_dim=FEATURE_DIM, hidden=16, layers=1).eval()
    args = TrainingArguments(out, per_device_eval_batch_size=128, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="no", logging_strategy="no")
    trainer = SpillingTrainer(model=model, args=args, data_collator=pad_multimodal_batch, processing_class=tokenizer,
                              metrics=["token_accuracy"],
                              generation=GenerationEval(["squad", "bleu"], references_column="answers",
                                                        max_new_tokens=3))
    peaks, samples = [], []
    for n in (WARMUP, SMALL, LARGE):
        trainer.evaluate(ImageQuestions(n))
        peaks.append(peak_rss_mib())
        samples.append(len(SpillReader(trainer.last_spill_dir / "generation")))
    print(json.dumps({"peak_small_mib": peaks[1], "peak_large_mib": peaks[2], "samples": samples[1:]}))


if __name__ == "__main__":
    _child(sys.argv[1])
