"""Store tools: write a complete store from arrays, describe it, export it to HDF5 (`verify` checks it)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extract.features import FeatureKey, parse_feature_name
from extract.provenance import fingerprint as fingerprint_of
from extract.provenance import to_jsonable
from extract.store.create import NewStore, create_store
from extract.store.layout import (
    SPLITS,
    FeatureInfo,
    StoreError,
    array_at,
    as_str,
    group_at,
    has_checksums,
    v3_metadata,
)
from extract.store.reader import FeatureStore, open_store

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
        fields: dict[str, Any] = {
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
    new = NewStore(
        num_samples=n,
        features=infos,
        spec=spec,
        sample_ids=sample_ids,
        labels=labs,
        splits=splits,
        class_names=class_names,
        provenance=dict(attrs or {}),
        fingerprint=fingerprint_of(spec),
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        compression=compression,
    )
    writer = create_store(url, new, storage_options=storage_options)
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


SPLIT_MASKS_NOTE = (
    "one (N,) bool membership mask per split, as in the Zarr store (splits/<name>); splits may overlap; "
    "rows whose samples/valid is False failed and hold zeros: drop them (rows = mask & valid)"
)


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
            if keep_dtype:  # zarr reads these: an absent shard would be zeros, so check first
                fs.required_shards(name).check_listed(arr)
            chunk = (max(1, min(64, fs.num_samples)), *arr.shape[1:])
            ds = h5.create_dataset(f"features/{name}", shape=arr.shape, dtype=dtype, chunks=chunk, **filters)
            for key, value in dict(arr.attrs).items():
                ds.attrs[key] = json.dumps(to_jsonable(value))
            ds.attrs["dimension_names"] = json.dumps(list(v3_metadata(arr).dimension_names or ()))
            for lo in range(0, fs.num_samples, fs.shard_rows):
                hi = min(fs.num_samples, lo + fs.shard_rows)
                ds[lo:hi] = np.asarray(arr[lo:hi]) if keep_dtype else fs.read(name, slice(lo, hi))
        h5.create_dataset("samples/label", data=fs.labels)
        h5.create_dataset("samples/id", data=fs.sample_ids.astype(object), dtype=h5py.string_dtype())
        h5.create_dataset("samples/valid", data=fs.valid)
        errors = as_str(fs._sample_array("error")).astype(object)
        h5.create_dataset("samples/error", data=errors, dtype=h5py.string_dtype())
        # Membership masks as the store holds them (not `fs.splits`' row indices), so both read alike.
        splits = h5.create_group("splits")
        splits.attrs["meaning"] = SPLIT_MASKS_NOTE
        split_group = group_at(fs._root, SPLITS)
        for split in sorted(split_group.array_keys()):
            splits.create_dataset(split, data=np.asarray(array_at(split_group, split)[:], dtype=bool))
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


def machines_of(fs: FeatureStore) -> list[dict[str, Any]]:
    """The machine signatures a store's units were written on, each with its units; for a store written
    before units recorded it, the creating machine's from the provenance (units unknown: None)."""
    per_unit = fs.unit_machines()
    if per_unit is None:
        created_on = fs.attrs.get("provenance", {}).get("compute", {}).get("machine")
        return [{"signature": created_on, "units": None}] if created_on else []
    out: list[dict[str, Any]] = []
    for unit, signatures in enumerate(per_unit):
        for signature in signatures:
            entry = next((e for e in out if e["signature"] == signature), None)
            if entry is None:
                out.append(entry := {"signature": signature, "units": []})
            entry["units"].append(unit)
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
                "dims": list(v3_metadata(arr).dimension_names or ()),
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
        "complete": all(bool(done.all()) for done in status.values()),  # the markers read once
        "num_failures": len(fs.failures),
        "bytes_on_disk": fs.nbytes_stored(),
        "class_names": fs.class_names,
        "splits": {k: int(len(v)) for k, v in fs.splits.items()},
        "checkpoint_sha256": fs.attrs.get("checkpoint_sha256"),
        "machines": machines_of(fs),
        "compression": fs.attrs.get("compression"),
        "features": feats,
    }
