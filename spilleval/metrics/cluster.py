"""The map/merge recompute on a Dask cluster: the same tasks as the local process pool, run by Dask workers.

`spilleval compute DIR --dask tcp://scheduler:8786` sends every task (a row range of a chunk, `parallel.py`) to the
cluster's workers, which read the spill from shared storage themselves: the spill directory must be at the same
path on every worker. CIDEr's document-frequency table is written next to the spill (its scratch directory) and
memory-mapped by the workers, so the spill directory must be writable from the client too. `--dask local` starts a
local cluster of worker processes. Dask is an optional extra: `pip install 'spilleval[dask]'`.
"""

from __future__ import annotations

from concurrent.futures import Executor
from types import TracebackType
from typing import Any

from .base import MetricConfigError

LOCAL = "local"


class MissingEngineError(MetricConfigError, ImportError):
    """The distributed engine asked for is not installed."""


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as error:
        raise MissingEngineError(
            "recomputing on a Dask cluster needs dask.distributed, which is not installed: pip install "
            "'spilleval[dask]' (or pip install 'dask[distributed]')."
        ) from error
    return distributed


class DaskExecutor(Executor):
    """`submit(fn, *args)` on a Dask client (its futures have `result()`); `workers`: the cluster's threads."""

    def __init__(self, address: str, *, local_workers: int = 2) -> None:
        distributed = _distributed()
        self._cluster = None
        if address == LOCAL:
            self._cluster = distributed.LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True,
                                                     dashboard_address=None)
            self.client = distributed.Client(self._cluster)
        else:
            self.client = distributed.Client(address)
        self.workers = max(1, sum(w["nthreads"] for w in self.client.scheduler_info()["workers"].values()))

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()
