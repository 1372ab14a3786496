"""Writing a store's data: whole units (shards), then finalize.

Workers reopen a store created by `extract.store.create.create_store` and write data chunks and their
units' marker rows; they write no metadata. `finalize()` folds the per-unit statistics into each array's
attributes and consolidates the metadata once, from a fresh read of the root: never from the copy read
when the run started.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from extract.provenance import utc_now
from extract.store.encode import shard_encoder, write_rows
from extract.store.layout import (
    FEATURES,
    FLOAT16_MAX,
    MACHINE_RECORD,
    PROGRESS,
    SAMPLES,
    STATS_FIELDS,
    FeatureInfo,
    Layout,
    array_at,
    as_str,
    attributes,
    every_chunk_written,
    group_at,
    open_group,
)
from extract.store.lease import Lease

CAST_BLOCK_BYTES = 16 << 20  # float32 rows cast_with_stats converts at once


def cast_with_stats(data: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Cast float32 features to the storage dtype and the statistics of the cast.

    Returns (cast array, [max |x| over finite float32 values, infs after the cast, NaNs, overflows]).
    Rows go a block at a time: float32 temporaries of a whole 256 MiB float16 shard would take ~1.5 GB.
    """
    x = np.asarray(data)
    out = np.empty(x.shape, np.float16) if dtype == "float16" else np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        cast, stats = _cast_block(x, dtype)
        return (cast if dtype == "float16" else out), stats
    row_bytes = 4 * max(1, int(np.prod(x.shape[1:], dtype=np.int64)))
    step = max(1, CAST_BLOCK_BYTES // row_bytes)
    stats = np.zeros(len(STATS_FIELDS), dtype=np.float64)
    for lo in range(0, len(x), step):
        cast, part = _cast_block(x[lo : lo + step], dtype)
        if dtype == "float16":
            out[lo : lo + step] = cast
        stats[0] = max(stats[0], part[0])
        stats[1:] += part[1:]
    return out, stats


def _cast_block(data: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
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
            out: np.ndarray = x.astype(np.float16)
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
        attrs = attributes(root)
        self.attrs = attrs
        self.num_samples = int(attrs["num_samples"])
        self.shard_rows = int(attrs["shard_rows"])
        self.fingerprint = str(attrs["fingerprint"])
        with every_chunk_written():  # arrays opened here store chunks of fill values too
            progress = group_at(root, PROGRESS)
            done = array_at(progress, "done")
            self.columns: list[str] = list(attributes(done)["features"])
            self._done = done
            self._stats = array_at(progress, "stats")
            self._machine = array_at(progress, MACHINE_RECORD) if MACHINE_RECORD in progress else None
            self._features = {name: array_at(root, f"{FEATURES}/{name}") for name in self.columns}
            self._encoders = {name: shard_encoder(arr) for name, arr in self._features.items()}
            self._valid = array_at(root, f"{SAMPLES}/valid")
            self._error = array_at(root, f"{SAMPLES}/error")
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
        machine: Mapping[str, Any] | None = None,
    ) -> None:
        """Write whole shards of `unit` for the given features, then mark them done.

        Rows of invalid samples are zeroed, whatever the caller passed. `machine`: the signature of the
        machine that computed them (extract.hardware), added to the unit's record. Order matters for crash
        safety: data, then statistics, then sample status and machine record, then the markers.
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
            write_rows(self._features[name], start, data, self._encoders[name])
        cols = [self.columns.index(name) for name in prepared]
        stats_row = np.asarray(self._stats[unit])
        for name, col in zip(prepared, cols):
            stats_row[col] = prepared[name][1]
        self._stats[unit] = stats_row
        self._valid[start:stop] = valid_rows
        self._error[start:stop] = np.array(error_rows.tolist(), dtype=str)
        if machine is not None and self._machine is not None:
            self._record_machine(unit, dict(machine))
        done_row = np.asarray(self._done[unit])
        done_row[cols] = 1
        self._done[unit] = done_row  # the unit's marker row: only this unit's owner touches it

    def _record_machine(self, unit: int, signature: dict[str, Any]) -> None:
        assert self._machine is not None
        cell = str(np.asarray(self._machine[unit : unit + 1])[0])
        seen = json.loads(cell) if cell else []
        if signature not in seen:
            self._machine[unit : unit + 1] = np.array([json.dumps([*seen, signature], sort_keys=True)], dtype=str)

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
        done_arr = array_at(root, f"{PROGRESS}/done")
        columns = list(attributes(done_arr)["features"])
        done = np.asarray(done_arr[:]).astype(bool)
        stats = np.asarray(array_at(root, f"{PROGRESS}/stats")[:])
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
            array_at(root, f"{FEATURES}/{name}").attrs.update({"stats": summary})
        errors = as_str(array_at(root, f"{SAMPLES}/error")[:])
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
