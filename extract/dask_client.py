"""A dask.distributed client for the commands that spread work over processes (`extract --workers/--scheduler`,
`probe sweep --workers/--scheduler`): a LocalCluster of N single-threaded worker processes, or an existing
scheduler. Torch-free, so the probes use it without importing the extraction pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["MISSING_DISTRIBUTED", "dask_client", "require_distributed", "check_shared_url", "cluster_label"]

MISSING_DISTRIBUTED = "running on a dask cluster needs dask.distributed: pip install 'diffbank[cluster]'"


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


@contextmanager
def dask_client(
    workers: int | None, scheduler: str | None, error: Callable[[str], Exception]
) -> Iterator[tuple[Any, int]]:
    """(client, number of workers) for a LocalCluster of `workers` single-threaded processes, or for the
    scheduler at `scheduler`; both closed on exit. `error` builds the caller's exception for bad arguments and a
    missing `distributed`."""
    if workers is not None and scheduler is not None:
        raise error("give workers or scheduler, not both")
    if scheduler is None and (workers is None or workers < 1):
        raise error(f"workers must be at least 1, got {workers}")
    require_distributed(error)
    from dask.distributed import Client, LocalCluster

    cluster = None
    if scheduler is None:
        assert workers is not None
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        n_workers = workers
    else:
        client = Client(scheduler)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    try:
        yield client, n_workers
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
