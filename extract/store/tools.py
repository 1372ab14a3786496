"""Store tools: write a complete store from arrays, describe it, verify it, export it to HDF5."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extract.features import FeatureKey, parse_feature_name
from extract.provenance import fingerprint as fingerprint_of
from extract.provenance import to_jsonable
from extract.store.layout import (
    CHECKSUMS_SINCE,
    PROGRESS,
    SAMPLES,
    SPLITS,
    FeatureInfo,
    StoreError,
    as_str,
    has_checksums,
)
from extract.store.reader import FeatureStore, open_store
from extract.store.shards import shard_state
from extract.store.writer import create_store, feature_list_problems

SAVED_KIND = "save_features"  # the recorded "spec" of a store written from arrays


def _key_of(name: str) -> FeatureKey | None:
    try:
        return parse_feature_name(name)
    except ValueError:  # any name is allowed for users' own arrays; only rule-following ones carry t/block
        return None


def save_features(
    url: str | os.PathLike,
    features: Mapping[str, np.ndarray],
    labels: Any,
    splits: Mapping[str, Any] | None,
    sample_ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    info: Mapping[str, Mapping[str, Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    *,
    shard_rows: int | None = None,
    chunk_rows: int | None = None,
    compression: str = "blosc-lz4",
    storage_options: dict[str, Any] | None = None,
) -> FeatureStore:
    """Write a complete store from arrays (N, C, h, w) or (N, D); returns it opened read-only.

    Names following the rule (t090_b24_avg2) get t/block/pooling parsed from the name; `info[name]`
    adds or overrides fields (module, resolution, t, block, pool_kind, pool_size, view, draw, draws, dtype).
    Separate noise draws: arrays `name`, `name_d1`, ... each with `info[...]["draws"] = K`.
    float16 arrays are stored as float16, other floats as float32.
    """
    if not features:
        raise StoreError("save_features needs at least one feature array")
    labs = np.asarray(labels)
    n = int(labs.shape[0])
    infos: list[FeatureInfo] = []
    arrays: dict[str, np.ndarray] = {}
    for name, data in features.items():
        data = np.asarray(data)
        if data.ndim not in (2, 4) or data.shape[0] != n:
            raise StoreError(f"{name}: expected shape (N={n}, C, h, w) or (N={n}, D), got {data.shape}")
        extra = dict((info or {}).get(name, {}))
        key = _key_of(name)
        dtype = extra.pop("dtype", "float16" if data.dtype == np.float16 else "float32")
        fields = {
            "t": None,
            "block": None,
            "module": None,
            "resolution": None,
            "pool_kind": None,
            "pool_size": None,
            "view": "center",
            "draw": 0,
            "draws": 1,
        }
        if key is not None:
            fields.update(
                t=key.t, block=key.block, pool_kind=key.pool_kind, pool_size=key.pool_size, view=key.view, draw=key.draw
            )
        unknown = set(extra) - set(fields) - {"channels"}
        if unknown:
            raise StoreError(
                f"info[{name!r}]: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields) + ['dtype']}"
            )
        fields.update({k: v for k, v in extra.items() if k != "channels"})
        if not 0 <= int(fields["draw"]) < max(1, int(fields["draws"])):
            raise StoreError(f"{name}: noise draw {fields['draw']} of {fields['draws']}: give info[{name!r}]['draws']")
        infos.append(
            FeatureInfo(name=name, channels=int(data.shape[1]), shape=tuple(data.shape[1:]), dtype=str(dtype), **fields)
        )
        arrays[name] = data
    spec = {
        "kind": SAVED_KIND,
        "features": [i.to_attrs() | {"name": i.name} for i in infos],
        "attrs": to_jsonable(dict(attrs or {})),
    }
    writer = create_store(
        url,
        spec,
        n,
        sample_ids,
        labs,
        splits,
        class_names,
        dict(attrs or {}),
        features=infos,
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        compression=compression,
        storage_options=storage_options,
        fingerprint=fingerprint_of(spec),
    )
    if writer.pending() == {}:
        raise StoreError(f"{url} already holds these features; nothing written")
    try:  # create_store took the writer lease; an error must not leave it behind
        for unit in range(writer.num_units):
            start, stop = writer.unit_rows(unit)
            writer.write_unit(unit, {name: arrays[name][start:stop] for name in arrays})
        if attrs:
            writer._root.attrs.update({"user_attrs": to_jsonable(dict(attrs))})
        writer.finalize()
    finally:
        writer.release()
    return open_store(url, storage_options)


def export_hdf5(
    store: FeatureStore | str | os.PathLike,
    path: str | os.PathLike,
    compression: str | None = "gzip",
    features: Sequence[str] | None = None,
    *,
    keep_dtype: bool = False,
) -> Path:
    """Copy a store into one HDF5 file for teams without zarr: float32 (or the stored dtype with
    keep_dtype), gzip+shuffle by default (readable everywhere; lzf or None write much faster).
    Streams shard by shard: memory stays at one shard of one feature.
    """
    import h5py

    fs = store if isinstance(store, FeatureStore) else open_store(store)
    if compression not in ("gzip", "lzf", None, "none"):
        raise ValueError(f"compression {compression!r}: use gzip, lzf or none")
    compression = None if compression == "none" else compression
    names = list(features) if features is not None else fs.array_names()
    for name in names:
        fs._check_name(name)
    out = Path(path)
    # A name of its own, so two exports to one path do not collide; renamed to `out` only when complete.
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    filters: dict[str, Any] = {} if compression is None else {"compression": compression, "shuffle": True}
    with _published_as(out, tmp), h5py.File(tmp, "w") as h5:
        h5.attrs["diffbank"] = json.dumps(to_jsonable(fs.attrs))
        h5.attrs["source_store"] = fs.url
        for name in names:
            arr = fs.array(name)
            dtype = np.dtype(arr.dtype) if keep_dtype else np.dtype(np.float32)
            chunk = (max(1, min(64, fs.num_samples)), *arr.shape[1:])
            ds = h5.create_dataset(f"features/{name}", shape=arr.shape, dtype=dtype, chunks=chunk, **filters)
            for key, value in dict(arr.attrs).items():
                ds.attrs[key] = json.dumps(to_jsonable(value))
            ds.attrs["dimension_names"] = json.dumps(list(arr.metadata.dimension_names or ()))
            for lo in range(0, fs.num_samples, fs.shard_rows):
                hi = min(fs.num_samples, lo + fs.shard_rows)
                ds[lo:hi] = np.asarray(arr[lo:hi]) if keep_dtype else fs.read(name, slice(lo, hi))
        h5.create_dataset("samples/label", data=fs.labels)
        h5.create_dataset("samples/id", data=fs.sample_ids.astype(object), dtype=h5py.string_dtype())
        h5.create_dataset("samples/valid", data=fs.valid)
        errors = as_str(fs._sample_array("error")).astype(object)
        h5.create_dataset("samples/error", data=errors, dtype=h5py.string_dtype())
        for split, rows in fs.splits.items():
            h5.create_dataset(f"splits/{split}", data=rows)
    return out


@contextlib.contextmanager
def _published_as(out: Path, tmp: Path) -> Iterator[None]:
    """`tmp` renamed to `out` when the block completes, removed when it fails: a half-written file never
    carries the final name, and none is left behind."""
    try:
        yield
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclasses.dataclass
class VerifyReport:
    url: str
    ok: bool
    problems: list[str]
    checked: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.url}: {'OK' if self.ok else 'PROBLEMS'}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])


def verify(
    store: FeatureStore | str | os.PathLike,
    *,
    full_scan: bool = False,
    fingerprint_of_spec: Callable[[Mapping[str, Any]], str | None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Check a store against what it records: markers, shapes, dtypes, the feature list, fingerprint.

    `full_scan` reads every stored shard and chunk: a shard missing under a unit marked done, a
    truncated shard, a chunk missing from its shard, a chunk that fails its checksum or does not
    decode, and infs/NaNs the extraction did not record are each named, with their rows. Stores of
    format 1 carry no chunk checksums, so a flipped byte there can only show as a wrong value; the
    report says so in its notes. Nothing is written.

    The store cannot read a spec, so for stores written from one, `fingerprint_of_spec(recorded spec)`
    recomputes the fingerprint (None: the spec no longer loads); without it that check is skipped.
    Stores written by `save_features` are checked by their own canonical hash.
    """
    url = store.url if isinstance(store, FeatureStore) else os.fspath(store)
    so = storage_options if storage_options is not None else getattr(store, "storage_options", None)
    # Live metadata: the consolidated copy could hide an array added or lost since it was written.
    fs = open_store(url, so, consolidated=False)
    problems: list[str] = []
    notes: list[str] = []
    checked: dict[str, Any] = {"features": 0, "scanned": full_scan}
    status = fs.unit_status()
    problems += feature_list_problems(fs._root)
    version = int(fs.attrs.get("format_version", 0))
    names = [n for n in fs.array_names() if n in fs.arrays_on_disk()]
    unchecked = [n for n in names if not has_checksums(fs.array(n))]
    checked["checksums"] = not unchecked
    if version < CHECKSUMS_SINCE or unchecked:
        notes.append(
            f"this store (format {version}) predates chunk checksums: a flipped byte in a chunk cannot be "
            f"detected, only values that do not decode or are not finite"
        )
    per_unit = _unit_stats(fs) if full_scan else {}
    valid = fs.valid if full_scan else None
    for name in names:
        checked["features"] += 1
        info = fs.feature_info(name)
        arr = fs.array(name)
        if tuple(arr.shape) != (fs.num_samples, *info.shape):
            problems.append(f"{name}: shape {tuple(arr.shape)} != recorded {(fs.num_samples, *info.shape)}")
        if str(arr.dtype) != info.dtype:
            problems.append(f"{name}: dtype {arr.dtype} != recorded {info.dtype}")
        units = status.get(name)
        if units is None:
            problems.append(f"{name}: no completion markers")
        elif not units.all():
            problems.append(f"{name}: units {np.flatnonzero(~units).tolist()[:20]} not marked done")
        if full_scan:
            marked = np.ones(fs.num_units, bool) if units is None else units
            found, counted = _scan_feature(fs, name, marked, per_unit.get(name), valid)
            problems += found
            n_inf, n_nan, rec_inf, rec_nan = counted
            if n_inf != rec_inf or n_nan != rec_nan:
                problems.append(
                    f"{name}: holds {n_inf} infs and {n_nan} NaNs in units marked done; the extraction "
                    f"recorded {rec_inf} and {rec_nan}"
                )
            elif n_inf or n_nan:
                notes.append(f"{name}: {n_inf} infs and {n_nan} NaNs, as recorded at extraction")
    for key in ("label", "id", "valid", "error"):
        shape = fs._root[SAMPLES][key].shape
        if shape != (fs.num_samples,):
            problems.append(f"samples/{key}: shape {shape} != ({fs.num_samples},)")
    if full_scan:
        problems += _scan_small_arrays(fs)
    if fs.spec.get("kind") == SAVED_KIND:
        expected: str | None = fingerprint_of(fs.spec)
    elif fingerprint_of_spec is not None:
        expected = fingerprint_of_spec(fs.spec)
    else:
        expected = fs.fingerprint
        checked["fingerprint_skipped"] = True
    checked["fingerprint"] = expected == fs.fingerprint
    if expected is None:
        problems.append("the stored spec no longer loads, so its fingerprint cannot be recomputed")
    elif expected != fs.fingerprint:
        problems.append(f"fingerprint {fs.fingerprint[:12]} does not match the stored spec ({expected[:12]})")
    if fs.class_names is not None and fs.labels.size and fs.labels.max() >= len(fs.class_names):
        problems.append(f"labels reach {int(fs.labels.max())} but only {len(fs.class_names)} class names")
    return VerifyReport(fs.url, not problems, problems, checked, notes)


