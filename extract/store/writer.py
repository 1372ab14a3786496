"""Writing a store: create the whole hierarchy up front, then whole units (shards), then finalize.

Only the process that creates the store writes metadata, and only while it holds the store's writer
lease (extract/store/lease.py); workers reopen it and write data chunks and their units' marker rows.
`finalize()` folds the per-unit statistics into each array's attributes and consolidates the metadata
once, from a fresh read of the root: never from the copy read when the run started.

Creation is crash-safe: `_creating.json` is written before the first Zarr object and removed after the
root attributes, the last thing written. A store still holding it has no data yet and is recreated.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from extract.provenance import fingerprint as fingerprint_of
from extract.provenance import package_versions, to_jsonable, utc_now
from extract.store.layout import (
    COMPRESSIONS,
    FEATURES,
    FLOAT16_MAX,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROGRESS,
    SAMPLES,
    SPLITS,
    STATS_FIELDS,
    STORAGE_DTYPES,
    FeatureInfo,
    FingerprintMismatch,
    Layout,
    StoreError,
    as_str,
    check_array_name,
    create_feature_array,
    create_progress,
    create_samples,
    create_splits,
    existing_root,
    is_local,
    local_path,
    manifest_hash,
    open_group,
    plan_layout,
)
from extract.store.lease import CREATING_KEY, LEASE_KEY, OWN_KEYS, Lease, RootObjects, acquire

log = logging.getLogger(__name__)

# Given the spec recorded in an existing store, "" when the new spec only adds features to it, else why not.
ExtensionCheck = Callable[[Mapping[str, Any]], str]


def cast_with_stats(data: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Cast float32 features to the storage dtype and the statistics of the cast.

    Returns (cast array, [max |x| over finite float32 values, infs after the cast, NaNs, overflows]).
    """
    x = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    absx = np.abs(x)
    max_abs = float(absx.max(initial=0.0)) if all_finite else float(absx[finite].max(initial=0.0))
    n_nan = 0 if all_finite else int(np.isnan(x).sum())
    pre_inf = 0 if all_finite else int(np.isinf(x).sum())
    overflow = 0
    if dtype == "float16":
        overflow = int((finite & (absx > FLOAT16_MAX)).sum()) if max_abs > FLOAT16_MAX else 0
        with np.errstate(over="ignore"):
            out = x.astype(np.float16)
    else:
        out = x
    return out, np.array([max_abs, pre_inf + overflow, n_nan, overflow], dtype=np.float64)


