"""The dask cluster of a sweep on workers (`probe sweep --workers/--scheduler`), started in the background.

Torch-free, so the CLI starts it before it imports the probes: a local cluster's workers start and import the
probe modules (`PRELOAD`: torch among them) while the client imports the same and opens the store.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from extract.dask_client import StartingClient, starting_client
from probe.recipe import ProbeConfigError

__all__ = ["PRELOAD", "sweep_cluster"]

# What every part's task imports, loaded by a local cluster's workers as they start: the probe modules (torch
# among them), and torch._dynamo, which torch.optim imports when it builds its first optimizer (~2 s of CPU).
PRELOAD = ("probe.sweep_workers", "torch._dynamo")


def sweep_cluster(workers: int | None, scheduler: str | None) -> AbstractContextManager[StartingClient]:
    """A local cluster of `workers` processes (the probe modules preloaded) or the scheduler at `scheduler`,
    starting in the background; closed (and waited for) on exit. Bad arguments raise `ProbeConfigError`."""
    return starting_client(workers, scheduler, ProbeConfigError, PRELOAD if scheduler is None else ())