def _unit_stats(fs: FeatureStore) -> dict[str, np.ndarray]:
    """Per feature, the (units, 4) statistics the writer recorded with each unit's data."""
    progress = fs._root[PROGRESS]
    columns = list(progress["done"].attrs["features"])
    stats = np.asarray(progress["stats"][:])
    return {name: stats[:, i, :] for i, name in enumerate(columns) if i < stats.shape[1]}


def _scan_feature(
    fs: FeatureStore, name: str, marked: np.ndarray, unit_stats: np.ndarray | None, valid: np.ndarray
) -> tuple[list[str], tuple[int, int, int, int]]:
    arr = fs.array(name)
    problems: list[str] = []
    n_inf = n_nan = rec_inf = rec_nan = 0
    for unit in range(fs.num_units):
        if not marked[unit]:
            continue  # reported above as not done; its data may legitimately be absent
        lo, hi = unit * fs.shard_rows, min(fs.num_samples, (unit + 1) * fs.shard_rows)
        where = f"{name}: unit {unit} (rows {lo}-{hi - 1})"
        recorded = unit_stats[unit] if unit_stats is not None else np.zeros(4)
        rec_inf += int(recorded[1])
        rec_nan += int(recorded[2])
        # zarr writes no chunk (or shard) that equals the fill value: absence is data loss only where the
        # writer saw something other than zeros.
        nonzero = bool(recorded[0] > 0 or recorded[1] or recorded[2])
        state = shard_state(arr, unit)
        if not state.present:
            if nonzero:
                problems.append(f"{where}: marked done but its data is absent ({state.key}); it reads as zeros")
            continue
        if state.problem:
            problems.append(f"{where}: shard {state.key} is {state.problem}")
            continue
        for k in state.empty_chunks:
            c_lo = lo + k * state.chunk_rows
            c_hi = min(hi, c_lo + state.chunk_rows)
            if c_lo < hi and nonzero and valid[c_lo:c_hi].any():
                problems.append(
                    f"{where}: chunk {k} (rows {c_lo}-{c_hi - 1}) is missing from shard {state.key}; it reads as zeros"
                )
        try:
            block = fs.read(name, slice(lo, hi))
        except Exception:  # name each chunk that fails, not just the first
            problems += _bad_chunks(arr, where, lo, hi, state.chunk_rows or (hi - lo))
            continue
        n_inf += int(np.isinf(block).sum())
        n_nan += int(np.isnan(block).sum())
    return problems, (n_inf, n_nan, rec_inf, rec_nan)


