"""Creating a store: the whole hierarchy up front, or reopening it to resume, or extending it with new features.

Only the process that creates the store writes metadata, and only while it holds the store's writer
lease (extract/store/lease.py). Creation is crash-safe: `_creating.json` is written before the first
Zarr object and removed after the root attributes, the last thing written. A store still holding it has
no data yet and is recreated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from extract.provenance import fingerprint as fingerprint_of
from extract.provenance import package_versions, to_jsonable, utc_now
from extract.storage import COMPRESSIONS, STORAGE_DTYPES
from extract.store.arrays import create_feature_array, create_progress, create_samples, create_splits
from extract.store.layout import (
    FEATURES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROGRESS,
    SAMPLES,
    SPLITS,
    STATS_FIELDS,
    FeatureInfo,
    FingerprintMismatch,
    StoreError,
    array_at,
    as_str,
    attributes,
    check_array_name,
    every_chunk_written,
    existing_root,
    group_at,
    manifest_hash,
    open_group,
    plan_layout,
)
from extract.store.lease import CREATING_KEY, LEASE_KEY, Lease, acquire
from extract.store.state import check_format, check_not_foreign
from extract.store.writer import StoreWriter

log = logging.getLogger(__name__)

# Given the spec recorded in an existing store, "" when the new spec only adds features to it, else why not.
ExtensionCheck = Callable[[Mapping[str, Any]], str]


@dataclasses.dataclass(frozen=True)
class NewStore:
    """What a store holds and how a new one is laid out: everything `create_store` writes but the data.

    `spec` is the resolved spec as plain data; `fingerprint` defaults to its canonical hash. Sample ids
    default to "0".."n-1", labels to -1. `splits` maps a split name to a bool mask or row indices.
    `shard_rows`, `chunk_rows` and `max_shard_rows` (a cap on the unit length) go to `plan_layout`; an
    existing store keeps its own layout.
    """

    num_samples: int
    features: Sequence[FeatureInfo]
    spec: Mapping[str, Any] | None = None
    sample_ids: Sequence[str] | None = None
    labels: Any = None
    splits: Mapping[str, Any] | None = None
    class_names: Sequence[str] | None = None
    provenance: Mapping[str, Any] | None = None
    fingerprint: str | None = None
    shard_rows: int | None = None
    chunk_rows: int | None = None
    max_shard_rows: int | None = None
    compression: str = "blosc-lz4"


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A NewStore's sample arrays and spec, checked and normalised before the lease is taken."""

    new: NewStore
    spec: dict[str, Any]
    fingerprint: str
    ids: np.ndarray
    labels: np.ndarray
    splits: dict[str, np.ndarray]


