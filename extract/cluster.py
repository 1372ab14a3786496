"""Run an extraction on dask.distributed: whole shards per task, metadata from the client only.

The client validates the spec, creates (or reopens) the store and writes all metadata; each task
reopens the store for data writes, computes a contiguous range of whole units (shards) and marks
them. Units never straddle tasks, so no two processes ever write one shard, and the bytes are those
of a single-process run whatever the number of workers (see extract.pipeline on determinism).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from extract.compute import ExtractionError
from extract.dask_client import check_shared_url, cluster_label, dask_client, require_distributed
from extract.pipeline import run_units_worker, spec_base_dir
from extract.prepare import prepare
from extract.progress import progress_bar

log = logging.getLogger(__name__)


def plan_ranges(units: Sequence[int], n_workers: int, tasks_per_worker: int = 4) -> list[list[int]]:
    """Split pending units into contiguous runs of whole units, a few per worker for load balance."""
    units = sorted(set(int(u) for u in units))
    if not units:
        return []
    n_tasks = max(1, min(len(units), n_workers * tasks_per_worker))
    size = math.ceil(len(units) / n_tasks)
    return [units[i : i + size] for i in range(0, len(units), size)]


def _merge(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "units_computed": [],
        "images": 0,
        "failures": [],
        "model_seconds": 0.0,
        "write_seconds": 0.0,
        "forwards": 0,
    }
    for s in summaries:
        out["units_computed"] += list(s["units_computed"])
        out["failures"] += list(s["failures"])
        for key in ("images", "model_seconds", "write_seconds", "forwards"):
            out[key] += s[key]
    out["units_computed"].sort()
    out["failures"].sort(key=lambda f: f["index"])
    return out


def extract_distributed(
    spec: Any,
    store_url: str | os.PathLike,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    strict: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    micro_batch: int | None = None,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """`extract.pipeline.extract` spread over a LocalCluster of `workers` processes or a scheduler address.

    The client builds no model, so the one-image check of extract.finite is left to the workers' units.
    """
    require_distributed(ExtractionError)
    url = check_shared_url(store_url, ExtractionError)
    if scheduler is None and workers < 1:
        raise ExtractionError(f"--workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    prepared = prepare(
        spec,
        url,
        device=device,
        micro_batch=micro_batch,
        threads=threads,
        storage_options=storage_options,
        load_model=False,
    )
    writer, resolved = prepared.writer, prepared.spec
    pending = writer.pending()
    done_before = sorted(set(range(writer.num_units)) - set(pending))
    if scheduler is None:
        gpus = torch.cuda.device_count() if prepared.device.type == "cuda" else 0
        if gpus and workers > gpus:
            log.warning(f"{workers} workers share {gpus} GPU(s): worker k runs on GPU k mod {gpus}")
    summaries = []
    with dask_client(None if scheduler else workers, scheduler, ExtractionError) as (client, n_workers):
        from dask.distributed import as_completed

        ranges = plan_ranges(sorted(pending), n_workers)
        log.info(
            f"{url}: {len(pending)} of {writer.num_units} unit(s) in {len(ranges)} task(s) on "
            f"{cluster_label(workers, scheduler)}"
        )
        bar = progress_bar(
            total=sum(writer.unit_rows(u)[1] - writer.unit_rows(u)[0] for u in pending),
            unit="img",
            desc="extract",
            enabled=progress,
        )
        try:
            futures = [
                client.submit(
                    run_units_worker,
                    resolved.to_dict(),
                    spec_base_dir(resolved),
                    url,
                    rng,
                    device=device,
                    batch_size=batch_size,
                    strict=strict,
                    storage_options=storage_options,
                    allow_nonfinite=allow_nonfinite,
                    pure=False,
                )
                for rng in ranges
            ]
            for fut in as_completed(futures):
                result = fut.result()  # a task's failure (strict mode, a bad store) stops the run here
                summaries.append(result)
                bar.update(result["images"])
        finally:
            bar.close()
    writer.finalize()  # the client alone writes metadata
    summary = _merge(summaries)
    wall = time.perf_counter() - t0
    summary.update(
        {
            "store": url,
            "units_total": writer.num_units,
            "units_already_done": done_before,
            "seconds": wall,
            "images_per_s": summary["images"] / wall if wall > 0 else None,
            "tasks": len(ranges),
            "workers": n_workers,
            "complete": not writer.pending(),
            "fingerprint": writer.fingerprint,
            "micro_batch": prepared.micro_batch,
            "threads": prepared.threads,
        }
    )
    return summary


__all__ = ["extract_distributed", "plan_ranges"]
