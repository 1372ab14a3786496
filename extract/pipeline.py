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
in the store and reused on resume. cuDNN runs with benchmark off and deterministic algorithms on.

Loading and writing overlap the compute in threads (extract/overlap.py); the compute of one
micro-batch is extract/compute.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dask.utils import format_bytes

from extract.compute import (
    Computer,
    ExtractionError,
    ExtractionInterrupted,
    UnitJob,
    compute_threads,
    configure_determinism,
    device_name,
    resolve_device,
)
from extract.overlap import UnitWriter, load_batch, plan_batches, prefetch
from extract.sources import ImageSource, open_source
from extract.spec import Spec, extension_problem, load_spec
from extract.store import FeatureInfo, StoreError, StoreWriter, create_store
from extract.store.lease import LeaseLost, acquire
from extract.store.writer import store_state

log = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH = 64  # rows per U-Net call; fixed so the bytes never depend on --batch-size
# torch threads per process: one, whatever the machine, so the bytes do not depend on the number of
# workers or cores (see compute_threads), and because spinning OpenMP threads on shared cores cost 5-8x.
DEFAULT_THREADS = 1
NOISE_SEED_RULE = (
    "noise for (seed, sample index i, timestep t, draw d): torch.randn on the CPU in float32 "
    "from a torch.Generator seeded with blake2b-64('diffbank-noise/{seed}/{i}/{t}/{d}') "
    "(extract.diffusion.noise_seed); features are averaged over draws d = 0..draws-1; the "
    "flip view uses the mirrored x_t of the centre view"
)
SEPARATE_DRAWS_RULE = (
    "combine: separate: the {k} draws are not averaged; draw d of a feature is its own array, draw 0 under the "
    "feature's name (the array a one-draw store holds) and draw d >= 1 under the name plus _d<d> "
    "(extract.features.draw_name); each costs one forward per image, timestep and view"
)
# A unit (shard) should take about a minute on a reference device, so an interrupted run loses little.
# The reference is fixed, not the machine at hand, so a spec always gets the same layout and bytes:
# ~10 TMAC/s, a mid-range GPU in float32. On a 2-core CPU (~25 GMAC/s) the store's minimum number
# of units (extract.store.layout.MIN_UNITS) keeps units short instead.
REFERENCE_MACS_PER_S = 10e12
UNIT_SECONDS = 60.0
TIMESTEP_CONVENTION = (
    "t is the 0-based index of the diffusion_steps-step process (alpha_bar_0 = 1 - beta_0); "
    "the U-Net receives that raw integer"
)


# ---------------------------------------------------------------------------------------------
# Preparation (the client side: validation, model provenance, store creation)
# ---------------------------------------------------------------------------------------------


def store_features(spec: Spec) -> list[FeatureInfo]:
    """The store arrays a spec asks for, as the store describes them."""
    return [
        FeatureInfo(
            name=f.name,
            t=f.t,
            block=f.block,
            module=f.module,
            channels=f.channels,
            resolution=f.resolution,
            pool_kind=f.pool_kind,
            pool_size=f.pool_size,
            shape=tuple(f.shape),
            dtype=spec.storage.dtype,
            view=f.view,
            draw=f.draw,
            draws=f.draws,
        )
        for f in spec.features()
    ]


def macs_per_sample(spec: Spec) -> float:
    """A rough multiply-accumulate count of one sample's U-Net passes (3x3 convolutions dominate).

    Each block up to the deepest requested one counts as two 3x3 convolutions at its width and map
    size; passes = timesteps x draws x views.
    """
    deepest = max(f.block for f in spec.features())
    per_pass = sum(2 * 9 * b.channels**2 * b.resolution**2 for b in spec.block_table[:deepest])
    views = int(spec.views.center) + int(spec.views.hflip)
    return float(per_pass * len(spec.grid.timesteps) * spec.noise.draws * max(1, views))


def unit_rows_for(spec: Spec) -> int:
    """The most rows a unit may hold so it computes in about UNIT_SECONDS on the reference device."""
    return max(1, int(UNIT_SECONDS * REFERENCE_MACS_PER_S / max(macs_per_sample(spec), 1.0)))


