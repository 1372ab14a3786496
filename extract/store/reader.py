"""Reading a store: cheap to open, reads only what is asked for, never writes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from extract.store.layout import (
    FEATURES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROGRESS,
    SAMPLES,
    SPLITS,
    FeatureInfo,
    Layout,
    StoreError,
    as_str,
    is_local,
    local_path,
    open_group,
)


class FeatureStore:
    """A store opened read-only. Cheap to create; reads only what is asked for."""

    def __init__(self, root: zarr.Group, url: str):
        self._root = root
        self.url = url
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(
                f"{url} is a Zarr hierarchy but not a diffbank feature store "
                f"(root attribute format={self.attrs.get('format')!r})"
            )
        version = int(self.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{url} has store format {version}; this diffbank reads up to {FORMAT_VERSION}: upgrade diffbank"
            )
        self.spec: dict[str, Any] = dict(self.attrs.get("spec") or {})
        self.fingerprint: str = str(self.attrs.get("fingerprint"))
        self.num_samples: int = int(self.attrs["num_samples"])
        self.shard_rows: int = int(self.attrs["shard_rows"])
        self._features = root[FEATURES]
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, samples={self.num_samples}, features={len(self.feature_names(None))}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    # -- features --------------------------------------------------------------------------

    def feature_names(self, view: str | None = "center") -> list[str]:
        """Feature array names, sorted by (t, block, pool); view=None lists every view."""
        names = list(self.attrs.get("features") or sorted(self._features.array_keys()))
        if view is None:
            return names
        return [n for n in names if self.feature_info(n).view == view]

    def _check_name(self, name: str) -> None:
        if name not in self._all_names():
            known = ", ".join(self._all_names()) or "none"
            raise KeyError(f"no feature {name!r} in {self.url}; features: {known}")

    def _all_names(self) -> list[str]:
        if "names" not in self._cache:
            self._cache["names"] = list(self.attrs.get("features") or sorted(self._features.array_keys()))
        return self._cache["names"]

    def array(self, name: str) -> zarr.Array:
        self._check_name(name)
        return self._features[name]

    def feature_info(self, name: str) -> FeatureInfo:
        key = ("info", name)
        if key not in self._cache:
            arr = self.array(name)
            self._cache[key] = FeatureInfo.from_attrs(name, dict(arr.attrs), arr.shape[1:])
        return self._cache[key]

    def to_dask(self, name: str):
        """A dask array chunked by shard rows (one task per shard, not per inner chunk)."""
        import dask.array as da

        arr = self.array(name)
        return da.from_zarr(arr, chunks=(self.shard_rows, *arr.shape[1:]))

    def read(self, name: str, rows: Any = None) -> np.ndarray:
        """Rows of one feature as float32: rows is None (all), a slice, a bool mask or indices."""
        arr = self.array(name)
        if rows is None:
            out = arr[:]
        elif isinstance(rows, slice):
            out = arr[rows]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                if idx.shape != (self.num_samples,):
                    raise ValueError(f"a row mask must have shape ({self.num_samples},), got {idx.shape}")
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -self.num_samples or idx.max() >= self.num_samples):
                raise IndexError(f"row indices out of range for {self.num_samples} samples")
            idx = np.where(idx < 0, idx + self.num_samples, idx)
            if idx.size == 0:
                out = np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
            else:
                uniq, inverse = np.unique(idx, return_inverse=True)
                out = arr.oindex[(uniq,) + (slice(None),) * (arr.ndim - 1)][inverse]
        return np.asarray(out, dtype=np.float32)

    def iter_batches(self, name: str, batch_size: int, rows: Any = None) -> Iterator[np.ndarray]:
        """float32 batches of `batch_size` rows (the last may be smaller), in the order of `rows`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._check_name(name)
        if rows is None or isinstance(rows, slice):
            start, stop, step = (rows or slice(None)).indices(self.num_samples)
            if step == 1:
                for lo in range(start, stop, batch_size):
                    yield self.read(name, slice(lo, min(stop, lo + batch_size)))
                return
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        for lo in range(0, len(idx), batch_size):
            yield self.read(name, idx[lo : lo + batch_size])

    # -- samples ---------------------------------------------------------------------------

    def _sample_array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.asarray(self._root[SAMPLES][key][:])
        return self._cache[key]

    @property
    def labels(self) -> np.ndarray:
        return self._sample_array("label").astype(np.int64, copy=False)

    @property
    def class_names(self) -> list[str] | None:
        names = self.attrs.get("class_names")
        return list(names) if names is not None else None

    @property
    def sample_ids(self) -> np.ndarray:
        return as_str(self._sample_array("id"))

    @property
    def valid(self) -> np.ndarray:
        return self._sample_array("valid").astype(bool, copy=False)

    @property
    def splits(self) -> dict[str, np.ndarray]:
        """Row indices of each split, valid rows only."""
        if "splits" not in self._cache:
            group = self._root[SPLITS]
            valid = self.valid
            self._cache["splits"] = {
                name: np.flatnonzero(np.asarray(group[name][:], dtype=bool) & valid).astype(np.int64)
                for name in sorted(group.array_keys())
            }
        return dict(self._cache["splits"])

    @property
    def failures(self) -> list[dict[str, Any]]:
        errors = as_str(self._sample_array("error"))
        ids = self.sample_ids
        return [{"index": int(i), "id": str(ids[i]), "reason": str(errors[i])} for i in np.flatnonzero(errors != "")]

    # -- progress --------------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return Layout(self.num_samples, self.shard_rows, {}).num_units

    def _markers(self) -> tuple[list[str], np.ndarray]:
        done = self._root[PROGRESS]["done"]
        return list(done.attrs["features"]), np.asarray(done[:])

    def is_complete(self, name: str | None = None) -> bool:
        """Every unit of `name` (None: of every feature) is marked done."""
        columns, done = self._markers()
        if name is None:
            return bool(done.all())
        self._check_name(name)
        return bool(done[:, columns.index(name)].all())

    def unit_status(self) -> dict[str, np.ndarray]:
        """Per feature, a bool vector over units: done or not."""
        columns, done = self._markers()
        return {name: done[:, i].astype(bool) for i, name in enumerate(columns)}

    def nbytes_stored(self) -> int | None:
        """Bytes on disk (local stores only; None elsewhere)."""
        if not is_local(self.url):
            return None
        root = local_path(self.url)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def open_store(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a store read-only: a local path or an fsspec URL (memory://, s3://, gs://...)."""
    url = os.fspath(path_or_url)
    if is_local(url) and not local_path(url).exists():
        raise FileNotFoundError(f"no store at {url}")
    try:
        root = open_group(url, "r", storage_options)
    except Exception as exc:
        raise StoreError(f"cannot open {url} as a Zarr v3 store: {exc}") from exc
    # A store extended or still being written may carry stale consolidated metadata: read it live.
    if not root.attrs.get("consolidated", False):
        root = open_group(url, "r", storage_options, use_consolidated=False)
    return FeatureStore(root, url)
