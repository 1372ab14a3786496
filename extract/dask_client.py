"""A dask.distributed client for the commands that spread work over processes (`extract --workers/--scheduler`,
`probe sweep --workers/--scheduler`): a LocalCluster of N single-threaded worker processes, or an existing
scheduler, started in a background thread while the caller gets on with its own start-up. Torch-free, so the
probes (and the CLI, before it imports them) use it without importing the extraction pipeline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "MISSING_DISTRIBUTED",
    "LOCAL_CLUSTER_CONFIG",
    "StartingClient",
    "starting_client",
    "dask_client",
    "require_distributed",
    "check_shared_url",
    "cluster_label",
]

MISSING_DISTRIBUTED = "running on a dask cluster needs dask.distributed: pip install 'diffbank[cluster]'"
# dask settings for a LocalCluster: its workers and its scheduler (which runs in this process). Each costs CPU
# time that a busy worker loses, measured on a sweep part (13 linear features x 3 lrs, 30,000 rows, 20 epochs,
# one thread; 2-core Xeon): 40 CPU s in a plain process, 54 with glibc told to trim at 64 KiB (dask's default
# MALLOC_TRIM_THRESHOLD_: every batch-sized allocation is mapped and faulted in anew), and 63 in a worker with
# the statistical profiler too (it samples the task's stack every 10 ms, for a dashboard these clusters do not
# serve). The event loop's 20 ms tick and the 0.5 s system monitor cost the scheduler 3.1 CPU s over a
# 53 s sweep, 0.8 at 1 s and 5 s. None unsets a variable dask would set.
LOCAL_CLUSTER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
}


def require_distributed(error: Callable[[str], Exception]) -> None:
    """Fail with `error` before any work when the optional extra `cluster` is not installed."""
    try:
        import dask.distributed  # noqa: F401
    except ImportError as exc:
        raise error(MISSING_DISTRIBUTED) from exc


def check_shared_url(url: str | os.PathLike[str], error: Callable[[str], Exception]) -> str:
    """The store URL as a string; a memory:// store lives in one process, so worker processes cannot reach it."""
    url = os.fspath(url)
    if url.startswith("memory://"):
        raise error(
            "a memory:// store lives in one process; worker processes cannot reach it. "
            "Use a local path or an object store URL"
        )
    return url


def cluster_label(workers: int | None, scheduler: str | None) -> str:
    """Where the work runs, for the log."""
    return scheduler or f"a local cluster of {workers} process(es)"


class StartingClient:
    """A dask client whose LocalCluster (or connection to `scheduler`) starts in a background thread, so the
    caller's own start-up (imports, opening the store, planning) runs while the workers start. `get()` waits
    for it; `close_soon()` closes it in the background (nothing is left to wait for once the results are in),
    and `close()` waits until it is closed. Workers import the modules in `preload` as they start.

    Bad arguments and a missing `distributed` raise `error` before anything starts."""

    def __init__(
        self,
        workers: int | None,
        scheduler: str | None,
        error: Callable[[str], Exception],
        preload: Sequence[str] = (),
    ) -> None:
        if workers is not None and scheduler is not None:
            raise error("give workers or scheduler, not both")
        if scheduler is None and (workers is None or workers < 1):
            raise error(f"workers must be at least 1, got {workers}")
        require_distributed(error)
        self.workers, self.scheduler, self.preload = workers, scheduler, list(preload)
        self.start_seconds: dict[str, float] = {}
        self._client: Any = None
        self._cluster: Any = None
        self._n_workers = 0
        self._failure: BaseException | None = None
        self._closing: threading.Thread | None = None
        self._starting = threading.Thread(target=self._start, name="dask-client-start", daemon=True)
        self._starting.start()

    def _start(self) -> None:
        import dask
        from dask.distributed import Client, LocalCluster

        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            if self.scheduler is None:
                # The nannies read their workers' environment and configuration as they are made.
                with dask.config.set(LOCAL_CLUSTER_CONFIG):
                    self._cluster = LocalCluster(
                        n_workers=self.workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=None,
                        preload=self.preload,
                    )
                self._client = Client(self._cluster)
                self._n_workers = int(self.workers or 1)
            else:
                self._client = Client(self.scheduler)
                self._n_workers = max(1, len(self._client.scheduler_info().get("workers", {})))
        except BaseException as exc:  # raised again by get(), in the caller's thread
            self._failure = exc
        self.start_seconds = {"wall_s": time.perf_counter() - wall, "thread_cpu_s": time.thread_time() - cpu}

    def get(self) -> tuple[Any, int]:
        """(client, number of workers), once started."""
        self._starting.join()
        if self._failure is not None:
            raise self._failure
        return self._client, self._n_workers

    def close_soon(self) -> None:
        """Start closing the client and its cluster in the background."""
        if self._closing is None:
            self._closing = threading.Thread(target=self._close, name="dask-client-close", daemon=True)
            self._closing.start()

    def close(self) -> None:
        """Close the client and its cluster, and wait until they are closed."""
        self.close_soon()
        assert self._closing is not None
        self._closing.join()

    def _close(self) -> None:
        self._starting.join()
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()


@contextmanager
def starting_client(
    workers: int | None, scheduler: str | None, error: Callable[[str], Exception], preload: Sequence[str] = ()
) -> Iterator[StartingClient]:
    """A `StartingClient`, closed (and waited for) on exit."""
    starting = StartingClient(workers, scheduler, error, preload)
    try:
        yield starting
    finally:
        starting.close()


@contextmanager
def dask_client(
    workers: int | None, scheduler: str | None, error: Callable[[str], Exception]
) -> Iterator[tuple[Any, int]]:
    """(client, number of workers) for a LocalCluster of `workers` single-threaded processes, or for the
    scheduler at `scheduler`; both closed on exit. `error` builds the caller's exception for bad arguments and a
    missing `distributed`."""
    with starting_client(workers, scheduler, error) as starting:
        yield starting.get()