def as_spec(spec: Spec | str | os.PathLike | Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> Spec:
    """A validated Spec (raises extract.spec.SpecError listing every problem, before any work)."""
    return spec if isinstance(spec, Spec) else load_spec(spec, base_dir=base_dir)


def _check_model_supported(spec: Spec) -> None:
    if spec.model.flags.get("class_cond"):
        raise ExtractionError(
            "this model is class-conditional: its features would need the class label as input, "
            "which leaks the label into what is probed; use an unconditional model"
        )


def checkpoint_path(spec: Spec) -> Path | None:
    """The checkpoint as a filesystem path (embedded names resolved); None for random weights."""
    from extract.models.registry import EMBEDDED_PREFIX, resolve_checkpoint

    c = spec.model.checkpoint
    if c is None:
        return None
    if c.startswith(EMBEDDED_PREFIX):
        return resolve_checkpoint(c)
    p = Path(c).expanduser()
    return p if p.is_absolute() else Path(spec.dataset.base_dir) / p


def build(spec: Spec, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    from extract.models.registry import build_model

    model, record = build_model(
        spec.model.preset,
        dict(spec.model.flags),
        None if spec.model.checkpoint is None else str(checkpoint_path(spec)),
        spec.model.init_seed,
    )
    return model.to(device), record


@dataclasses.dataclass
class Prepared:
    spec: Spec
    source: ImageSource
    writer: StoreWriter
    model: torch.nn.Module | None
    device: torch.device
    micro_batch: int
    threads: int


def model_record(spec: Spec) -> dict[str, Any]:
    """The model's provenance without building it (the checkpoint is hashed, not loaded)."""
    from extract.models.checkpoints import sha256_file

    path = checkpoint_path(spec)
    return {
        "preset": spec.model.preset,
        "flags": dict(spec.model.flags),
        "checkpoint": spec.model.checkpoint,
        "checkpoint_sha256": sha256_file(path) if path is not None else None,
        "init": "checkpoint" if path is not None else f"random(seed={spec.model.init_seed})",
    }


def prepare(
    spec: Spec | str | os.PathLike | Mapping[str, Any],
    store_url: str | os.PathLike,
    *,
    device: str | None = None,
    micro_batch: int | None = None,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    load_model: bool = True,
    break_lease: bool = False,
) -> Prepared:
    """Validate, open the source, take the store's writer lease, load the model, create (or reopen /
    extend) the store.

    Everything that can refuse the run (a newer-format or read-only store, another writer) does so
    before the model is built. With load_model=False (a cluster's client) the checkpoint is only
    hashed; workers load it. The returned writer holds the lease until `finalize()` or `release()`.
    """
    spec = as_spec(spec)
    _check_model_supported(spec)
    url = os.fspath(store_url)
    store_state(url, storage_options)  # a newer-format store is refused before anything else
    lease = acquire(url, storage_options, break_stale=break_lease)  # read-only media refused here
    try:
        return _prepare(spec, url, device, micro_batch, threads, storage_options, load_model)
    finally:
        lease.release()  # the writer holds its own reference


def _prepare(
    spec: Spec,
    store_url: str,
    device: str | None,
    micro_batch: int | None,
    threads: int | None,
    storage_options: dict[str, Any] | None,
    load_model: bool,
) -> Prepared:
    dev = resolve_device(device or spec.compute.device)
    mb = int(micro_batch or DEFAULT_MICRO_BATCH)
    if mb < 1:
        raise ExtractionError(f"micro_batch must be positive, got {mb}")
    n_threads = int(threads or DEFAULT_THREADS)
    if n_threads < 1:
        raise ExtractionError(f"threads must be positive, got {n_threads}")
    source = open_source(spec.dataset)
    if len(source) == 0:
        raise ExtractionError(f"the dataset ({source.describe()}) has no rows for splits {spec.dataset.splits}")
    log.info(
        f"{len(source)} images x {len(spec.features())} features -> about "
        f"{format_bytes(spec.estimated_bytes(len(source)))} uncompressed ({spec.storage.dtype}); "
        f"{spec.cost_summary(len(source))}"
    )
    if load_model:
        model, built = build(spec, dev)
        record = {k: built.get(k) for k in ("preset", "flags", "checkpoint", "checkpoint_sha256", "init")}
    else:
        model, record = None, model_record(spec)
    provenance = {
        **record,
        "noise_seed_rule": NOISE_SEED_RULE,
        **({"noise_draws": SEPARATE_DRAWS_RULE.format(k=spec.noise.draws)} if spec.noise.combine == "separate" else {}),
        "timestep_convention": TIMESTEP_CONVENTION,
        "dataset": source.describe(),
        "dataset_manifest_sha256_source": source.manifest_hash(),
        "compute": {
            "micro_batch": mb,
            "threads": n_threads,
            "dtype": spec.compute.dtype,
            "device": str(dev),
            "device_name": device_name(dev),
            "cudnn_deterministic": dev.type == "cuda",
        },
        "preprocess": spec.dataset.preprocess,
        "image_size": spec.dataset.image_size,
    }
    writer = create_store(
        store_url,
        spec.to_dict(),
        len(source),
        source.sample_ids,
        source.labels,
        source.splits,
        list(source.class_names) or None,
        provenance,
        features=store_features(spec),
        shard_rows=spec.storage.shard_rows,
        chunk_rows=spec.storage.chunk_rows,
        compression=spec.storage.compressor,
        storage_options=storage_options,
        fingerprint=spec.fingerprint,
        can_extend=lambda old: extension_problem(old, spec),
        max_shard_rows=unit_rows_for(spec),
    )
    try:
        return _check_reopened(spec, store_url, writer, record, dev, mb, threads, source, model)
    except BaseException:
        writer.release()
        raise


def _check_reopened(
    spec: Spec,
    store_url: str,
    writer: StoreWriter,
    record: dict[str, Any],
    dev: torch.device,
    mb: int,
    threads: int | None,
    source: ImageSource,
    model: torch.nn.Module | None,
) -> Prepared:
    stored = writer.attrs.get("provenance", {})
    stored_threads = stored.get("compute", {}).get("threads")
    if threads and stored_threads and int(threads) != int(stored_threads):
        log.warning(
            f"{store_url} was started with {stored_threads} torch thread(s) per process, which decides "
            f"its bytes; continuing with {stored_threads}, not --threads {threads}"
        )
    if stored.get("checkpoint_sha256") != record.get("checkpoint_sha256"):
        raise StoreError(
            f"{store_url} was written with checkpoint sha256 {stored.get('checkpoint_sha256')}; the "
            f"checkpoint now at {spec.model.checkpoint} has {record.get('checkpoint_sha256')}: refusing "
            f"to mix weights in one store"
        )
    if stored.get("compute", {}).get("device", str(dev)).split(":")[0] != dev.type:
        log.warning(
            f"this store was started on {stored['compute']['device']}; resuming on {dev} may give "
            f"slightly different bytes for the remaining units"
        )
    # Resume with the grouping the store was started with: it decides the bytes.
    mb = int(stored.get("compute", {}).get("micro_batch", mb))
    n_threads = int(stored_threads or threads or DEFAULT_THREADS)
    return Prepared(spec, source, writer, model, dev, mb, n_threads)


# ---------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------


def run_units(
    prepared: Prepared,
    units: Iterable[int] | None = None,
    *,
    strict: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Compute and write every unmarked (unit, feature) pair of `units` (None: all units)."""
    writer = prepared.writer
    if prepared.model is None:
        raise ExtractionError("run_units needs a loaded model (prepare(..., load_model=True))")
    pending = writer.pending()
    wanted = sorted(pending) if units is None else sorted(u for u in set(units) if u in pending)
    infos = writer.infos
    jobs = {u: UnitJob(u, [infos[name] for name in pending[u]]) for u in wanted}
    configure_determinism(prepared.device)
    with compute_threads(prepared.threads):
        return _run_units(prepared, jobs, wanted, pending, strict, progress, batch_size, num_workers)


def _run_units(
    prepared: Prepared,
    jobs: dict[int, UnitJob],
    wanted: list[int],
    pending: Mapping[int, Any],
    strict: bool,
    progress: bool,
    batch_size: int | None,
    num_workers: int | None,
) -> dict[str, Any]:
    spec, writer, source = prepared.spec, prepared.writer, prepared.source
    computer = Computer(prepared.model, spec, prepared.device)
    mb = prepared.micro_batch
    batches = plan_batches(writer, wanted, mb)
    load_rows = max(1, int(batch_size or spec.compute.batch_size))
    workers = max(1, int(num_workers if num_workers is not None else spec.compute.num_workers) or 2)
    depth = max(2, (load_rows + mb - 1) // mb * 2)  # about two loading batches ahead
    total = sum(len(b[2]) for b in batches)
    bar = _progress_bar(total, progress)
    unit_writer = UnitWriter(writer)
    failures: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    images = 0
    buffers: dict[str, np.ndarray] = {}
    errors: list[str] = []
    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffbank-load") as loader,
            torch.inference_mode(),
        ):
            load = functools.partial(load_batch, source, spec.dataset.image_size, spec.dataset.preprocess)
            for batch in prefetch(loader, load, batches, depth):
                job = jobs[batch.unit]
                start, stop = writer.unit_rows(batch.unit)
                if batch.offset == 0:
                    buffers = {f.name: np.zeros((stop - start, *f.shape), np.float32) for f in job.features}
                    errors = [""] * (stop - start)
                bad = [(sid, e) for sid, e in zip(batch.ids, batch.errors) if e]
                if bad and strict:
                    raise ExtractionError(
                        f"unreadable image {bad[0][0]} (strict mode): {bad[0][1]}; nothing of "
                        f"unit {batch.unit} (rows {start}-{stop - 1}) was written"
                    )
                result = computer.compute(batch.x0, batch.indices, job)
                rows = slice(batch.offset, batch.offset + len(batch.indices))
                for name, arr in result.items():
                    buffers[name][rows] = arr
                errors[rows] = batch.errors
                for index, sid, err in zip(batch.indices, batch.ids, batch.errors):
                    if err:
                        failures.append({"index": int(index), "id": sid, "reason": err})
                images += len(batch.indices)
                bar.update(len(batch.indices))
                if batch.offset + len(batch.indices) == stop - start:  # the unit is complete
                    valid = np.array([e == "" for e in errors])
                    unit_writer.put(batch.unit, buffers, valid, errors)
                    buffers, errors = {}, []
    finally:
        bar.close()
        unit_writer.close()
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
        "write_seconds": unit_writer.seconds,
        "forwards": computer.forwards,
        "images_per_s": images / wall if wall > 0 else None,
        "device": str(prepared.device),
        "micro_batch": mb,
        "threads": prepared.threads,
    }


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="extract", disable=not enabled, smoothing=0.1, dynamic_ncols=True)


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
                prepared, units, strict=strict, progress=progress, batch_size=batch_size, num_workers=num_workers
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
) -> dict[str, Any]:
    """A cluster task: reopen the store for data writes only (no metadata) and compute `units`."""
    spec = load_spec(dict(spec_dict), base_dir=base_dir)
    writer = StoreWriter.open(store_url, storage_options)
    if writer.fingerprint != spec.fingerprint:
        raise StoreError(
            f"{store_url} has fingerprint {writer.fingerprint[:12]}, the task's spec {spec.fingerprint[:12]}"
        )
    dev = resolve_device(device or spec.compute.device)
    model, _ = build(spec, dev)
    compute = writer.attrs.get("provenance", {}).get("compute", {})
    mb = int(compute.get("micro_batch", DEFAULT_MICRO_BATCH))
    threads = int(compute.get("threads") or DEFAULT_THREADS)
    prepared = Prepared(spec, open_source(spec.dataset), writer, model, dev, mb, threads)
    return run_units(prepared, units, strict=strict, progress=False, batch_size=batch_size)


def spec_base_dir(spec: Spec) -> str:
    return str(Path(spec.dataset.base_dir))
