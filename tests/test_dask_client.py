"""The dask client that extraction and probe sweeps share: its refusals come before any cluster starts; a local
cluster starts in the background, its workers importing what they are told to preload, without the malloc trim
and profiler settings that slow a busy worker."""

from __future__ import annotations

import os
import sys

import pytest

from extract.dask_client import (
    MISSING_DISTRIBUTED,
    check_shared_url,
    cluster_label,
    dask_client,
    require_distributed,
    starting_client,
)


class Refused(ValueError):
    pass


def test_a_memory_store_cannot_be_shared_with_worker_processes():
    with pytest.raises(Refused, match="memory://"):
        check_shared_url("memory://x.zarr", Refused)
    assert check_shared_url("s3://b/x.zarr", Refused) == "s3://b/x.zarr"


@pytest.mark.parametrize(
    "workers, scheduler, message",
    [(2, "tcp://h:8786", "not both"), (0, None, "at least 1"), (None, None, "at least 1")],
)
def test_bad_arguments_are_refused_before_a_cluster_starts(workers, scheduler, message):
    with pytest.raises(Refused, match=message):
        with dask_client(workers, scheduler, Refused):
            pass


def test_without_distributed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # as if the extra were not installed
    with pytest.raises(Refused) as caught:
        require_distributed(Refused)
    assert str(caught.value) == MISSING_DISTRIBUTED and "diffbank[cluster]" in MISSING_DISTRIBUTED


def test_cluster_label_says_where_the_work_runs():
    assert cluster_label(3, None) == "a local cluster of 3 process(es)"
    assert cluster_label(None, "tcp://h:8786") == "tcp://h:8786"


def _loaded(module: str) -> bool:
    return module in sys.modules


def _costly_settings() -> tuple[str | None, bool, str]:
    import dask

    profile, tick = (dask.config.get(f"distributed.{k}") for k in ("worker.profile.enabled", "admin.tick.interval"))
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), bool(profile), tick


def test_a_local_cluster_starts_in_the_background_and_its_workers_preload_modules():
    pytest.importorskip("dask.distributed")
    # colorsys: a module neither dask nor a worker imports by itself
    with starting_client(2, None, Refused, preload=["colorsys"]) as starting:
        assert not starting.start_seconds  # __init__ returned before the cluster was up
        client, n = starting.get()
        assert n == 2 and starting.start_seconds["wall_s"] > 0
        assert list(client.run(_loaded, "colorsys").values()) == [True, True]
        # LOCAL_CLUSTER_CONFIG reached the workers: no 64 KiB malloc trim, no statistical profiler, slow ticks
        assert list(client.run(_costly_settings).values()) == [(None, False, "1s")] * 2
        assert starting._cluster.scheduler._tick_interval == 1.0  # the scheduler, in this process, too
        starting.close_soon()
        starting.close()
        assert client.status == "closed"