def _normalize_splits(splits: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, members in (splits or {}).items():
        check_array_name(name, "split name")
        arr = np.asarray(members)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise StoreError(f"split {name!r}: a mask must have shape ({n},), got {arr.shape}")
            mask = arr
        else:
            idx = arr.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise StoreError(f"split {name!r}: indices outside [0, {n})")
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
        out[str(name)] = mask
    return out


def _check_samples(n_samples: int, sample_ids: Sequence[str] | None, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(
        [str(i) for i in range(n_samples)] if sample_ids is None else [str(s) for s in sample_ids], dtype=str
    )
    if ids.shape != (n_samples,):
        raise StoreError(f"{n_samples} samples but {len(ids)} sample ids")
    labs = np.full(n_samples, -1, dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64)
    if labs.shape != (n_samples,):
        raise StoreError(f"{n_samples} samples but labels of shape {labs.shape}")
    return ids, labs


def _check_features(features: Sequence[FeatureInfo]) -> None:
    if not features:
        raise StoreError("a store needs at least one feature")
    names = [f.name for f in features]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StoreError(f"duplicate feature names: {dup}")
    for f in features:
        if f.dtype not in STORAGE_DTYPES:
            raise StoreError(f"{f.name}: storage dtype {f.dtype!r} not supported; use one of {STORAGE_DTYPES}")
        check_array_name(f.name, "feature name")


def _check(new: NewStore) -> _Checked:
    if new.compression not in COMPRESSIONS:
        raise StoreError(f"unknown compression {new.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    _check_features(new.features)
    spec = to_jsonable(dict(new.spec or {}))
    ids, labels = _check_samples(new.num_samples, new.sample_ids, new.labels)
    splits = _normalize_splits(new.splits, new.num_samples)
    return _Checked(new, spec, new.fingerprint or fingerprint_of(spec), ids, labels, splits)


def create_store(
    url: str | os.PathLike,
    new: NewStore,
    *,
    storage_options: dict[str, Any] | None = None,
    can_extend: ExtensionCheck | None = None,
    break_lease: bool = False,
) -> StoreWriter:
    """Create the store `new` describes at `url`, or reopen it to resume, or extend it with new features.

    An existing store with the same fingerprint is reopened as is (resume). One with a different
    fingerprint is refused unless `can_extend(recorded spec)` says the new spec only adds features: then
    the new arrays and their markers are added and nothing old is touched.

    Everything happens under the store's writer lease (released by `finalize()` or `release()`; a stale
    one is taken over with `break_lease`); a store whose creation was interrupted is recreated.
    """
    url = os.fspath(url)
    checked = _check(new)  # bad input fails before the lease is taken
    lease = acquire(url, storage_options, break_stale=break_lease)
    try:
        writer = _create_or_reopen(url, storage_options, lease, checked, can_extend)
    except BaseException:
        lease.release()
        raise
    writer.lease = lease
    return writer


def _create_or_reopen(
    url: str,
    storage_options: dict[str, Any] | None,
    lease: Lease,
    checked: _Checked,
    can_extend: ExtensionCheck | None,
) -> StoreWriter:
    objects = lease.objects
    if objects.exists(CREATING_KEY):
        log.warning(f"{url}: its creation was interrupted before any data was written; creating it again")
        objects.wipe(keep=frozenset({LEASE_KEY}))
    objects.remove_partials()  # a killed writer's half-written temporaries; we hold the lease
    existing = existing_root(url, storage_options)
    if existing is not None:
        return _reopen(existing, url, storage_options, checked, can_extend)
    check_not_foreign(url, objects)

    new = checked.new
    layout = plan_layout(
        new.num_samples,
        new.features,
        shard_rows=new.shard_rows,
        chunk_rows=new.chunk_rows,
        max_shard_rows=new.max_shard_rows,
    )
    objects.create(CREATING_KEY, b'{"meaning": "this store is being created; it holds no data yet"}\n')
    root = open_group(url, "a", storage_options)  # "w-" would see our own lease objects as content
    prov = to_jsonable(dict(new.provenance or {}))
    versions = package_versions()
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "diffbank_version": versions.get("diffbank"),
        "created": utc_now(),
        "spec": checked.spec,
        "fingerprint": checked.fingerprint,
        "fingerprint_history": [checked.fingerprint],
        "num_samples": new.num_samples,
        "shard_rows": layout.shard_rows,
        "num_units": layout.num_units,
        "compression": new.compression,
        "features": [f.name for f in new.features],
        "class_names": None if new.class_names is None else [str(c) for c in new.class_names],
        "splits": sorted(checked.splits),
        "dataset_manifest_sha256": manifest_hash(checked.ids.tolist(), checked.labels),
        "checkpoint_sha256": prov.get("checkpoint_sha256"),
        "versions": versions,
        "noise_seed_rule": prov.get("noise_seed_rule"),
        "timestep_convention": prov.get("timestep_convention"),
        "provenance": prov,
        "complete": False,
        "consolidated": False,
    }
    feats = root.create_group(FEATURES)
    for info in new.features:
        create_feature_array(feats, info, layout, new.compression)
    create_samples(root.create_group(SAMPLES), checked.ids, checked.labels, layout.shard_rows)
    create_splits(root.create_group(SPLITS), checked.splits)
    create_progress(root.create_group(PROGRESS), [f.name for f in new.features], layout.num_units)
    root.attrs.update(attrs)  # a store whose root attributes exist is fully laid out
    objects.delete(CREATING_KEY)  # last: from here on the store is resumable
    return StoreWriter.open(url, storage_options)


def _reopen(
    root: zarr.Group,
    url: str,
    storage_options: dict[str, Any] | None,
    checked: _Checked,
    can_extend: ExtensionCheck | None,
) -> StoreWriter:
    attrs = attributes(root)
    check_format(attrs, url)
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{url} holds a Zarr hierarchy that is not a diffbank store (or one whose creation was "
            f"interrupted before its attributes were written); remove it or choose another path"
        )
    ids, labs, fingerprint = checked.ids, checked.labels, checked.fingerprint
    if int(attrs["num_samples"]) != len(ids):
        raise FingerprintMismatch(f"{url} holds {attrs['num_samples']} samples; this spec yields {len(ids)}")
    stored_ids = as_str(array_at(root, f"{SAMPLES}/id")[:])
    stored_labels = np.asarray(array_at(root, f"{SAMPLES}/label")[:])
    if not np.array_equal(stored_ids, ids) or not np.array_equal(stored_labels, labs):
        raise FingerprintMismatch(
            f"{url} was made from a different dataset (sample ids or labels differ); use another --store path"
        )
    if attrs.get("fingerprint") == fingerprint:
        return StoreWriter.open(url, storage_options)
    why = (
        "the new spec cannot be compared with the stored one"
        if can_extend is None
        else can_extend(dict(attrs.get("spec") or {}))
    )
    if why:
        raise FingerprintMismatch(
            f"{url} was made from a different spec (fingerprint {str(attrs.get('fingerprint'))[:12]}, this spec "
            f"{fingerprint[:12]}): {why}. A store can only be extended by a spec that adds "
            f"(timestep, block, pooling) features and changes nothing else; write to another --store path"
        )
    _extend(url, storage_options, attrs, checked)
    return StoreWriter.open(url, storage_options)


def _extend(url: str, storage_options: dict[str, Any] | None, attrs: dict[str, Any], checked: _Checked) -> None:
    """Add the arrays and marker columns of the features the new spec adds; nothing old is touched."""
    features = checked.new.features
    old_names = list(attrs["features"])
    by_name = {f.name: f for f in features}
    missing = [n for n in old_names if n not in by_name]
    if missing:
        raise FingerprintMismatch(f"{url}: the new spec drops features {missing}; extending may only add")
    root_w = open_group(url, "r+", storage_options, use_consolidated=False)
    for name in old_names:  # the old arrays must be what the new spec would write
        arr = array_at(root_w, f"{FEATURES}/{name}")
        old = FeatureInfo.from_attrs(name, attributes(arr), arr.shape[1:])
        if (old.shape, old.dtype) != (by_name[name].shape, by_name[name].dtype):
            raise FingerprintMismatch(
                f"{url}: feature {name} is stored as {old.shape} {old.dtype}; the new spec "
                f"gives {by_name[name].shape} {by_name[name].dtype}"
            )
    added = [f for f in features if f.name not in old_names]
    layout = plan_layout(len(checked.ids), added, shard_rows=int(attrs["shard_rows"]))
    root_w.attrs.update({"consolidated": False})  # drop stale consolidated metadata before adding arrays
    for info in added:
        create_feature_array(
            group_at(root_w, FEATURES),
            info,
            layout,
            str(attrs.get("compression", "blosc-lz4")),
            int(attrs.get("format_version", 1)),
        )
    columns = old_names + [f.name for f in added]
    units = int(attrs["num_units"])
    with every_chunk_written():
        progress = group_at(root_w, PROGRESS)
        done, stats = array_at(progress, "done"), array_at(progress, "stats")
    done.resize((units, len(columns)))
    stats.resize((units, len(columns), len(STATS_FIELDS)))
    done.attrs.update({"features": columns})
    root_w.attrs.update(
        {
            "spec": checked.spec,
            "fingerprint": checked.fingerprint,
            "features": columns,
            "complete": False,
            "fingerprint_history": list(attrs.get("fingerprint_history", [])) + [checked.fingerprint],
            "extended": utc_now(),
        }
    )