def _bad_chunks(arr: Any, where: str, lo: int, hi: int, chunk_rows: int) -> list[str]:
    out = []
    for c_lo in range(lo, hi, chunk_rows):
        c_hi = min(hi, c_lo + chunk_rows)
        try:
            arr[c_lo:c_hi]
        except Exception as exc:
            why = "fails its checksum" if "checksum" in str(exc).lower() else f"does not decode ({exc})"
            out.append(f"{where}: the chunk of rows {c_lo}-{c_hi - 1} {why}")
    return out or [f"{where}: does not decode"]


def _scan_small_arrays(fs: FeatureStore) -> list[str]:
    out = []
    for group in (SAMPLES, SPLITS, PROGRESS):
        for key, arr in fs._root[group].arrays():
            try:
                arr[...]
            except Exception as exc:
                why = "fails its checksum" if "checksum" in str(exc).lower() else f"does not decode ({exc})"
                out.append(f"{group}/{key}: {why}")
    return out


def info(fs: FeatureStore) -> dict[str, Any]:
    """What `diffbank store info` shows, as data."""
    status = fs.unit_status()
    feats = []
    for name in fs.array_names():
        feature = fs.feature_info(name)
        arr = fs.array(name)
        done = status.get(name)
        feats.append(
            {
                "name": name,
                "shape": list(arr.shape),
                "dims": list(arr.metadata.dimension_names or ()),
                "dtype": feature.dtype,
                "t": feature.t,
                "block": feature.block,
                "module": feature.module,
                "channels": feature.channels,
                "resolution": feature.resolution,
                "pool": None if feature.pool_kind is None else f"{feature.pool_kind}{feature.pool_size}",
                "view": feature.view,
                "chunks": list(arr.chunks),
                "shards": list(arr.shards or arr.chunks),
                "checksums": has_checksums(arr),
                "units_done": int(done.sum()) if done is not None else None,
                "units": int(len(done)) if done is not None else None,
                "stats": feature.stats,
            }
        )
    return {
        "url": fs.url,
        "fingerprint": fs.fingerprint,
        "format_version": fs.attrs.get("format_version"),
        "created": fs.attrs.get("created"),
        "diffbank_version": fs.attrs.get("diffbank_version"),
        "num_samples": fs.num_samples,
        "shard_rows": fs.shard_rows,
        "num_units": fs.num_units,
        "complete": fs.is_complete(),
        "num_failures": len(fs.failures),
        "bytes_on_disk": fs.nbytes_stored(),
        "class_names": fs.class_names,
        "splits": {k: int(len(v)) for k, v in fs.splits.items()},
        "checkpoint_sha256": fs.attrs.get("checkpoint_sha256"),
        "compression": fs.attrs.get("compression"),
        "features": feats,
    }
