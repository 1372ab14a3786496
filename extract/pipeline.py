"""The extraction loop: images -> seeded noise -> U-Net taps -> pooling -> store, unit by unit.

One *unit* is one shard of rows (the store's work unit). For each unit with unmarked features:

    load + preprocess (background threads) -> x0 -> for each timestep and draw: seeded noise,
    q_sample, one forward that serves every requested block and stops after the deepest ->
    average over draws (or keep each draw) -> pool -> unit buffer -> writer thread -> whole shards, then markers.

Determinism. Each sample's noise depends only on (seed, sample index, t, draw). The U-Net runs on
fixed *micro-batches*: the rows of a unit taken `micro_batch` at a time from the unit's first row.
CPU (oneDNN) and GPU convolution kernels pick different blocking for different batch sizes, so the
same image in a batch of 3 and of 8 differs in the last bits; fixing the grouping by row position
makes the bytes independent of `--batch-size` (which only sizes loading), of the number of workers
and of resumption. oneDNN also splits some convolutions by thread count, so every process computes
with the same number of torch threads (`--threads`, default 1). Micro-batch and threads are recorded
in the store and reused on resume. cuDNN runs with benchmark off and deterministic algorithms on, unless
the spec says `compute.deterministic: false` (autotuned kernels: faster, bytes may vary run to run).

What is settled before the first forward (validation, refusals, the model, the store and its
provenance) is extract/prepare.py. Loading (threads or processes, extract/loader.py) and writing (a
thread) overlap the compute (extract/overlap.py); the compute of one micro-batch is extract/compute.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.compute import (
    Computer,
    ExtractionError,
    ExtractionInterrupted,
    UnitJob,
    compute_threads,
    configure_determinism,
    resolve_device,
)
from extract.finite import NonFiniteFeatures, unit_problem
from extract.hardware import machine_signature
from extract.loader import Loader
from extract.overlap import Batch, UnitWriter, plan_batches, prefetch, to_batch
from extract.prepare import (
    DEFAULT_MICRO_BATCH,
    DEFAULT_THREADS,
    Prepared,
    as_spec,
    build,
    prepare,
)
from extract.progress import progress_bar
from extract.sources import open_source
from extract.spec import Spec, load_spec
from extract.store import StoreError, StoreWriter
from extract.store.lease import LeaseLost
from extract.store.state import store_state

log = logging.getLogger(__name__)


def run_units(
    prepared: Prepared,
    units: Iterable[int] | None = None,
    *,
    strict: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    num_workers: int | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Compute and write every unmarked (unit, feature) pair of `units` (None: all units).

    A unit whose features are not finite stops the run before it is written (extract.finite), unless
    `allow_nonfinite`.
    """
    writer = prepared.writer
    if prepared.model is None:
        raise ExtractionError("run_units needs a loaded model (prepare(..., load_model=True))")
    pending = writer.pending()
    wanted = sorted(pending) if units is None else sorted(u for u in set(units) if u in pending)
    infos = writer.infos
    jobs = {u: UnitJob(u, [infos[name] for name in pending[u]]) for u in wanted}
    configure_determinism(prepared.device, prepared.spec.compute.deterministic)
    with compute_threads(prepared.threads):
        return _run_units(prepared, jobs, wanted, pending, strict, progress, batch_size, num_workers, allow_nonfinite)


