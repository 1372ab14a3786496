"""A linear sweep's heads trained on dask.distributed workers (`diffbank probe sweep --workers/--scheduler`).

The client splits the sweep's features into parts, one per worker; each task opens the store itself (a local
path or an fsspec URL with the run's storage options), reads its features and trains every lr of each in one
pass (`train_part`). It returns its heads' results, weights and, per feature, the validation and test logits
of the head selected for that feature. The client merges them in the one-process order, so selection, tables,
figures, weights and logits.npz are those of `probe.run.run_sweep` in one process:

- a head's initial weights come from `seeded_init(seed)` alone (`sweep_heads`);
- its batches come from the seed and the epoch order's unit and window (`probe.order.OrderUnits`), which are
  sized from a row of every feature read together; the client gives each part the whole sweep's units, so a
  part sees the batches of the one-process pass whatever features it holds;
- heads share no parameters and a feature's lrs stay in one part (one fused matmul, as in one process).

Weights are then bit-identical when each process runs torch on one thread (a LocalCluster's workers do).
A worker that dies mid-task is replaced and its task rerun (the scheduler reschedules the tasks of a lost
worker; `retries` reruns a task that raised), so no feature is lost. Parts keep no checkpoint: an interrupted
distributed sweep restarts from its first epoch.

Fixed costs are kept off the critical path: the cluster starts in the background (`probe.sweep_cluster`, from the
CLI before the client imports torch), its workers preloading the probe modules; the client imports what its
report needs while the parts train, and closes the cluster while it writes the report. The client's and each
part's phases (wall and CPU seconds) are recorded in results.json under "cluster".
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.dask_client import StartingClient, check_shared_url, cluster_label
from extract.progress import progress_bar
from extract.store import open_store
from extract.store.layout import is_local, local_path
from probe.budget import parse_memory
from probe.data import ProbeData
from probe.fitting import split_logits
from probe.head_results import HeadResult, SweepResult, select_heads
from probe.heads import LinearHead, seeded_init
from probe.job import Job, probe_data
from probe.options import SweepOptions
from probe.order import OrderUnits
from probe.phase_clock import PhaseClock
from probe.recipe import ProbeConfigError, Recipe
from probe.stream import FeatureStream
from probe.trainer import train_many

__all__ = ["sweep_heads", "plan_parts", "train_part", "train_on_workers", "PartResult", "RETRIES"]

log = logging.getLogger(__name__)
# Reruns of a task that raised (a lost worker's tasks are rescheduled by the scheduler on its own).
RETRIES = 2
# A feature's training cost beyond its elements, in elements: its heads' per-step work (dispatch, loss, optimizer
# step) costs about as much as 1,000 more input elements (measured on 2 CPU cores at 20 classes: 0.18 s a feature
# against 1.9e-4 s an element, 12,000 rows x 3 epochs), so parts balanced by elements alone differ by their counts.
FEATURE_COST = 1000
# What the client's report loads on first use (scoring: sklearn and scipy; figures: matplotlib), seconds each.
REPORT_IMPORTS = ("sklearn.metrics", "matplotlib.pyplot")


def sweep_heads(
    data: ProbeData, features: Sequence[str], lrs: Sequence[float], seed: int
) -> tuple[dict[str, nn.Module], dict[str, str], dict[str, float]]:
    """One linear head per feature x lr (keys "feature@lr=0.01"), each from `seeded_init(seed)`: every lr of a
    feature starts from the same weights, which are `run_linear`'s, whatever else is trained with it."""
    heads: dict[str, nn.Module] = {}
    inputs: dict[str, str] = {}
    lr_of: dict[str, float] = {}
    for name in features:
        for lr in lrs:
            key = f"{name}@lr={lr:g}"
            with seeded_init(seed):
                heads[key] = LinearHead(data.feature_shapes[name], data.num_classes)
            inputs[key], lr_of[key] = name, lr
    return heads, inputs, lr_of


def plan_parts(sizes: dict[str, int], n_parts: int) -> list[list[str]]:
    """Features split into at most `n_parts` parts of about equal cost (`sizes`: a cost per feature; largest first
    onto the lightest part),
    each part in the sweep's feature order; empty parts are dropped."""
    order = {n: i for i, n in enumerate(sizes)}
    parts: list[list[str]] = [[] for _ in range(max(1, min(n_parts, len(sizes))))]
    load = [0] * len(parts)
    for name in sorted(sizes, key=lambda n: (-sizes[n], order[n])):
        i = load.index(min(load))
        parts[i].append(name)
        load[i] += sizes[name]
    return [sorted(p, key=order.__getitem__) for p in parts if p]


@dataclasses.dataclass
class PartResult:
    """What one task returns: per head its result and weights; the {split: logits} of the part's best head, keyed
    by its feature; where it ran, and the wall and CPU seconds of its phases (its process's start-up before the task too)."""

    results: dict[str, HeadResult]
    states: dict[str, dict[str, torch.Tensor]]
    logits: dict[str, dict[str, np.ndarray]]
    worker: str
    phases: dict[str, dict[str, float]]