class StoreWriter:
    """Writes units (whole shards) into a store created by `create_store` (or reopened by a worker)."""

    def __init__(
        self,
        root: zarr.Group,
        url: str,
        storage_options: dict[str, Any] | None = None,
        lease: Lease | None = None,
    ):
        self._root = root
        self.url = url
        self.storage_options = storage_options
        self.lease = lease  # held by the process that writes metadata; None in a cluster's workers
        attrs = dict(root.attrs)
        self.attrs = attrs
        self.num_samples = int(attrs["num_samples"])
        self.shard_rows = int(attrs["shard_rows"])
        self.fingerprint = str(attrs["fingerprint"])
        done = root[PROGRESS]["done"]
        self.columns: list[str] = list(done.attrs["features"])
        self._done = done
        self._stats = root[PROGRESS]["stats"]
        self._features = {name: root[FEATURES][name] for name in self.columns}
        self._valid = root[SAMPLES]["valid"]
        self._error = root[SAMPLES]["error"]
        self.infos = {
            name: FeatureInfo.from_attrs(name, dict(a.attrs), a.shape[1:]) for name, a in self._features.items()
        }

    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> StoreWriter:
        """Reopen an existing store for data writes (a worker): reads metadata, writes none."""
        url = os.fspath(url)
        return cls(open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)

    @property
    def num_units(self) -> int:
        return Layout(self.num_samples, self.shard_rows, {}).num_units

    def unit_rows(self, unit: int) -> tuple[int, int]:
        return Layout(self.num_samples, self.shard_rows, {}).unit_rows(unit)

    def pending(self) -> dict[int, list[str]]:
        """Unit -> the features not yet marked done there (units with nothing to do are left out)."""
        done = np.asarray(self._done[:])
        out: dict[int, list[str]] = {}
        for unit in range(self.num_units):
            missing = [name for i, name in enumerate(self.columns) if not done[unit, i]]
            if missing:
                out[unit] = missing
        return out

    def write_unit(
        self,
        unit: int,
        features: Mapping[str, np.ndarray],
        *,
        valid: np.ndarray | None = None,
        errors: Sequence[str] | None = None,
    ) -> None:
        """Write whole shards of `unit` for the given features, then mark them done.

        Rows of invalid samples are zeroed, whatever the caller passed. Order matters for crash safety:
        data, then statistics, then sample status, then the markers.
        """
        start, stop = self.unit_rows(unit)
        rows = stop - start
        if self.lease is not None:
            self.lease.check()
        unknown = [n for n in features if n not in self._features]
        if unknown:
            raise KeyError(f"unknown feature(s) {unknown}; store features: {', '.join(self.columns)}")
        valid_rows = np.ones(rows, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        if valid_rows.shape != (rows,):
            raise ValueError(f"unit {unit} has {rows} rows; valid has shape {valid_rows.shape}")
        error_rows = np.array(["" for _ in range(rows)] if errors is None else [str(e) for e in errors], dtype=object)
        if error_rows.shape != (rows,):
            raise ValueError(f"unit {unit} has {rows} rows; got {error_rows.shape[0]} error strings")
        prepared: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, data in features.items():  # validate everything before the first byte is written
            info = self.infos[name]
            data = np.asarray(data)
            if data.shape != (rows, *info.shape):
                raise ValueError(f"{name}: unit {unit} expects shape {(rows, *info.shape)}, got {data.shape}")
            if not valid_rows.all():
                data = np.array(data, dtype=np.float32, copy=True)
                data[~valid_rows] = 0
            prepared[name] = cast_with_stats(data, info.dtype)
        for name, (data, _) in prepared.items():
            self._features[name][start:stop] = data
        cols = [self.columns.index(name) for name in prepared]
        stats_row = np.asarray(self._stats[unit])
        for name, col in zip(prepared, cols):
            stats_row[col] = prepared[name][1]
        self._stats[unit] = stats_row
        self._valid[start:stop] = valid_rows
        self._error[start:stop] = np.array(error_rows.tolist(), dtype=str)
        done_row = np.asarray(self._done[unit])
        done_row[cols] = 1
        self._done[unit] = done_row  # the unit's marker row: only this unit's owner touches it

    def release(self) -> None:
        """Give up the writer lease (idempotent); the store stays as written."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()

    def finalize(self, release: bool = True) -> None:
        """Fold per-unit statistics into each feature's attributes and consolidate metadata (once).

        Everything is re-read first: attributes written by anyone since this writer opened the store are
        merged into, not overwritten by a stale copy.
        """
        if self.lease is not None:
            self.lease.check()
        root = open_group(self.url, "r+", self.storage_options, use_consolidated=False)
        done_arr = root[PROGRESS]["done"]
        columns = list(done_arr.attrs["features"])
        done = np.asarray(done_arr[:]).astype(bool)
        stats = np.asarray(root[PROGRESS]["stats"][:])
        for i, name in enumerate(columns):
            marked = done[:, i]
            per_unit = stats[marked, i, :]
            summary = {
                "units_done": int(marked.sum()),
                "units": int(len(marked)),
                "complete": bool(marked.all()),
                "max_abs": float(per_unit[:, 0].max(initial=0.0)),
                "n_inf": int(per_unit[:, 1].sum()),
                "n_nan": int(per_unit[:, 2].sum()),
                "n_overflow": int(per_unit[:, 3].sum()),
            }
            root[FEATURES][name].attrs.update({"stats": summary})
        errors = as_str(root[SAMPLES]["error"][:])
        root.attrs.update(
            {
                "complete": bool(done.all()),
                "num_failures": int((errors != "").sum()),
                "finalized": utc_now(),
                "consolidated": True,
            }
        )
        with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec (yet)": known
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", message="Object at _lease.json", category=UserWarning)
            zarr.consolidate_metadata(root.store)
        self._root = root
        self.attrs = dict(root.attrs)
        if release:
            self.release()


def check_format(attrs: Mapping[str, Any], url: str) -> None:
    """Refuse a store written in a newer format than this diffbank writes: its rules are unknown here."""
    version = attrs.get("format_version")
    if attrs.get("format") == FORMAT_NAME and isinstance(version, int) and version > FORMAT_VERSION:
        raise StoreError(
            f"{url} is a format {version} store, written by a newer diffbank ({attrs.get('diffbank_version')}); "
            f"this diffbank writes format {FORMAT_VERSION}. Upgrade diffbank to resume or extend it"
        )


@dataclasses.dataclass(frozen=True)
class StoreState:
    """What is at a store URL, read without writing anything (so it works on read-only media)."""

    url: str
    exists: bool  # a diffbank store whose creation finished
    attrs: dict[str, Any]
    pending_units: int | None  # units with an unmarked feature; None when not a finished creation
    interrupted_creation: bool = False

    @property
    def fingerprint(self) -> str | None:
        return self.attrs.get("fingerprint")

    def is_done(self, fingerprint: str) -> bool:
        """Complete and finalized for this fingerprint: a rerun has nothing to write."""
        return (
            self.exists
            and self.fingerprint == fingerprint
            and self.pending_units == 0
            and bool(self.attrs.get("complete"))
            and bool(self.attrs.get("consolidated"))
        )


def store_state(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> StoreState:
    """Inspect `url` read-only; raises StoreError for a newer-format store or something that is not a store."""
    url = os.fspath(url)
    objects = RootObjects(url, storage_options)
    if objects.exists(CREATING_KEY):
        return StoreState(url, False, {}, None, interrupted_creation=True)
    root = existing_root(url, storage_options)
    if root is None:
        others = [n for n in objects.names() if n not in OWN_KEYS]
        if others or (is_local(url) and local_path(url).exists() and not local_path(url).is_dir()):
            raise StoreError(f"{url} exists and is not a Zarr store; choose another --store path")
        return StoreState(url, False, {}, None)
    attrs = dict(root.attrs)
    check_format(attrs, url)
    if attrs.get("format") != FORMAT_NAME or PROGRESS not in root:
        raise StoreError(f"{url} holds a Zarr hierarchy that is not a diffbank store; choose another --store path")
    done = np.asarray(root[PROGRESS]["done"][:]).astype(bool)
    return StoreState(url, True, attrs, int((~done.all(axis=1)).sum()) if done.size else 0)


def feature_list_problems(root: zarr.Group) -> list[str]:
    """Disagreements between the features the root records, the marker columns and the arrays on disk.

    A store whose metadata was overwritten from a stale copy lists fewer features than it holds; the
    extra arrays are invisible to readers. `extract.store.tools.verify` reports these.
    """
    recorded = list(root.attrs.get("features") or [])
    columns = list(root[PROGRESS]["done"].attrs.get("features") or []) if PROGRESS in root else []
    on_disk = sorted(name for name, _ in root[FEATURES].arrays()) if FEATURES in root else []
    problems = []
    if recorded and sorted(recorded) != on_disk:
        lost = sorted(set(recorded) - set(on_disk))
        extra = sorted(set(on_disk) - set(recorded))
        parts = [
            f"recorded but absent: {lost}" if lost else "",
            f"on disk but not in the root's feature list: {extra}" if extra else "",
        ]
        problems.append(
            "the recorded feature list differs from the arrays on disk: " + "; ".join(p for p in parts if p)
        )
    if recorded and columns != recorded:
        problems.append(f"completion markers cover {columns}, the recorded feature list is {recorded}")
    return problems


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


def create_store(
    url: str | os.PathLike,
    spec: Mapping[str, Any] | None,
    n_samples: int,
    sample_ids: Sequence[str] | None,
    labels: Any,
    splits: Mapping[str, Any] | None,
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any] | None,
    *,
    features: Sequence[FeatureInfo],
    shard_rows: int | None = None,
    chunk_rows: int | None = None,
    compression: str = "blosc-lz4",
    storage_options: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    can_extend: ExtensionCheck | None = None,
    break_lease: bool = False,
    max_shard_rows: int | None = None,
) -> StoreWriter:
    """Create the whole hierarchy up front, or reopen it to resume, or extend it with new features.

    `spec` is the resolved spec as plain data; `fingerprint` defaults to its canonical hash. An existing
    store with the same fingerprint is reopened as is (resume). One with a different fingerprint is
    refused unless `can_extend(recorded spec)` says the new spec only adds features: then the new arrays
    and their markers are added and nothing old is touched.

    Everything happens under the store's writer lease (released by `finalize()` or `release()`); a
    store whose creation was interrupted is recreated. `max_shard_rows` caps the unit length (see
    `plan_layout`) of a new store; an existing store keeps its own.
    """
    url = os.fspath(url)
    spec_dict = to_jsonable(dict(spec or {}))
    fingerprint = fingerprint or fingerprint_of(spec_dict)
    if compression not in COMPRESSIONS:
        raise StoreError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    _check_features(features)
    ids, labs = _check_samples(n_samples, sample_ids, labels)
    split_masks = _normalize_splits(splits, n_samples)

    lease = acquire(url, storage_options, break_stale=break_lease)
    try:
        return _create_or_reopen(
            url,
            storage_options,
            lease,
            spec_dict,
            fingerprint,
            n_samples,
            ids,
            labs,
            split_masks,
            class_names,
            provenance,
            features,
            shard_rows,
            chunk_rows,
            compression,
            can_extend,
            max_shard_rows,
        )
    except BaseException:
        lease.release()
        raise


def _create_or_reopen(
    url: str,
    storage_options: dict[str, Any] | None,
    lease: Lease,
    spec_dict: dict[str, Any],
    fingerprint: str,
    n_samples: int,
    ids: np.ndarray,
    labs: np.ndarray,
    split_masks: dict[str, np.ndarray],
    class_names: Sequence[str] | None,
    provenance: Mapping[str, Any] | None,
    features: Sequence[FeatureInfo],
    shard_rows: int | None,
    chunk_rows: int | None,
    compression: str,
    can_extend: ExtensionCheck | None,
    max_shard_rows: int | None,
) -> StoreWriter:
    objects = lease.objects
    if objects.exists(CREATING_KEY):
        log.warning(f"{url}: its creation was interrupted before any data was written; creating it again")
        objects.wipe(keep=frozenset({LEASE_KEY}))
    objects.remove_partials()  # a killed writer's half-written temporaries; we hold the lease
    existing = existing_root(url, storage_options)
    if existing is None:
        others = [n for n in objects.names() if n not in OWN_KEYS]
        if others or (is_local(url) and local_path(url).exists() and not local_path(url).is_dir()):
            raise StoreError(f"{url} exists and is not a Zarr store; choose another --store path")
    if existing is not None:
        writer = _reopen(existing, url, storage_options, spec_dict, fingerprint, features, ids, labs, can_extend)
        writer.lease = lease
        return writer

    layout = plan_layout(
        n_samples, features, shard_rows=shard_rows, chunk_rows=chunk_rows, max_shard_rows=max_shard_rows
    )
    objects.create(CREATING_KEY, b'{"meaning": "this store is being created; it holds no data yet"}\n')
    root = open_group(url, "a", storage_options)  # "w-" would see our own lease objects as content
    prov = to_jsonable(dict(provenance or {}))
    versions = package_versions()
    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "diffbank_version": versions.get("diffbank"),
        "created": utc_now(),
        "spec": spec_dict,
        "fingerprint": fingerprint,
        "fingerprint_history": [fingerprint],
        "num_samples": n_samples,
        "shard_rows": layout.shard_rows,
        "num_units": layout.num_units,
        "compression": compression,
        "features": [f.name for f in features],
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "splits": sorted(split_masks),
        "dataset_manifest_sha256": manifest_hash(ids.tolist(), labs),
        "checkpoint_sha256": prov.get("checkpoint_sha256"),
        "versions": versions,
        "noise_seed_rule": prov.get("noise_seed_rule"),
        "timestep_convention": prov.get("timestep_convention"),
        "provenance": prov,
        "complete": False,
        "consolidated": False,
    }
    feats = root.create_group(FEATURES)
    for info in features:
        create_feature_array(feats, info, layout, compression)
    create_samples(root.create_group(SAMPLES), ids, labs, layout.shard_rows)
    create_splits(root.create_group(SPLITS), split_masks)
    create_progress(root.create_group(PROGRESS), [f.name for f in features], layout.num_units)
    root.attrs.update(attrs)  # a store whose root attributes exist is fully laid out
    objects.delete(CREATING_KEY)  # last: from here on the store is resumable
    return StoreWriter(open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options, lease)


def _reopen(
    root: zarr.Group,
    url: str,
    storage_options: dict[str, Any] | None,
    spec_dict: dict[str, Any],
    fingerprint: str,
    features: Sequence[FeatureInfo],
    ids: np.ndarray,
    labs: np.ndarray,
    can_extend: ExtensionCheck | None,
) -> StoreWriter:
    attrs = dict(root.attrs)
    check_format(attrs, url)
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{url} holds a Zarr hierarchy that is not a diffbank store (or one whose creation was "
            f"interrupted before its attributes were written); remove it or choose another path"
        )
    if int(attrs["num_samples"]) != len(ids):
        raise FingerprintMismatch(f"{url} holds {attrs['num_samples']} samples; this spec yields {len(ids)}")
    stored_ids = as_str(root[SAMPLES]["id"][:])
    if not np.array_equal(stored_ids, ids) or not np.array_equal(np.asarray(root[SAMPLES]["label"][:]), labs):
        raise FingerprintMismatch(
            f"{url} was made from a different dataset (sample ids or labels differ); use another --store path"
        )
    if attrs.get("fingerprint") == fingerprint:
        return StoreWriter(open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)
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
    old_names = list(attrs["features"])
    by_name = {f.name: f for f in features}
    missing = [n for n in old_names if n not in by_name]
    if missing:
        raise FingerprintMismatch(f"{url}: the new spec drops features {missing}; extending may only add")
    root_w = open_group(url, "r+", storage_options, use_consolidated=False)
    for name in old_names:  # the old arrays must be what the new spec would write
        old = FeatureInfo.from_attrs(name, dict(root_w[FEATURES][name].attrs), root_w[FEATURES][name].shape[1:])
        if (old.shape, old.dtype) != (by_name[name].shape, by_name[name].dtype):
            raise FingerprintMismatch(
                f"{url}: feature {name} is stored as {old.shape} {old.dtype}; the new spec "
                f"gives {by_name[name].shape} {by_name[name].dtype}"
            )
    added = [f for f in features if f.name not in old_names]
    shard_rows = int(attrs["shard_rows"])
    layout = plan_layout(len(ids), added, shard_rows=shard_rows)
    root_w.attrs.update({"consolidated": False})  # drop stale consolidated metadata before adding arrays
    for info in added:
        create_feature_array(
            root_w[FEATURES],
            info,
            layout,
            str(attrs.get("compression", "blosc-lz4")),
            int(attrs.get("format_version", 1)),
        )
    progress = root_w[PROGRESS]
    columns = old_names + [f.name for f in added]
    units = int(attrs["num_units"])
    progress["done"].resize((units, len(columns)))
    progress["stats"].resize((units, len(columns), len(STATS_FIELDS)))
    progress["done"].attrs.update({"features": columns})
    root_w.attrs.update(
        {
            "spec": spec_dict,
            "fingerprint": fingerprint,
            "features": columns,
            "complete": False,
            "fingerprint_history": list(attrs.get("fingerprint_history", [])) + [fingerprint],
            "extended": utc_now(),
        }
    )
    return StoreWriter(open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)
