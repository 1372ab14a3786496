"""Everything an extraction settles before its first forward: validate the spec, open the source, refuse
what cannot run (a reduced dtype this CPU would emulate, a newer-format or read-only store, another
writer), build the model, calibrate a reduced dtype against float32, and create, reopen or extend the
store with the run's provenance. `prepare` returns a `Prepared` that extract/pipeline.py runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dask.utils import format_bytes

from extract.compute import Computer, ExtractionError, UnitJob, compute_threads, device_name, resolve_device
from extract.finite import model_problem, refuse_nonfinite_model
from extract.hardware import (
    NATIVE_FLAGS,
    SLOWDOWN_WITHOUT,
    cpu_has_native,
    cpu_name,
    describe_signature,
    machine_signature,
    same_kernels,
)
from extract.models.config import EMBEDDED_PREFIX
from extract.models.loading import describe_model, load_model
from extract.models.registry import resolve_checkpoint
from extract.overlap import load_batch
from extract.sources import ImageSource, open_source
from extract.spec import Spec, extension_problem, load_spec
from extract.store import FeatureInfo, NewStore, StoreError, StoreWriter, create_store
from extract.store.lease import acquire
from extract.store.state import store_state

log = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH = 64  # rows per U-Net call; fixed so the bytes never depend on --batch-size
# torch threads per process: one, whatever the machine, so the bytes do not depend on the number of
# workers or cores (see compute_threads), and because spinning OpenMP threads on shared cores cost 5-8x.
DEFAULT_THREADS = 1
NOISE_SEED_RULES = {  # what a store's provenance says of its spec's noise.rule
    "generator": (
        "noise for (seed, sample index i, timestep t, draw d): torch.randn on the CPU in float32 "
        "from a torch.Generator seeded with blake2b-64('diffbank-noise/{seed}/{i}/{t}/{d}') "
        "(extract.diffusion.noise_seed); features are averaged over draws d = 0..draws-1; the "
        "flip view uses the mirrored x_t of the centre view"
    ),
    "counter": (
        "noise for (seed, sample index i, timestep t, draw d), element j: splitmix64(key + (j + 1) * "
        "0x9E3779B97F4A7C15) with key = blake2b-64('diffbank-noise/{seed}/{i}/{t}/{d}'), then float32 "
        "Box-Muller on the compute device (extract.diffusion.counter_noise); features are averaged "
        "over draws d = 0..draws-1; the flip view uses the mirrored x_t of the centre view"
    ),
}
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
    c = spec.model.checkpoint
    if c is None:
        return None
    if c.startswith(EMBEDDED_PREFIX):
        return resolve_checkpoint(c)
    p = Path(c).expanduser()
    return p if p.is_absolute() else Path(spec.dataset.base_dir) / p


def build(spec: Spec, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, record = load_model(spec.model.section(), spec.dataset.base_dir)
    return model.to(device), record


def diffusers_schedule_record(spec: Spec) -> dict[str, Any]:
    """Where a diffusers model's noise schedule came from: its scheduler config, or the spec's named schedule."""
    m = spec.model
    source = {"scheduler": dict(m.scheduler)} if m.scheduler is not None else {"from": "spec (no scheduler/ folder)"}
    return {"name": m.noise_schedule, "steps": m.diffusion_steps, **source}


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
    return describe_model(spec.model.section(), spec.dataset.base_dir)


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
    allow_nonfinite: bool = False,
) -> Prepared:
    """Validate, open the source, take the store's writer lease, load the model, create (or reopen /
    extend) the store.

    Everything that can refuse the run (a newer-format or read-only store, another writer) does so
    before the model is built. With load_model=False (a cluster's client) the checkpoint is only
    hashed; workers load it. The returned writer holds the lease until `finalize()` or `release()`.
    A loaded model whose features on the dataset's first image are not finite is refused before the store
    is created (extract.finite), unless `allow_nonfinite`.
    """
    spec = as_spec(spec)
    _check_model_supported(spec)
    _check_dtype_is_native(spec.compute.dtype, resolve_device(device or spec.compute.device))
    url = os.fspath(store_url)
    store_state(url, storage_options)  # a newer-format store is refused before anything else
    lease = acquire(url, storage_options, break_stale=break_lease)  # read-only media refused here
    try:
        return _prepare(spec, url, device, micro_batch, threads, storage_options, load_model, allow_nonfinite)
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
    allow_nonfinite: bool = False,
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
        model, record = build(spec, dev)
    else:
        model, record = None, model_record(spec)
    if model is not None and not allow_nonfinite:
        with compute_threads(n_threads):
            refuse_nonfinite_model(spec, model, source, dev)
    provenance: dict[str, Any] = {
        **record,
        "noise_seed_rule": NOISE_SEED_RULES[spec.noise.rule],
        **({"noise_draws": SEPARATE_DRAWS_RULE.format(k=spec.noise.draws)} if spec.noise.combine == "separate" else {}),
        "timestep_convention": TIMESTEP_CONVENTION,
        **({"noise_schedule": diffusers_schedule_record(spec)} if spec.model.family == "diffusers" else {}),
        "dataset": source.describe(),
        "dataset_manifest_sha256_source": source.manifest_hash(),
        "compute": {
            "micro_batch": mb,
            "threads": n_threads,
            "dtype": spec.compute.dtype,
            "device": str(dev),
            "device_name": device_name(dev),
            "cudnn_deterministic": dev.type == "cuda" and spec.compute.deterministic,
            "machine": machine_signature(dev, n_threads),
        },
        "preprocess": spec.dataset.preprocess,
        "image_size": spec.dataset.image_size,
    }
    if model is not None and spec.compute.dtype != "float32":
        with compute_threads(n_threads), torch.inference_mode():
            provenance["compute"]["calibration"] = calibrate(spec, source, model, dev, mb)
    new = NewStore(
        num_samples=len(source),
        features=store_features(spec),
        spec=spec.to_dict(),
        sample_ids=source.sample_ids,
        labels=source.labels,
        splits=source.splits,
        class_names=list(source.class_names) or None,
        provenance=provenance,
        fingerprint=spec.fingerprint,
        shard_rows=spec.storage.shard_rows,
        chunk_rows=spec.storage.chunk_rows,
        max_shard_rows=unit_rows_for(spec),
        compression=spec.storage.compressor,
    )
    writer = create_store(
        store_url, new, storage_options=storage_options, can_extend=lambda old: extension_problem(old, spec)
    )
    try:
        return _check_reopened(spec, store_url, writer, record, dev, mb, threads, source, model)
    except BaseException:
        writer.release()
        raise


def model_output_problem(spec: Spec) -> str:
    """Why the spec's model gives non-finite features at its taps on the dataset's first image, or ""
    (extract.finite.model_problem, with the default thread count).

    It runs on the spec's device, or on the CPU where that device is absent here; in float32 where the CPU
    would emulate the spec's reduced dtype (a check of the weights, not of the GPU's arithmetic).
    """
    try:
        dev = resolve_device(spec.compute.device)
    except ExtractionError:
        dev = torch.device("cpu")
    if dev.type == "cpu" and not cpu_has_native(spec.compute.dtype):
        spec = dataclasses.replace(spec, compute=dataclasses.replace(spec.compute, dtype="float32"))
    source = open_source(spec.dataset)
    model, _ = build(spec, dev)
    with compute_threads(DEFAULT_THREADS):
        return model_problem(spec, model, source, dev)


def calibrate(spec: Spec, source: ImageSource, model: torch.nn.Module, device: torch.device, rows: int) -> dict:
    """Per-feature error of the spec's reduced dtype against float32 on the first micro-batch of rows.

    Recorded in the store's provenance, so a reader can judge the autocast's effect on every feature.
    """
    indices = np.arange(min(rows, len(source)), dtype=np.int64)
    batch = load_batch(source, spec.dataset.image_size, spec.dataset.preprocess, False, 0, 0, indices)
    job = UnitJob(0, store_features(spec))
    fp32 = dataclasses.replace(spec, compute=dataclasses.replace(spec.compute, dtype="float32"))
    reference = Computer(model, fp32, device, labels=source.labels).compute(batch.pixels, indices, job)
    reduced = Computer(model, spec, device, labels=source.labels).compute(batch.pixels, indices, job)
    errors = {}
    for name, ref in reference.items():
        diff = np.abs(reduced[name].astype(np.float64) - ref)
        scale = float(np.abs(ref).max()) or 1.0
        errors[name] = {
            "max_rel_err": float(diff.max() / scale),
            "rms_rel_err": float(np.sqrt((diff**2).mean() / max((ref.astype(np.float64) ** 2).mean(), 1e-30))),
        }
    worst = max(errors, key=lambda n: errors[n]["max_rel_err"])
    log.info(
        f"{spec.compute.dtype} vs float32 on {len(indices)} rows: worst max rel err {errors[worst]['max_rel_err']:.2e} ({worst})"
    )
    return {"rows": len(indices), "reference": "float32", "dtype": spec.compute.dtype, "features": errors}


def _check_dtype_is_native(dtype: str, device: torch.device) -> None:
    """Refuse, before any work, a reduced precision that this CPU would emulate at a fraction of the speed."""
    if device.type != "cpu" or cpu_has_native(dtype):
        return
    flags = " / ".join(f.upper() for f in NATIVE_FLAGS[dtype])
    raise ExtractionError(
        f"compute.dtype {dtype} on {cpu_name()}, which has no {flags}: autocast would emulate it, "
        f"measured about {SLOWDOWN_WITHOUT}x slower than float32. Set compute.dtype: float32 for a CPU run "
        f"(the spec's dtype is meant for a GPU), or run on a GPU (--device cuda)"
    )


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
    # Resume with the grouping the store was started with: it decides the bytes.
    mb = int(stored.get("compute", {}).get("micro_batch", mb))
    n_threads = int(stored_threads or threads or DEFAULT_THREADS)
    started_on, here = stored.get("compute", {}).get("machine"), machine_signature(dev, n_threads)
    if not same_kernels(started_on, here):
        # Units stay within float tolerance of each other, so the run goes on; the bytes of the
        # remaining units belong to this machine kind, and each unit records which one wrote it.
        log.warning(
            f"{store_url} was started on {describe_signature(started_on)}; continuing on "
            f"{describe_signature(here)}: its remaining units may differ from a single-machine run in the "
            f"last bit of some values"
        )
    return Prepared(spec, source, writer, model, dev, mb, n_threads)