def _run_units(
    prepared: Prepared,
    jobs: dict[int, UnitJob],
    wanted: list[int],
    pending: Mapping[int, Any],
    strict: bool,
    progress: bool,
    batch_size: int | None,
    num_workers: int | None,
    allow_nonfinite: bool,
) -> dict[str, Any]:
    spec, writer, source = prepared.spec, prepared.writer, prepared.source
    if prepared.model is None:
        raise ValueError("the run was prepared without its model (load_model=False); prepare it with the model")
    computer = Computer(prepared.model, spec, prepared.device, labels=source.labels)
    mb = prepared.micro_batch
    batches = plan_batches(writer, wanted, mb)
    load_rows = max(1, int(batch_size or spec.compute.batch_size))
    processes = int(num_workers if num_workers is not None else spec.compute.num_workers)
    depth = max(2, (load_rows + mb - 1) // mb * 2, 2 * processes)  # about two loading batches ahead
    total = sum(len(b[2]) for b in batches)
    bar = _progress_bar(total, progress)
    unit_writer = UnitWriter(writer, machine=machine_signature(prepared.device, prepared.threads))
    assembler = UnitAssembler(writer, unit_writer, None if allow_nonfinite else spec.storage.dtype)
    t_start = time.perf_counter()
    in_flight: list[tuple[Batch, Any]] = []  # at most one micro-batch queued on the device

    def finish_in_flight() -> None:
        while in_flight:
            done, wait = in_flight.pop()
            assembler.add(done, jobs[done.unit], wait())
            bar.update(len(done.indices))

    try:
        with (
            Loader(source, spec.dataset.image_size, spec.dataset.preprocess, processes) as loader,
            torch.inference_mode(),
        ):
            pin = prepared.device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
            for loaded in prefetch(loader.submit, batches, depth):
                batch = to_batch(loaded, pin)
                bad = [(sid, e) for sid, e in zip(batch.ids, batch.errors) if e]
                if bad and strict:
                    finish_in_flight()  # an earlier unit that is complete is kept
                    start, stop = writer.unit_rows(batch.unit)
                    raise ExtractionError(
                        f"unreadable image {bad[0][0]} (strict mode): {bad[0][1]}; nothing of "
                        f"unit {batch.unit} (rows {start}-{stop - 1}) was written"
                    )
                wait = computer.submit(batch.pixels, batch.indices, jobs[batch.unit])
                finish_in_flight()  # the previous micro-batch, while this one runs on the device
                in_flight.append((batch, wait))
            finish_in_flight()
    except KeyboardInterrupt:
        finish_in_flight()  # computed already: keep it (it may complete a unit)
        raise
    finally:
        bar.close()
        unit_writer.close()
    failures, images = assembler.failures, assembler.images
    wall = time.perf_counter() - t_start
    return {
        "store": writer.url,
        "units_total": writer.num_units,
        "units_computed": sorted(unit_writer.written),
        "units_already_done": sorted(set(range(writer.num_units)) - set(pending)),
        "images": images,
        "failures": failures,
        "seconds": wall,
        "model_seconds": computer.model_seconds,
        "compile_seconds": computer.compile_seconds,
        "write_seconds": unit_writer.seconds,
        "forwards": computer.forwards,
        "images_per_s": images / wall if wall > 0 else None,
        "device": str(prepared.device),
        "micro_batch": mb,
        "threads": prepared.threads,
    }


class UnitAssembler:
    """Collects micro-batch results, in order, into whole units and hands complete ones to the writer.

    With `check_dtype` (the storage dtype), a unit whose features are not finite as stored raises
    NonFiniteFeatures instead of being written.
    """

    def __init__(self, writer: StoreWriter, unit_writer: UnitWriter, check_dtype: str | None = None):
        self.writer, self.unit_writer = writer, unit_writer
        self.check_dtype = check_dtype
        self.buffers: dict[str, np.ndarray] = {}
        self.errors: list[str] = []
        self.failures: list[dict[str, Any]] = []
        self.images = 0

    def add(self, batch: Batch, job: UnitJob, result: dict[str, np.ndarray]) -> None:
        start, stop = self.writer.unit_rows(batch.unit)
        if batch.offset == 0:
            self.buffers = {f.name: np.zeros((stop - start, *f.shape), np.float32) for f in job.features}
            self.errors = [""] * (stop - start)
        rows = slice(batch.offset, batch.offset + len(batch.indices))
        for name, arr in result.items():
            self.buffers[name][rows] = arr
        self.errors[rows] = batch.errors
        for index, sid, err in zip(batch.indices, batch.ids, batch.errors):
            if err:
                self.failures.append({"index": int(index), "id": sid, "reason": err})
        self.images += len(batch.indices)
        if batch.offset + len(batch.indices) == stop - start:  # the unit is complete
            valid = np.array([e == "" for e in self.errors])
            if self.check_dtype is not None:
                problem = unit_problem(batch.unit, (start, stop), self.buffers, valid, self.check_dtype)
                if problem:
                    raise NonFiniteFeatures(problem)
            self.unit_writer.put(batch.unit, self.buffers, valid, self.errors)
            self.buffers, self.errors = {}, []


def _progress_bar(total: int, enabled: bool) -> Any:
    return progress_bar(total=total, unit="img", desc="extract", enabled=enabled, smoothing=0.1)


def extract(
    spec: Spec | str | os.PathLike | Mapping[str, Any],
    store_url: str | os.PathLike,
    *,
    strict: bool = False,
    progress: bool = True,
    units: Iterable[int] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    micro_batch: int | None = None,
    threads: int | None = None,
    num_workers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    finalize: bool = True,
    break_lease: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Extract a spec's features into a store; rerunning resumes (redoes only unmarked units).

    A store that is already complete for this spec is left untouched (nothing is written, so this
    works on read-only media). Returns a summary: units computed / already done, images, failures,
    wall and model seconds.
    """
    spec = as_spec(spec)
    url = os.fspath(store_url)
    done = nothing_to_do(spec, url, storage_options)
    if done is not None:
        return done
    prepared = prepare(
        spec,
        url,
        device=device,
        micro_batch=micro_batch,
        threads=threads,
        storage_options=storage_options,
        break_lease=break_lease,
        allow_nonfinite=allow_nonfinite,
    )
    writer = prepared.writer
    try:
        pending = writer.pending()
        log.info(
            f"{writer.url}: {len(pending)} of {writer.num_units} unit(s) of "
            f"{writer.shard_rows} rows to compute on {prepared.device}"
        )
        try:
            summary = run_units(
                prepared,
                units,
                strict=strict,
                progress=progress,
                batch_size=batch_size,
                num_workers=num_workers,
                allow_nonfinite=allow_nonfinite,
            )
        except ExtractionError as exc:
            exc.resumable = not isinstance(exc.__cause__, LeaseLost)  # the store is another writer's now
            raise
        except (LeaseLost, ExtractionInterrupted):
            raise
        except KeyboardInterrupt as exc:
            raise ExtractionInterrupted(url) from exc
        except Exception as exc:  # anything that stops a run midway leaves finished units to resume from
            raise ExtractionError(f"the run stopped: {type(exc).__name__}: {exc}", resumable=True) from exc
        if finalize:
            writer.finalize()
        summary["complete"] = not writer.pending()
        summary["fingerprint"] = writer.fingerprint
        return summary
    finally:
        writer.release()


def nothing_to_do(
    spec: Spec, store_url: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The summary of a run with nothing to do (the store is complete for this spec), found without
    writing anything; None when there is work. Raises StoreError for a newer-format store."""
    state = store_state(os.fspath(store_url), storage_options)
    if not state.is_done(spec.fingerprint):
        return None
    log.info(f"{state.url}: already complete for this spec; nothing to do")
    units = int(state.attrs.get("num_units", 0))
    return {
        "store": state.url,
        "units_total": units,
        "units_computed": [],
        "units_already_done": list(range(units)),
        "images": 0,
        "failures": [],
        "seconds": 0.0,
        "model_seconds": 0.0,
        "write_seconds": 0.0,
        "forwards": 0,
        "images_per_s": None,
        "complete": True,
        "fingerprint": state.fingerprint,
        "nothing_to_do": True,
    }


def run_units_worker(
    spec_dict: Mapping[str, Any],
    base_dir: str,
    store_url: str,
    units: Sequence[int],
    *,
    device: str | None = None,
    batch_size: int | None = None,
    strict: bool = False,
    storage_options: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """A cluster task: reopen the store for data writes only (no metadata) and compute `units`."""
    spec = load_spec(dict(spec_dict), base_dir=base_dir)
    writer = StoreWriter.open(store_url, storage_options)
    if writer.fingerprint != spec.fingerprint:
        raise StoreError(
            f"{store_url} has fingerprint {writer.fingerprint[:12]}, the task's spec {spec.fingerprint[:12]}"
        )
    dev = worker_device(resolve_device(device or spec.compute.device))
    model, _ = build(spec, dev)
    compute = writer.attrs.get("provenance", {}).get("compute", {})
    mb = int(compute.get("micro_batch", DEFAULT_MICRO_BATCH))
    threads = int(compute.get("threads") or DEFAULT_THREADS)
    prepared = Prepared(spec, open_source(spec.dataset), writer, model, dev, mb, threads)
    return run_units(
        prepared, units, strict=strict, progress=False, batch_size=batch_size, allow_nonfinite=allow_nonfinite
    )


def worker_device(device: torch.device) -> torch.device:
    """`cuda` without an index, in dask worker k of a host with several GPUs: GPU k mod count.

    A LocalCluster names its workers 0..n-1, so `--workers N --device cuda` puts one worker on each GPU;
    workers started elsewhere with their own CUDA_VISIBLE_DEVICES see one GPU and keep `cuda`.
    """
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        return device
    try:
        from dask.distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a dask worker
        return device
    if isinstance(name, int) or str(name).isdigit():
        return torch.device("cuda", int(name) % torch.cuda.device_count())
    return device


def spec_base_dir(spec: Spec) -> str:
    return str(Path(spec.dataset.base_dir))
