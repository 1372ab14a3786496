"""The feature store: the only module that knows the on-disk layout.

A store is a Zarr v3 hierarchy, written once (possibly by many workers) and read many times:

    /                        root attributes: spec, fingerprint, provenance, versions, format version
    /features/<name>         (N, C, h, w) float16|float32, chunked along N only, sharded, compressed,
                             dimension_names (sample, channel, y, x); attributes describe the feature
    /samples/label           (N,) int64, -1 = unknown
    /samples/id              (N,) string (relative path or source id)
    /samples/valid           (N,) bool: False for failed images (their feature rows are zero)
    /samples/error           (N,) string: "" or why the image failed
    /splits/<split>          (N,) bool membership, one array per split (splits may overlap)
    /_progress/done          (units, features) uint8 completion markers, written after the data
    /_progress/stats         (units, features, 4) float64: max|x| (finite, float32, before casting),
                             infs stored, NaNs, values that overflowed float16

A *unit* is one shard of rows: every array shares the same shard length, so a unit is written as whole
shards of every array by exactly one writer (Zarr v3 has no locks: two writers on one shard lose data).
Only the process that creates the store writes metadata; workers write data chunks and their units'
marker rows. `finalize()` folds the per-unit statistics into each array's attributes and consolidates
the metadata once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from diffbank import __version__ as DIFFBANK_VERSION

FORMAT_NAME = "diffbank-feature-store"
FORMAT_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
DEFAULT_CHUNK_ROWS = 64
MAX_CHUNK_BYTES = 4 << 20  # inner chunks of ~1-4 MiB read fast in random 64-row batches
TARGET_SHARD_BYTES = 256 << 20  # few, large objects for object stores
COMPRESSIONS = ("blosc-lz4", "zstd", "none")
STORAGE_DTYPES = ("float16", "float32")
STATS_FIELDS = ("max_abs", "n_inf", "n_nan", "n_overflow")

FEATURES, SAMPLES, SPLITS, PROGRESS = "features", "samples", "splits", "_progress"
FEATURE_DIMS = ("sample", "channel", "y", "x")



class StoreError(Exception):
    """A store cannot be created, opened or extended as asked; the message says why and what to do."""


class FingerprintMismatch(StoreError):
    """An existing store was made from a different spec."""


# ---------------------------------------------------------------------------------------------
# Feature names (the rule lives in CONTRACTS.md; extract/spec.py owns it when present)
# ---------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^t(\d{3,})_b(\d{2,})_(avg|tok)([1-9]\d*)(?:_(flip))?$")


def _parse_name(name: str) -> dict[str, Any] | None:
    """{t, block, pool, pool_kind, pool_size, view} of a name that follows the rule, else None."""
    match = _NAME_RE.match(name)
    if not match:
        return None
    t, block, kind, size, flip = match.groups()
    return {"t": int(t), "block": int(block), "pool": f"{kind}{size}", "pool_kind": kind,
            "pool_size": int(size), "view": "flip" if flip else "center"}


from extract.spec import feature_name, parse_feature_name  # noqa: E402,F401  (the project's one naming rule)


# ---------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """What one feature array holds. `shape` is per sample (C, h, w); `resolution` is before pooling."""

    name: str
    t: int | None
    block: int | None
    module: str | None
    channels: int
    resolution: int | None
    pool_kind: str | None
    pool_size: int | None
    shape: tuple[int, ...]
    dtype: str
    view: str = "center"
    stats: dict[str, Any] | None = None

    def to_attrs(self) -> dict[str, Any]:
        return {"t": self.t, "block": self.block, "module": self.module, "channels": self.channels,
                "resolution": self.resolution, "pool_kind": self.pool_kind, "pool_size": self.pool_size,
                "pool": None if self.pool_kind is None else f"{self.pool_kind}{self.pool_size}",
                "shape": list(self.shape), "storage_dtype": self.dtype, "view": self.view}

    @classmethod
    def from_attrs(cls, name: str, attrs: Mapping[str, Any], shape: Sequence[int]) -> "FeatureInfo":
        return cls(name=name, t=attrs.get("t"), block=attrs.get("block"), module=attrs.get("module"),
                   channels=int(attrs.get("channels", shape[0])), resolution=attrs.get("resolution"),
                   pool_kind=attrs.get("pool_kind"), pool_size=attrs.get("pool_size"),
                   shape=tuple(int(s) for s in shape), dtype=str(attrs.get("storage_dtype")),
                   view=attrs.get("view", "center"), stats=attrs.get("stats"))

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Layout:
    """Row geometry shared by all arrays: the shard length is the unit of work."""

    num_samples: int
    shard_rows: int
    chunk_rows: dict[str, int]

    @property
    def num_units(self) -> int:
        return max(1, math.ceil(self.num_samples / self.shard_rows))

    def unit_rows(self, unit: int) -> tuple[int, int]:
        if not 0 <= unit < self.num_units:
            raise IndexError(f"unit {unit} out of range: this store has units 0..{self.num_units - 1}")
        start = unit * self.shard_rows
        return start, min(self.num_samples, start + self.shard_rows)


def plan_layout(num_samples: int, features: Sequence[FeatureInfo], *, shard_rows: int | None = None,
                chunk_rows: int | None = None, target_shard_bytes: int = TARGET_SHARD_BYTES) -> Layout:
    """Choose one shard length for all arrays and an inner chunk length per array.

    Inner chunks aim at <= 4 MiB (default 64 rows); the shard length is a multiple of every chunk
    length and aims at ~256 MiB for the widest feature, capped by N.
    """
    if num_samples < 1:
        raise StoreError("a store needs at least one sample")
    want_chunk = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    if want_chunk < 1:
        raise StoreError(f"chunk_rows must be positive, got {chunk_rows}")
    widest = max((f.row_bytes for f in features), default=1)
    if shard_rows is None:
        if num_samples <= want_chunk:
            shard_rows = num_samples
        else:
            by_bytes = max(want_chunk, (target_shard_bytes // max(widest, 1)) // want_chunk * want_chunk)
            shard_rows = min(by_bytes, math.ceil(num_samples / want_chunk) * want_chunk)
    shard_rows = int(shard_rows)
    if shard_rows < 1:
        raise StoreError(f"shard_rows must be positive, got {shard_rows}")
    chunks: dict[str, int] = {}
    for f in features:
        limit = max(1, min(want_chunk, MAX_CHUNK_BYTES // max(f.row_bytes, 1), shard_rows))
        # largest divisor of the shard length within the limit: shards must hold whole chunks
        chunks[f.name] = max(d for d in range(1, limit + 1) if shard_rows % d == 0)
    return Layout(num_samples, shard_rows, chunks)


def _compressors(compression: str) -> list[Any] | None:
    if compression == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if compression == "zstd":
        return [ZstdCodec(level=3)]
    if compression == "none":
        return None
    raise StoreError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


# ---------------------------------------------------------------------------------------------
# Spec / provenance helpers
# ---------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """A JSON-serialisable copy (dataclasses, paths, tuples, numpy scalars)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_json_safe(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """The resolved spec as plain JSON data (a dict, a dataclass, or an object with to_dict())."""
    if spec is None:
        return {}
    for method in ("to_dict", "as_dict"):
        fn = getattr(spec, method, None)
        if callable(fn):
            return _json_safe(fn())
    return _json_safe(spec)


def canonical_fingerprint(data: Any) -> str:
    text = json.dumps(_json_safe(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def spec_fingerprint(spec: Any) -> str:
    """The spec's fingerprint: extract.spec's definition when the spec is one of its objects."""
    fp = getattr(spec, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    if callable(fp):
        return str(fp())
    try:
        from extract import spec as spec_module  # type: ignore[attr-defined]

        fn = getattr(spec_module, "fingerprint", None)
        if callable(fn) and not isinstance(spec, Mapping):
            return str(fn(spec))
    except ImportError:
        pass
    return canonical_fingerprint(spec_to_dict(spec))


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "zarr", "numpy", "dask", "numcodecs", "h5py"):
        try:
            out[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            out[name] = None
    out["diffbank"] = DIFFBANK_VERSION
    return out


def manifest_hash(sample_ids: Sequence[str], labels: np.ndarray) -> str:
    """sha256 over (id, label) pairs in row order: two stores of the same dataset share it."""
    h = hashlib.sha256()
    for sid, label in zip(sample_ids, np.asarray(labels).tolist()):
        h.update(f"{sid}\t{int(label)}\n".encode())
    return h.hexdigest()


def _as_str(values: Any) -> np.ndarray:
    """A fixed-width unicode copy of zarr's variable-length strings (numpy's StringDType)."""
    return np.array(np.asarray(values).tolist(), dtype=str).reshape(np.shape(values))


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def _open_group(url: str | os.PathLike, mode: str, storage_options: dict[str, Any] | None = None,
                use_consolidated: bool | None = None) -> zarr.Group:
    kwargs: dict[str, Any] = {"mode": mode}
    if storage_options:
        kwargs["storage_options"] = storage_options
    if use_consolidated is not None:
        kwargs["use_consolidated"] = use_consolidated
    return zarr.open_group(os.fspath(url) if isinstance(url, os.PathLike) else url, **kwargs)


def _existing_root(url: str, storage_options: dict[str, Any] | None) -> zarr.Group | None:
    """The root group if a Zarr hierarchy is already at `url`, else None."""
    try:
        return _open_group(url, "r", storage_options, use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError is a FileNotFoundError too
        return None


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


class FeatureStore:
    """A store opened read-only. Cheap to create; reads only what is asked for."""

    def __init__(self, root: zarr.Group, url: str):
        self._root = root
        self.url = url
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{url} is a Zarr hierarchy but not a diffbank feature store "
                             f"(root attribute format={self.attrs.get('format')!r})")
        version = int(self.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise StoreError(f"{url} has store format {version}; this diffbank ({DIFFBANK_VERSION}) reads up "
                             f"to {FORMAT_VERSION}: upgrade diffbank")
        self.spec: dict[str, Any] = dict(self.attrs.get("spec") or {})
        self.fingerprint: str = str(self.attrs.get("fingerprint"))
        self.num_samples: int = int(self.attrs["num_samples"])
        self.shard_rows: int = int(self.attrs["shard_rows"])
        self._features = root[FEATURES]
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, samples={self.num_samples}, features={len(self.feature_names(None))}, "
                f"fingerprint={self.fingerprint[:12]})")

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
            yield self.read(name, idx[lo:lo + batch_size])

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
        return _as_str(self._sample_array("id"))

    @property
    def valid(self) -> np.ndarray:
        return self._sample_array("valid").astype(bool, copy=False)

    @property
    def splits(self) -> dict[str, np.ndarray]:
        """Row indices of each split, valid rows only."""
        if "splits" not in self._cache:
            group = self._root[SPLITS]
            valid = self.valid
            self._cache["splits"] = {name: np.flatnonzero(np.asarray(group[name][:], dtype=bool) & valid).astype(np.int64)
                                     for name in sorted(group.array_keys())}
        return dict(self._cache["splits"])

    @property
    def failures(self) -> list[dict[str, Any]]:
        errors = _as_str(self._sample_array("error"))
        ids = self.sample_ids
        return [{"index": int(i), "id": str(ids[i]), "reason": str(errors[i])} for i in np.flatnonzero(errors != "")]

    # -- progress --------------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return max(1, math.ceil(self.num_samples / self.shard_rows))

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
        if not _is_local(self.url):
            return None
        root = _local_path(self.url)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def open_store(path_or_url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a store read-only: a local path or an fsspec URL (memory://, s3://, gs://...)."""
    url = os.fspath(path_or_url)
    if _is_local(url) and not _local_path(url).exists():
        raise FileNotFoundError(f"no store at {url}")
    try:
        root = _open_group(url, "r", storage_options)
    except Exception as exc:
        raise StoreError(f"cannot open {url} as a Zarr v3 store: {exc}") from exc
    # A store extended or still being written may carry stale consolidated metadata: read it live.
    if not root.attrs.get("consolidated", False):
        root = _open_group(url, "r", storage_options, use_consolidated=False)
    return FeatureStore(root, url)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


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

    def __init__(self, root: zarr.Group, url: str, storage_options: dict[str, Any] | None = None):
        self._root = root
        self.url = url
        self.storage_options = storage_options
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
        self.infos = {name: FeatureInfo.from_attrs(name, dict(a.attrs), a.shape[1:]) for name, a in self._features.items()}

    @classmethod
    def open(cls, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> "StoreWriter":
        """Reopen an existing store for data writes (a worker): reads metadata, writes none."""
        url = os.fspath(url)
        return cls(_open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)

    @property
    def num_units(self) -> int:
        return max(1, math.ceil(self.num_samples / self.shard_rows))

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

    def write_unit(self, unit: int, features: Mapping[str, np.ndarray], *, valid: np.ndarray | None = None,
                   errors: Sequence[str] | None = None) -> None:
        """Write whole shards of `unit` for the given features, then mark them done.

        Rows of invalid samples are zeroed, whatever the caller passed. Order matters for crash safety:
        data, then statistics, then sample status, then the markers.
        """
        start, stop = self.unit_rows(unit)
        rows = stop - start
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

    def finalize(self) -> None:
        """Fold per-unit statistics into each feature's attributes and consolidate metadata (once)."""
        done = np.asarray(self._done[:]).astype(bool)
        stats = np.asarray(self._stats[:])
        for i, name in enumerate(self.columns):
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
            self._features[name].attrs.update({"stats": summary})
        errors = _as_str(self._error[:])
        self._root.attrs.update({"complete": bool(done.all()), "num_failures": int((errors != "").sum()),
                                 "finalized": _utc_now(), "consolidated": True})
        with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec (yet)": known
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self._root.store)


def _feature_attrs(info: FeatureInfo) -> dict[str, Any]:
    return info.to_attrs()


def _create_feature_array(group: zarr.Group, info: FeatureInfo, layout: Layout, compression: str) -> None:
    shape = (layout.num_samples, *info.shape)
    dims = FEATURE_DIMS if len(info.shape) == 3 else ("sample", "channel") if len(info.shape) == 1 else None
    group.create_array(
        info.name, shape=shape, dtype=info.dtype,
        chunks=(layout.chunk_rows[info.name], *info.shape),
        shards=(layout.shard_rows, *info.shape),
        compressors=_compressors(compression), fill_value=0.0,
        dimension_names=dims, attributes=_feature_attrs(info),
    )


def _create_progress(group: zarr.Group, names: Sequence[str], num_units: int) -> None:
    width = max(1, len(names))
    group.create_array("done", shape=(num_units, len(names)), dtype="uint8", chunks=(1, width),
                              fill_value=0, dimension_names=("unit", "feature"),
                              attributes={"features": list(names),
                                          "meaning": "1 = this (unit, feature) was fully written; markers come after the data"})
    group.create_array("stats", shape=(num_units, len(names), len(STATS_FIELDS)), dtype="float64",
                       chunks=(1, width, len(STATS_FIELDS)), fill_value=0.0,
                       dimension_names=("unit", "feature", "stat"), attributes={"fields": list(STATS_FIELDS)})


def _normalize_splits(splits: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, members in (splits or {}).items():
        if not re.match(r"^[A-Za-z0-9_.-]+$", str(name)):
            raise StoreError(f"split name {name!r}: use letters, digits, '_', '-' or '.'")
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
    ids = np.array([str(i) for i in range(n_samples)] if sample_ids is None else [str(s) for s in sample_ids], dtype=str)
    if ids.shape != (n_samples,):
        raise StoreError(f"{n_samples} samples but {len(ids)} sample ids")
    labs = np.full(n_samples, -1, dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64)
    if labs.shape != (n_samples,):
        raise StoreError(f"{n_samples} samples but labels of shape {labs.shape}")
    return ids, labs


def create_store(url: str | os.PathLike, spec: Any, n_samples: int, sample_ids: Sequence[str] | None,
                 labels: Any, splits: Mapping[str, Any] | None, class_names: Sequence[str] | None,
                 provenance: Mapping[str, Any] | None, *, features: Sequence[FeatureInfo],
                 shard_rows: int | None = None, chunk_rows: int | None = None, compression: str = "blosc-lz4",
                 storage_options: dict[str, Any] | None = None, fingerprint: str | None = None) -> StoreWriter:
    """Create the whole hierarchy up front, or reopen it to resume, or extend it with new features.

    An existing store with the same fingerprint is reopened as is (resume). One with a different
    fingerprint is refused unless the new spec only adds features (extract.spec.spec_only_adds): then the
    new arrays and their markers are added and nothing old is touched.
    """
    url = os.fspath(url)
    spec_dict = spec_to_dict(spec)
    fingerprint = fingerprint or spec_fingerprint(spec)
    if compression not in COMPRESSIONS:
        raise StoreError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    _check_features(features)
    ids, labs = _check_samples(n_samples, sample_ids, labels)
    split_masks = _normalize_splits(splits, n_samples)

    existing = _existing_root(url, storage_options)
    if existing is None and _is_local(url):
        path = _local_path(url)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{url} exists and is not a Zarr store; choose another --store path")
    if existing is not None:
        return _reopen(existing, url, storage_options, spec, spec_dict, fingerprint, features, ids, labs)

    layout = plan_layout(n_samples, features, shard_rows=shard_rows, chunk_rows=chunk_rows)
    root = _open_group(url, "w-", storage_options)
    prov = _json_safe(dict(provenance or {}))
    attrs = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "diffbank_version": DIFFBANK_VERSION,
        "created": _utc_now(), "spec": spec_dict, "fingerprint": fingerprint, "fingerprint_history": [fingerprint],
        "num_samples": n_samples, "shard_rows": layout.shard_rows, "num_units": layout.num_units,
        "compression": compression, "features": [f.name for f in features],
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "splits": sorted(split_masks), "dataset_manifest_sha256": manifest_hash(ids.tolist(), labs),
        "checkpoint_sha256": prov.get("checkpoint_sha256"), "versions": package_versions(),
        "noise_seed_rule": prov.get("noise_seed_rule"), "timestep_convention": prov.get("timestep_convention"),
        "provenance": prov, "complete": False, "consolidated": False,
    }
    feats = root.create_group(FEATURES)
    for info in features:
        _create_feature_array(feats, info, layout, compression)
    samples = root.create_group(SAMPLES)
    samples.create_array("label", data=labs, chunks=(min(n_samples, 1 << 16),), dimension_names=("sample",),
                         attributes={"unknown": -1})
    ids_arr = samples.create_array("id", shape=(n_samples,), dtype=str, chunks=(min(n_samples, 1 << 16),),
                                   dimension_names=("sample",))
    ids_arr[:] = ids
    samples.create_array("valid", shape=(n_samples,), dtype=bool, chunks=(layout.shard_rows,), fill_value=False,
                         dimension_names=("sample",), attributes={"meaning": "False: the image failed (rows zero) or its unit is not written yet"})
    samples.create_array("error", shape=(n_samples,), dtype=str, chunks=(layout.shard_rows,), fill_value="",
                         dimension_names=("sample",))
    split_group = root.create_group(SPLITS)
    for name, mask in split_masks.items():
        split_group.create_array(name, data=mask, chunks=(min(n_samples, 1 << 16),), dimension_names=("sample",))
    _create_progress(root.create_group(PROGRESS), [f.name for f in features], layout.num_units)
    root.attrs.update(attrs)  # last: a store whose root attributes exist is fully laid out
    return StoreWriter(_open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)


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
        if not re.match(r"^[A-Za-z0-9_.-]+$", f.name):
            raise StoreError(f"feature name {f.name!r}: use letters, digits, '_', '-' or '.'")


def _spec_only_adds(old: dict[str, Any], new_spec: Any) -> tuple[bool, str]:
    """Whether `new_spec` only adds features to the spec recorded in a store, and why not."""
    if isinstance(new_spec, Mapping) or not hasattr(new_spec, "content_dict"):
        return False, "the new spec is not an extract.spec.Spec, so it cannot be compared"
    from extract.spec import spec_only_adds

    try:
        added = spec_only_adds(old, new_spec)
    except Exception as exc:  # a spec it cannot compare is a spec we will not mix into this store
        return False, str(exc)
    if added is None:
        return False, "it changes more than the list of (timestep, block, pooling) features, or drops some"
    return True, ""


def _reopen(root: zarr.Group, url: str, storage_options: dict[str, Any] | None, spec: Any, spec_dict: dict[str, Any],
            fingerprint: str, features: Sequence[FeatureInfo], ids: np.ndarray, labs: np.ndarray) -> StoreWriter:
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{url} holds a Zarr hierarchy that is not a diffbank store (or one whose creation was "
                         f"interrupted before its attributes were written); remove it or choose another path")
    if int(attrs["num_samples"]) != len(ids):
        raise FingerprintMismatch(f"{url} holds {attrs['num_samples']} samples; this spec yields {len(ids)}")
    stored_ids = _as_str(root[SAMPLES]["id"][:])
    if not np.array_equal(stored_ids, ids) or not np.array_equal(np.asarray(root[SAMPLES]["label"][:]), labs):
        raise FingerprintMismatch(f"{url} was made from a different dataset (sample ids or labels differ); "
                                  f"use another --store path")
    if attrs.get("fingerprint") == fingerprint:
        return StoreWriter(_open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)
    ok, why = _spec_only_adds(dict(attrs.get("spec") or {}), spec)
    if not ok:
        raise FingerprintMismatch(
            f"{url} was made from a different spec (fingerprint {str(attrs.get('fingerprint'))[:12]}, this spec "
            f"{fingerprint[:12]}){': ' + why if why else ''}. A store can only be extended by a spec that adds "
            f"(timestep, block, pooling) features and changes nothing else; write to another --store path")
    old_names = list(attrs["features"])
    by_name = {f.name: f for f in features}
    missing = [n for n in old_names if n not in by_name]
    if missing:
        raise FingerprintMismatch(f"{url}: the new spec drops features {missing}; extending may only add")
    root_w = _open_group(url, "r+", storage_options, use_consolidated=False)
    for name in old_names:  # the old arrays must be what the new spec would write
        old = FeatureInfo.from_attrs(name, dict(root_w[FEATURES][name].attrs), root_w[FEATURES][name].shape[1:])
        if (old.shape, old.dtype) != (by_name[name].shape, by_name[name].dtype):
            raise FingerprintMismatch(f"{url}: feature {name} is stored as {old.shape} {old.dtype}; the new spec "
                                      f"gives {by_name[name].shape} {by_name[name].dtype}")
    added = [f for f in features if f.name not in old_names]
    shard_rows = int(attrs["shard_rows"])
    layout = plan_layout(len(ids), added, shard_rows=shard_rows)
    root_w.attrs.update({"consolidated": False})  # drop stale consolidated metadata before adding arrays
    for info in added:
        _create_feature_array(root_w[FEATURES], info, layout, str(attrs.get("compression", "blosc-lz4")))
    progress = root_w[PROGRESS]
    columns = old_names + [f.name for f in added]
    units = int(attrs["num_units"])
    progress["done"].resize((units, len(columns)))
    progress["stats"].resize((units, len(columns), len(STATS_FIELDS)))
    progress["done"].attrs.update({"features": columns})
    root_w.attrs.update({"spec": spec_dict, "fingerprint": fingerprint, "features": columns, "complete": False,
                         "fingerprint_history": list(attrs.get("fingerprint_history", [])) + [fingerprint],
                         "extended": _utc_now()})
    return StoreWriter(_open_group(url, "r+", storage_options, use_consolidated=False), url, storage_options)


# ---------------------------------------------------------------------------------------------
# In-memory arrays -> a complete store (synthetic stores, tests, users' own features)
# ---------------------------------------------------------------------------------------------


def save_features(url: str | os.PathLike, features: Mapping[str, np.ndarray], labels: Any,
                  splits: Mapping[str, Any] | None, sample_ids: Sequence[str] | None = None,
                  class_names: Sequence[str] | None = None, info: Mapping[str, Mapping[str, Any]] | None = None,
                  attrs: Mapping[str, Any] | None = None, *, shard_rows: int | None = None,
                  chunk_rows: int | None = None, compression: str = "blosc-lz4",
                  storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Write a complete store from arrays (N, C, h, w) or (N, D); returns it opened read-only.

    Names following the rule (t090_b24_avg2) get t/block/pooling parsed from the name; `info[name]`
    adds or overrides fields (module, resolution, t, block, pool_kind, pool_size, view, dtype).
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
        parsed = _parse_name(name) or {}
        dtype = extra.pop("dtype", "float16" if data.dtype == np.float16 else "float32")
        fields = {"t": parsed.get("t"), "block": parsed.get("block"), "module": None,
                  "resolution": None, "pool_kind": parsed.get("pool_kind"), "pool_size": parsed.get("pool_size"),
                  "view": parsed.get("view", "center")}
        unknown = set(extra) - set(fields) - {"channels"}
        if unknown:
            raise StoreError(f"info[{name!r}]: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields) + ['dtype']}")
        fields.update({k: v for k, v in extra.items() if k != "channels"})
        infos.append(FeatureInfo(name=name, channels=int(data.shape[1]), shape=tuple(data.shape[1:]), dtype=str(dtype),
                                 **fields))
        arrays[name] = data
    spec = {"kind": "save_features", "features": [i.to_attrs() | {"name": i.name} for i in infos],
            "attrs": _json_safe(dict(attrs or {}))}
    writer = create_store(url, spec, n, sample_ids, labs, splits, class_names, dict(attrs or {}), features=infos,
                          shard_rows=shard_rows, chunk_rows=chunk_rows, compression=compression,
                          storage_options=storage_options, fingerprint=canonical_fingerprint(spec))
    if writer.pending() == {}:
        raise StoreError(f"{url} already holds these features; nothing written")
    for unit in range(writer.num_units):
        start, stop = writer.unit_rows(unit)
        writer.write_unit(unit, {name: arrays[name][start:stop] for name in arrays})
    if attrs:
        writer._root.attrs.update({"user_attrs": _json_safe(dict(attrs))})
    writer.finalize()
    return open_store(url, storage_options)


# ---------------------------------------------------------------------------------------------
# Export and verification
# ---------------------------------------------------------------------------------------------


def export_hdf5(store: FeatureStore | str | os.PathLike, path: str | os.PathLike, compression: str | None = "gzip",
                features: Sequence[str] | None = None, *, keep_dtype: bool = False) -> Path:
    """Copy a store into one HDF5 file for teams without zarr: float32 (or the stored dtype with
    keep_dtype), gzip+shuffle by default (readable everywhere; lzf or None write much faster).
    Streams shard by shard: memory stays at one shard of one feature.
    """
    import h5py

    fs = store if isinstance(store, FeatureStore) else open_store(store)
    if compression not in ("gzip", "lzf", None, "none"):
        raise ValueError(f"compression {compression!r}: use gzip, lzf or none")
    compression = None if compression == "none" else compression
    names = list(features) if features is not None else fs.feature_names(None)
    for name in names:
        fs._check_name(name)
    out = Path(path)
    tmp = out.with_name(out.name + ".partial")
    filters: dict[str, Any] = {} if compression is None else {"compression": compression, "shuffle": True}
    with h5py.File(tmp, "w") as h5:
        h5.attrs["diffbank"] = json.dumps(_json_safe(fs.attrs))
        h5.attrs["source_store"] = fs.url
        for name in names:
            arr = fs.array(name)
            dtype = np.dtype(arr.dtype) if keep_dtype else np.dtype(np.float32)
            chunk = (max(1, min(64, fs.num_samples)), *arr.shape[1:])
            ds = h5.create_dataset(f"features/{name}", shape=arr.shape, dtype=dtype, chunks=chunk, **filters)
            for key, value in dict(arr.attrs).items():
                ds.attrs[key] = json.dumps(_json_safe(value))
            ds.attrs["dimension_names"] = json.dumps(list(arr.metadata.dimension_names or ()))
            for lo in range(0, fs.num_samples, fs.shard_rows):
                hi = min(fs.num_samples, lo + fs.shard_rows)
                ds[lo:hi] = np.asarray(arr[lo:hi], dtype=dtype)
        h5.create_dataset("samples/label", data=fs.labels)
        h5.create_dataset("samples/id", data=fs.sample_ids.astype(object), dtype=h5py.string_dtype())
        h5.create_dataset("samples/valid", data=fs.valid)
        errors = _as_str(fs._sample_array("error")).astype(object)
        h5.create_dataset("samples/error", data=errors, dtype=h5py.string_dtype())
        for split, rows in fs.splits.items():
            h5.create_dataset(f"splits/{split}", data=rows)
    tmp.replace(out)  # a half-written export never carries the final name
    return out


@dataclasses.dataclass
class VerifyReport:
    url: str
    ok: bool
    problems: list[str]
    checked: dict[str, Any]

    def __str__(self) -> str:
        head = f"{self.url}: {'OK' if self.ok else 'PROBLEMS'}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def verify(store: FeatureStore | str | os.PathLike, *, full_scan: bool = False) -> VerifyReport:
    """Check a store against what it records: markers, shapes, dtypes, fingerprint, and (full_scan)
    that stored NaN/inf counts equal the recorded ones."""
    fs = store if isinstance(store, FeatureStore) else open_store(store)
    problems: list[str] = []
    checked: dict[str, Any] = {"features": 0, "scanned": full_scan}
    status = fs.unit_status()
    for name in fs.feature_names(None):
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
            stats = info.stats or {}
            n_inf = n_nan = 0
            for lo in range(0, fs.num_samples, fs.shard_rows):
                block = np.asarray(arr[lo:lo + fs.shard_rows])
                n_inf += int(np.isinf(block).sum())
                n_nan += int(np.isnan(block).sum())
            if n_inf != int(stats.get("n_inf", 0)) or n_nan != int(stats.get("n_nan", 0)):
                problems.append(f"{name}: holds {n_inf} infs and {n_nan} NaNs; recorded "
                                f"{stats.get('n_inf', 0)} and {stats.get('n_nan', 0)}")
    for key in ("label", "id", "valid", "error"):
        shape = fs._root[SAMPLES][key].shape
        if shape != (fs.num_samples,):
            problems.append(f"samples/{key}: shape {shape} != ({fs.num_samples},)")
    expected = _recompute_fingerprint(fs.spec)
    checked["fingerprint"] = expected == fs.fingerprint
    if expected is None:
        problems.append("the stored spec no longer loads, so its fingerprint cannot be recomputed")
    elif expected != fs.fingerprint:
        problems.append(f"fingerprint {fs.fingerprint[:12]} does not match the stored spec ({expected[:12]})")
    if fs.class_names is not None and fs.labels.size and fs.labels.max() >= len(fs.class_names):
        problems.append(f"labels reach {int(fs.labels.max())} but only {len(fs.class_names)} class names")
    return VerifyReport(fs.url, not problems, problems, checked)


def _recompute_fingerprint(spec_dict: dict[str, Any]) -> str | None:
    """Recompute the fingerprint of a stored spec; None if the stored spec cannot be loaded any more."""
    if spec_dict.get("kind") == "save_features":
        return canonical_fingerprint(spec_dict)
    from extract.spec import SpecError, load_spec

    try:
        return load_spec(spec_dict, check_files=False).fingerprint
    except SpecError:
        return None
