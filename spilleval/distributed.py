"""Coordination of one evaluation across the ranks of a `torch.distributed` job.

Two channels, each for what it does best:

* **Status through the process group's key-value store.** Every rank posts one status when it stops (finished,
  or failed with its error) and reads the others' with a deadline. A rank that crashed or hangs simply never
  posts, so the others can name it after `timeout` seconds instead of hanging in a collective; a rank that
  failed with an exception posts it, and the others stop at their next batch (`raise_if_peer_failed`) or at
  `finalize`, with an error naming that rank and its cause.
* **Small data through a gloo group with the same timeout** (CPU tensors and pickled dicts whatever the
  training backend is): the lowest rank holding each sample (an owner id per sample, all-reduced in fixed-size
  blocks; see `spilleval.dedupe`), the streaming metric states (a few numbers per metric), and rank 0's results.

Every rank constructs its `Coordinator` (it creates the gloo group, a collective) and every rank either finalizes
or aborts: that is the whole protocol.

The gloo group lives exactly as long as one evaluation: `close()` destroys it once the last collective is done,
which joins its worker threads. It must not outlive the evaluation. A gloo worker thread (`pt_gloo_runloop`)
drops its reference to a finished collective only *after* `wait()` has returned to Python, and dropping it
releases the collective's tensors, which needs the GIL (each tensor has a Python object). When the script ends
right after an evaluation (as `SpillingTrainer.evaluate()` at the end of a script does), the interpreter may
already be finalizing by then: CPython ends a thread that asks for the GIL during finalization with
`pthread_exit`, whose unwinding through the collective's `noexcept` destructor calls `std::terminate`
("terminate called without an active exception", exit code -6, in about one run in three on 2 cores). Destroying
the group drops the last Python reference to it, and torch releases the GIL before its destructor joins the worker
threads, so every collective has been torn down, with the GIL, before `finalize()` returns.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .sampleset import SampleSet

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo and NCCL collectives
FAIL_FAST_INTERVAL_S = 1.0  # how often `raise_if_peer_failed` looks at the store (a network round trip)
OWNER_BLOCK = 1 << 22  # samples per all_reduce of the owner map (16 MiB of int32)
_POLL_S = 0.02

_EVALUATIONS = itertools.count(1)  # every rank counts its evaluations alike, so the count names their store keys


class DistributedEvaluationError(RuntimeError):
    """Another rank failed, crashed or hung; this rank stopped too. Committed chunks stay readable."""


def process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Status:
    """What a rank posts when it stops."""

    rank: int
    ok: bool
    error: str | None = None
    vocab_size: int | None = None  # lets a rank that saw no sample open an empty shard
    followed: bool = False  # it stopped only because another rank had failed

    def describe(self) -> str:
        return f"rank {self.rank} failed: {self.error}"


@dataclass
class SampleOwnership:
    """The samples held by some rank; those held by this rank and by a lower one too."""

    held: SampleSet
    foreign: SampleSet


class Coordinator:
    """The ranks of one evaluation: status exchange with a deadline and the small collectives of `finalize`."""

    def __init__(self, spill_dir: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout <= 0:
            raise ValueError(f"dist_timeout must be positive seconds, got {timeout}")
        self.rank, self.world_size = process_group()
        self.timeout = float(timeout)
        self.spill_dir = os.fspath(spill_dir)
        self.store = dist.PrefixStore(f"spilleval/evaluation-{next(_EVALUATIONS)}/", _default_store())
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))  # a collective
        self._collectives = 0  # run on the group so far: a failed one may still occupy a gloo worker thread
        self.posted = False
        self._last_check = 0.0

    # ------------------------------------------------------------------------------------------- status
    def post(self, *, error: BaseException | str | None = None, vocab_size: int | None = None) -> None:
        """Tell the other ranks this rank has stopped: finished (no error) or failed."""
        if self.posted:
            return
        self.posted = True
        followed = isinstance(error, DistributedEvaluationError)
        message = None if error is None else error if isinstance(error, str) else _describe(error)
        status = Status(self.rank, ok=error is None, error=message, vocab_size=vocab_size, followed=followed)
        self._store_call(self.store.set, f"status/{self.rank}", json.dumps(status.__dict__))
        if error is not None:
            self._store_call(self.store.set, "failed", str(self.rank))

    def raise_if_peer_failed(self) -> None:
        """Stop this rank early when another one failed (checked at most once per FAIL_FAST_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._last_check < FAIL_FAST_INTERVAL_S:
            return
        self._last_check = now
        if not self._store_call(self.store.check, ["failed"]):
            return
        error = self._failure_error([s for s in self._posted_statuses().values() if not s.ok], [])
        self.post(error=error)
        raise error

    def wait_for_all(self) -> list[Status]:
        """Every rank's status once all have posted. Raises, naming the ranks, as soon as one failed, or when
        some have not posted within the timeout (crashed, hung, or never called finalize)."""
        deadline = time.monotonic() + self.timeout
        statuses: dict[int, Status] = {}
        while True:
            statuses.update(self._posted_statuses(skip=statuses))
            failed = [s for s in statuses.values() if not s.ok]
            missing = [r for r in range(self.world_size) if r not in statuses]
            if failed or (missing and time.monotonic() > deadline):
                raise self._failure_error(failed, missing)
            if not missing:
                return [statuses[r] for r in range(self.world_size)]
            time.sleep(_POLL_S)

    def wait_quietly(self) -> None:
        """After posting a failure on rank 0: give the others time to read it before this process may exit, for
        the store may live in it (rank 0 hosts the TCPStore unless torchrun's agent does). They look at least once
        a second while evaluating, so this is short unless a rank hangs (then bounded by the timeout)."""
        if self.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline and len(self._posted_statuses()) < self.world_size:
                time.sleep(_POLL_S)
        except DistributedEvaluationError:
            pass

    # ------------------------------------------------------------------------------------------- data
    def sample_owners(self, present: SampleSet) -> "SampleOwnership":
        """Which samples any rank holds, and which of this rank's (`present`) a lower rank holds too.

        The owner of a sample is the lowest rank holding it, as the reader's "first occurrence in (rank, chunk)
        order" rule: all_reduce(MIN) of `rank if present else world_size`, in blocks of OWNER_BLOCK samples. Every
        rank gets the same `held`, so every rank takes the same decision about missing samples.
        """
        top = present.max()
        local = 0 if top is None else top + 1
        size = int(self._all_reduce(torch.tensor([local], dtype=torch.int64), dist.ReduceOp.MAX)[0])
        foreign, held = SampleSet(), SampleSet()
        for start in range(0, size, OWNER_BLOCK):
            stop = min(start + OWNER_BLOCK, size)
            mine = present.dense(start, stop)
            owner = torch.from_numpy(np.where(mine, self.rank, self.world_size).astype(np.int32))
            owner = self._all_reduce(owner, dist.ReduceOp.MIN).numpy()
            foreign.add(start + np.flatnonzero(mine & (owner < self.rank)))
            held.add(start + np.flatnonzero(owner < self.world_size))
        return SampleOwnership(foreign=foreign, held=held)

    def gather_to_root(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._collective(dist.gather_object, obj, out, dst=0, group=self.group)
        return out

    def broadcast_from_root(self, obj: Any) -> Any:
        holder = [obj]
        self._collective(dist.broadcast_object_list, holder, src=0, group=self.group)
        return holder[0]

    # ------------------------------------------------------------------------------------------- teardown
    def close(self) -> None:
        """Every rank, after the last collective: wait until all ranks are done with the gloo group, destroy it
        and join its worker threads (the module docstring says why none may outlive the evaluation)."""
        if self.group is None:
            return
        self._collective(dist.barrier, group=self.group)  # no peer still reads from this rank's connections
        self._destroy_group()

    def discard(self) -> None:
        """After a failure: destroy the gloo group when no collective ever ran on it (joining its idle threads is
        immediate). A group whose collective failed is left alone: a worker thread may wait in it for a lost peer
        until the timeout, and joining it would hold this rank's error back as long."""
        if self.group is not None and self._collectives == 0:
            self._destroy_group()

    def _destroy_group(self) -> None:
        group, self.group = self.group, None
        dist.destroy_process_group(group)
        del group  # the last reference: torch releases the GIL, then the destructor joins the worker threads

    # ------------------------------------------------------------------------------------------- helpers
    def _posted_statuses(self, skip: dict[int, Status] | None = None) -> dict[int, Status]:
        found = {}
        for r in range(self.world_size):
            key = f"status/{r}"
            if (skip is None or r not in skip) and self._store_call(self.store.check, [key]):
                found[r] = Status(**json.loads(self._store_call(self.store.get, key)))
        return found

    def _failure_error(self, failed: list[Status], missing: list[int]) -> DistributedEvaluationError:
        causes = [s for s in failed if not s.followed] or failed  # name the rank that failed, not its followers
        parts = [s.describe() for s in causes]
        if missing:
            names = ", ".join(str(r) for r in missing)
            parts.append(
                f"rank{'s' if len(missing) > 1 else ''} {names} did not finish within {self.timeout:g} s (crashed, "
                "hangs, or never called finalize(); raise dist_timeout if ranks legitimately finish that far apart)"
            )
        return DistributedEvaluationError(
            f"distributed evaluation into {self.spill_dir} stopped on rank {self.rank} of {self.world_size}: "
            f"{'; '.join(parts)}. {_PARTIAL_HINT.format(dir=self.spill_dir)}"
        )

    def _store_call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RuntimeError, OSError) as e:  # torch raises DistStoreError (a RuntimeError) and OSErrors
            raise DistributedEvaluationError(
                f"rank {self.rank} lost the process group's store ({e}); the process hosting it (rank 0, unless "
                f"launched by torchrun) has exited. {_PARTIAL_HINT.format(dir=self.spill_dir)}"
            ) from e

    def _all_reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        self._collective(dist.all_reduce, tensor, op=op, group=self.group)
        return tensor

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._collectives += 1
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # gloo: a peer's connection closed, or the timeout passed
            raise DistributedEvaluationError(
                f"rank {self.rank}: a rank was lost while merging the evaluation ({e}). "
                f"{_PARTIAL_HINT.format(dir=self.spill_dir)}"
            ) from e


_PARTIAL_HINT = (
    "Chunks committed before the failure stay readable: SpillReader('{dir}', allow_partial=True) or "
    "`spilleval inspect {dir}`; re-run the evaluation with resume=True to complete it."
)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _default_store() -> Any:
    # The store every rank already shares (torchrun's agent, or rank 0's TCPStore, or a FileStore). There is no
    # public accessor; this one has been stable since torch 1.8.
    return dist.distributed_c10d._get_default_store()

