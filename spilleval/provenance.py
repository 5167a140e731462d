"""What produced a spill's numbers: the weights, the checkpoint, the eval set, the code. Stored in `results.json`.

After an evaluation people ask which weights produced a number: with `load_best_model_at_end`, the evaluation that
follows training runs the best checkpoint's weights, not the last step's. So the record names the model, the global
step, the checkpoint that was loaded, and a fingerprint of the weights themselves; the eval set's fingerprint and
sample count; the metric parameters and library versions (from the manifest); the git commit of the working
directory; when it ran and for how long.

The fingerprints are cheap and deterministic, not cryptographic proofs:
* weights: per parameter (in name order) its name, shape, dtype, float64 sum, sum of squares and 16 values at fixed
  positions, reduced on the parameter's own device (one pass over the weights, a few hundred bytes to the host),
  then SHA-256. Any training step changes it; two evaluations of the same weights give the same one.
* eval set: the sum, modulo 2**64, of a 64-bit hash of each unique sample's (dataset index, label ids): independent
  of the order, batching, chunking and world size, so two spills of the same eval set share it (`diff` compares
  them per sample).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

SAMPLED_VALUES = 16  # values read at fixed positions of every parameter
STATS_CHUNK = 1 << 24  # elements per float64 temporary (128 MiB): big embeddings are summed in pieces


def weights_fingerprint(model: Any) -> str:
    """`sha256:<hex>` of every parameter's name, shape, dtype and value statistics (see the module docstring)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(_named_tensors(model), key=lambda item: item[0]):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(_value_statistics(tensor.detach().reshape(-1)).cpu().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _value_statistics(flat: Any) -> Any:
    """float64 [2 + SAMPLED_VALUES]: sum, sum of squares, values at fixed positions; on the tensor's device."""
    import torch

    stats = torch.zeros(2 + SAMPLED_VALUES, dtype=torch.float64, device=flat.device)
    if not flat.numel() or not (flat.is_floating_point() or flat.dtype in (torch.int32, torch.int64, torch.bool)):
        return stats
    for start in range(0, flat.numel(), STATS_CHUNK):
        part = flat[start : start + STATS_CHUNK].double()
        stats[0] += part.sum()
        stats[1] += (part * part).sum()
    # float32 positions, as fingerprints have always been taken; above 2**24 elements the last one can round up to
    # numel (a 32,000 x 2,048 embedding did), so it is clamped back into the tensor
    picks = torch.linspace(0, flat.numel() - 1, SAMPLED_VALUES, device=flat.device).long().clamp_(max=flat.numel() - 1)
    stats[2:] = flat[picks].double()
    return stats


def _named_tensors(model: Any) -> list[tuple[str, Any]]:
    """Parameters and buffers (a model's state), shared tensors once."""
    seen: set[int] = set()
    out = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def model_record(model: Any) -> dict[str, Any]:
    """Name or path, class, parameter count, dtype and the weights' fingerprint."""
    config = getattr(model, "config", None)
    parameters = list(model.parameters())
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
        "class": type(model).__name__,
        "parameters": int(sum(p.numel() for p in parameters)),
        "dtype": str(parameters[0].dtype).replace("torch.", "") if parameters else None,
        "weights_fingerprint": weights_fingerprint(model),
    }


def eval_set_fingerprint(reader: Any) -> tuple[int, str]:
    """(unique samples, `h64:<hex>`) over the spill's (dataset index, label ids) pairs, in one bounded pass."""
    total, count = 0, 0
    for batch in reader.iter_chunks(columns=[], with_arrays=False, with_logprob=False):
        offsets = batch.label_row_offsets
        labels = batch.label_ids.astype(np.uint32, copy=False)
        for i, index in enumerate(batch.sample_index.tolist()):
            row = labels[offsets[i] : offsets[i + 1]]
            digest = hashlib.blake2b(index.to_bytes(8, "little") + row.tobytes(), digest_size=8).digest()
            total = (total + int.from_bytes(digest, "little")) % 2**64
        count += len(batch)
    return count, f"h64:{total:016x}"


def git_record(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The commit of the git working tree `path` (default: the current directory) and whether it has uncommitted
    changes; None outside a git repository or without git."""
    where = os.fspath(path or os.getcwd())

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "root": git("rev-parse", "--show-toplevel")}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunClock:
    """When an evaluation started, and how long it has run (monotonic)."""

    def __init__(self) -> None:
        self.started = utc_now()
        self._start = time.monotonic()

    def record(self) -> dict[str, Any]:
        return {"started": self.started, "finished": utc_now(), "run_time_s": round(time.monotonic() - self._start, 3)}


def hf_dataset_fingerprint(dataset: Any) -> str | None:
    """A `datasets.Dataset`'s own fingerprint (its content and the transforms applied to it), when it has one."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    return fingerprint if isinstance(fingerprint, str) else None


def checkpoint_step(path: str | None) -> int | None:
    """The step of a `checkpoint-<step>` directory."""
    if not path:
        return None
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") and name.rsplit("-", 1)[1].isdigit() else None
