"""The smallest distributed evaluation that ends a script: run by `torchrun --nproc_per_node 2` in
tests/test_distributed_exit.py, many times, each run required to exit with code 0.

    torchrun --standalone --nproc_per_node 2 tests/_exit_worker.py SPILL_DIR

Each rank evaluates 2 batches of random logits (no model: the forward pass is not what is tested), `finalize()`
runs the coordinator's gloo collectives, and the script returns at once, so the interpreter starts finalizing while
any gloo worker thread that outlived the evaluation would still be tearing down its last collective: that used to
abort the process ("terminate called without an active exception", exit code -6) in about one run in three.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from spilleval import Evaluator

VOCAB, BATCH, WIDTH = 11, 4, 5

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(rank)
with Evaluator(sys.argv[1], ["token_accuracy"], dataset_length=2 * BATCH * world_size) as evaluator:
    for step in range(2):
        start = (2 * rank + step) * BATCH
        evaluator.update(torch.randn(BATCH, WIDTH, VOCAB, generator=generator),
                         torch.randint(0, VOCAB, (BATCH, WIDTH), generator=generator),
                         sample_index=np.arange(start, start + BATCH))
    evaluator.finalize()