def train_part(
    url: str,
    storage_options: dict[str, Any] | None,
    features: list[str],
    options: SweepOptions,
    recipe: Recipe,
    order: OrderUnits,
    memory_budget: int | None,
) -> PartResult:
    """A dask task: train every lr of `features` in one pass, as the one-process sweep trains them."""
    before = _process_record()
    clock = PhaseClock()
    store = open_store(url, storage_options)
    data = probe_data(
        store,
        features,
        options,
        recipe.standardize,
        options.draws,
        options.eval_draws,
        memory_budget=memory_budget,
        order_units=order,
    )
    data.load()
    clock.lap("data")
    heads, inputs, lr_of = sweep_heads(data, features, recipe.learning_rates, options.seed)
    batch = recipe.batch_size
    result = train_many(
        heads,
        inputs,
        FeatureStream(data, "train", batch, shuffle=True),
        FeatureStream(data, "val", batch, shuffle=False),
        FeatureStream(data, "test", batch, shuffle=False),
        lrs=lr_of,
        recipe=recipe,
        progress=False,
        device=options.device,
    )
    clock.lap("train")
    # Only the part's best head can be the sweep's best (the same rule over a sub-order of the same heads), so
    # its logits are all the client needs: a part's val/test logits for every feature grew with its features.
    assert result.best is not None  # a validation split always exists
    best = str(result.best)
    feature = str(result.heads[result.best].input)
    logits = split_logits(data, {feature: (heads[best], feature)}, recipe, options.device)
    states = {k: {n: t.detach().cpu().clone() for n, t in h.state_dict().items()} for k, h in heads.items()}
    clock.lap("eval")
    return PartResult(
        results={str(k): r for k, r in result.heads.items()},
        states=states,
        logits=logits,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        phases={"before_task": before, **clock.phases},
    )


def _process_record() -> dict[str, float]:
    """This process's age and CPU seconds so far: in a worker, before its task, its start-up and imports."""
    import psutil  # a dependency of dask.distributed, which runs this

    return {
        "wall_s": round(time.time() - psutil.Process().create_time(), 4),
        "cpu_s": round(time.process_time(), 4),
    }


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name)


def _worker_url(url: str) -> str:
    """A local store as an absolute path, so workers started elsewhere (another cwd) open the same store."""
    return str(local_path(url).resolve()) if is_local(url) else url


def train_on_workers(
    job: Job,
    recipe: Recipe,
    options: SweepOptions,
    heads: dict[str, nn.Module],
    progress: bool,
    cluster: StartingClient,
) -> tuple[SweepResult, dict[str, np.ndarray], dict[str, Any]]:
    """Train `heads` (the sweep's, from `sweep_heads`) on the workers of `cluster`; their weights are loaded in
    place. The cluster is closed in the background once every part is in (the caller waits for it at its end).

    Returns the merged result (selection as in one process), the selected head's {split: logits} and a record
    of the parts (features, worker, phases) and of the client's phases (wall and CPU seconds)."""
    store = job.store
    url = _worker_url(check_shared_url(store.url, ProbeConfigError))
    local = options.scheduler is None
    started = time.perf_counter()
    client_before = _process_record()
    clock = PhaseClock()
    client, n = cluster.get()
    clock.lap("cluster_wait")
    from dask.distributed import as_completed  # the optional extra `cluster`, there once the client started

    try:
        costs = {name: int(np.prod(job.data.feature_shapes[name])) + FEATURE_COST for name in job.features}
        parts = plan_parts(costs, n)
        # Local workers share this machine's memory: each gets its share of the budget.
        budget = parse_memory(options.memory_budget) // n if local else None
        log.info(
            "%d feature(s) in %d part(s) on %s", len(job.features), len(parts), cluster_label(n, options.scheduler)
        )
        order = job.data.order_units()
        clock.lap("plan")
        futures = {
            client.submit(
                train_part,
                url,
                store.storage_options,
                part,
                options,
                recipe,
                order,
                budget,
                retries=RETRIES,
                pure=False,
            ): i
            for i, part in enumerate(parts)
        }
        # The client idles while the parts train: it loads what its report imports meanwhile, not after them.
        importing = threading.Thread(target=_import_all, args=(REPORT_IMPORTS,), name="report-imports", daemon=True)
        importing.start()
        done: dict[int, PartResult] = {}
        bar = progress_bar(total=len(job.features), desc="sweep", unit="feature", enabled=progress)
        try:
            for fut in as_completed(futures):
                part_result = fut.result()
                done[futures[fut]] = part_result
                bar.update(len(parts[futures[fut]]))
        finally:
            bar.close()
        clock.lap("wait")
        # done before the report uses them: matplotlib.use() would meet a half-imported pyplot
        importing.join()
        clock.lap("report_imports")
    finally:
        cluster.close_soon()  # nothing is left on the workers: the merge does not wait for their exit
    results: dict[Hashable, HeadResult] = {}
    by_key = {k: r for p in done.values() for k, r in p.results.items()}
    states = {k: s for p in done.values() for k, s in p.states.items()}
    for key, head in heads.items():  # the one-process order, which decides ties
        results[key] = by_key[key]
        head.load_state_dict(states[key])
    merged = select_heads(results, selected=True, wall_time_s=time.perf_counter() - started)
    best = str(merged.best)
    feature = str(results[best].input)
    # A feature's selected head is chosen among its own heads by the same rule, so the overall best is one of them.
    assert str(merged.best_per_input[feature]) == best
    logits = next(p.logits[feature] for p in done.values() if feature in p.logits)
    clock.lap("merge")
    record = {
        "workers": n,
        "scheduler": options.scheduler,
        "client": {
            "before": client_before,
            "cluster_start_thread": {k: round(v, 4) for k, v in cluster.start_seconds.items()},
            **clock.phases,
        },
        "parts": [{"features": parts[i], "worker": done[i].worker, **done[i].phases} for i in sorted(done)],
    }
    return merged, logits, record
