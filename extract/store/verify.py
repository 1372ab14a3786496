"""Checking a store against what it records: markers, shapes, dtypes, the feature list, the fingerprint,
and (in a full scan) every stored shard and chunk. Nothing is written."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zarr

from extract.provenance import fingerprint as fingerprint_of
from extract.store.layout import (
    CHECKSUMS_SINCE,
    MACHINE_RECORD,
    PROGRESS,
    SAMPLES,
    SPLITS,
    StoreError,
    array_at,
    attributes,
    group_at,
    has_checksums,
)
from extract.store.presence import damaged_chunks, missing_chunks
from extract.store.reader import FeatureStore, open_store
from extract.store.shards import shard_state
from extract.store.state import feature_list_problems
from extract.store.tools import SAVED_KIND

SCAN_WINDOW_BYTES = 64 << 20  # float32 rows a full scan holds at once


@dataclasses.dataclass
class VerifyReport:
    url: str
    ok: bool
    problems: list[str]
    checked: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.url}: {'OK' if self.ok else 'PROBLEMS'}"
        return "\n".join(
            [
                head,
                *(f"  - {p}" for p in self.problems),
                *summary_lines(self.checked),
                *(f"  note: {n}" for n in self.notes),
            ]
        )


def summary_lines(checked: Mapping[str, Any]) -> list[str]:
    """What a verification covered, as a reader counts it, and what a full scan would add."""
    if "arrays" not in checked:
        return []
    from dask.utils import format_bytes  # dask's import (0.12 s) is paid by the command that prints, not by open_store

    size = format_bytes(checked["bytes"])
    lines = [
        f"  checked: {_count(checked['features'], 'feature array')} and "
        f"{_count(checked['arrays'] - checked['features'], 'sample array')}; "
        f"{checked['units']} units of {checked['rows']} rows; shapes, dtypes, completion markers"
        + (", fingerprint" if not checked.get("fingerprint_skipped") else "")
    ]
    if checked.get("scanned"):
        lines.append(
            f"  read: {size} of feature values: every shard and chunk"
            + (", chunk checksums" if checked.get("checksums") else "")
            + ", NaN/inf counts against the records"
        )
    else:
        lines.append(
            f"  --full would also read {size} of feature values: missing or truncated shards and chunks, chunk "
            "checksums, NaN/inf counts against the records"
        )
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _coverage(fs: FeatureStore, names: list[str]) -> dict[str, int]:
    """The counts a summary reports: arrays checked, units, rows and the feature values' bytes."""
    samples = fs._root[SAMPLES]
    return {
        "arrays": len(names) + (len(list(samples.array_keys())) if isinstance(samples, zarr.Group) else 0),
        "units": fs.num_units,
        "rows": fs.num_samples,
        "bytes": sum(int(fs.array(n).nbytes) for n in names),
    }


def verify(
    store: FeatureStore | str | os.PathLike,
    *,
    full_scan: bool = False,
    fingerprint_of_spec: Callable[[Mapping[str, Any]], str | None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Check a store against what it records: markers, shapes, dtypes, the feature list, fingerprint.

    Every sample, split and progress array is read and checked chunk by chunk (absent chunks from
    format 4, checksums always), and every feature's shards are listed against its markers. `full_scan`
    also reads every stored feature shard and chunk: a truncated shard, a chunk missing from its shard, a
    chunk that fails its checksum or does not decode, and infs/NaNs the extraction did not record are each
    named, with their rows. Stores of format 1 carry no chunk checksums, so a flipped byte there can only
    show as a wrong value; the report says so in its notes. Nothing is written.

    The store cannot read a spec, so for stores written from one, `fingerprint_of_spec(recorded spec)`
    recomputes the fingerprint (None: the spec no longer loads); without it that check is skipped.
    Stores written by `save_features` are checked by their own canonical hash.
    """
    url = store.url if isinstance(store, FeatureStore) else os.fspath(store)
    so = storage_options if storage_options is not None else getattr(store, "storage_options", None)
    # Live metadata: the consolidated copy could hide an array added or lost since it was written.
    fs = open_store(url, so, consolidated=False)
    problems: list[str] = _scan_records(fs)
    notes: list[str] = []
    checked: dict[str, Any] = {"features": 0, "scanned": full_scan}
    try:
        _check_features(fs, full_scan, problems, notes, checked)
        if fs.class_names is not None and fs.labels.size and fs.labels.max() >= len(fs.class_names):
            problems.append(f"labels reach {int(fs.labels.max())} but only {len(fs.class_names)} class names")
    except StoreError as exc:  # a damaged record the feature checks need: named above, or here
        if not problems:
            problems.append(str(exc))
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
    on_disk = set(fs.arrays_on_disk())
    checked.update(_coverage(fs, [n for n in fs.array_names() if n in on_disk]))
    return VerifyReport(fs.url, not problems, problems, checked, notes)


def _check_features(
    fs: FeatureStore, full_scan: bool, problems: list[str], notes: list[str], checked: dict[str, Any]
) -> None:
    """Markers, shapes, dtypes and stored shards of every feature array (data too with `full_scan`)."""
    status = fs.unit_status()
    problems += feature_list_problems(fs._root)
    version = int(fs.attrs.get("format_version", 0))
    on_disk = set(fs.arrays_on_disk())  # one listing: each call lists every array
    names = [n for n in fs.array_names() if n in on_disk]
    unchecked = [n for n in names if not has_checksums(fs.array(n))]
    checked["checksums"] = not unchecked
    if version < CHECKSUMS_SINCE or unchecked:
        notes.append(
            f"this store (format {version}) predates chunk checksums: a flipped byte in a chunk cannot be "
            f"detected, only values that do not decode or are not finite"
        )
    per_unit = _unit_stats(fs) if full_scan else {}
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
        if not full_scan:
            problems += missing_chunks(arr, fs.required_shards(name).needs)
        else:
            marked = np.ones(fs.num_units, bool) if units is None else units
            found, counted = _scan_feature(fs, name, marked, per_unit.get(name), fs.valid)
            problems += found
            n_inf, n_nan, rec_inf, rec_nan = counted
            if n_inf != rec_inf or n_nan != rec_nan:
                problems.append(
                    f"{name}: holds {n_inf} infs and {n_nan} NaNs in units marked done; the extraction "
                    f"recorded {rec_inf} and {rec_nan}"
                )
            elif n_inf or n_nan:
                notes.append(f"{name}: {n_inf} infs and {n_nan} NaNs, as recorded at extraction")


def _unit_stats(fs: FeatureStore) -> dict[str, np.ndarray]:
    """Per feature, the (units, 4) statistics the writer recorded with each unit's data."""
    progress = group_at(fs._root, PROGRESS)
    columns = list(attributes(array_at(progress, "done"))["features"])
    stats = np.asarray(array_at(progress, "stats")[:])
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
            if nonzero or fs.every_chunk:
                problems.append(f"{where}: marked done but its data is absent ({state.key}); it reads as zeros")
            continue
        if state.problem:
            problems.append(f"{where}: shard {state.key} is {state.problem}")
            continue
        missing = [
            f"{where}: chunk {k} (rows {c_lo}-{min(hi, c_lo + state.chunk_rows) - 1}) is missing from shard "
            f"{state.key}; it reads as zeros"
            for k in state.empty_chunks
            for c_lo in [lo + k * state.chunk_rows]
            if c_lo < hi and (fs.every_chunk or (nonzero and valid[c_lo : c_lo + state.chunk_rows].any()))
        ]
        problems += missing
        if missing:
            continue
        try:
            counts = _count_nonfinite(fs, name, lo, hi)
        except Exception:  # name each chunk that fails, not just the first
            problems += _bad_chunks(arr, where, lo, hi, state.chunk_rows or (hi - lo))
            continue
        n_inf += counts[0]
        n_nan += counts[1]
    return problems, (n_inf, n_nan, rec_inf, rec_nan)


def _count_nonfinite(fs: FeatureStore, name: str, lo: int, hi: int) -> tuple[int, int]:
    """(infs, NaNs) in rows lo..hi, read a window at a time: a whole 256 MiB float16 shard as float32 would
    make the scan's memory grow with the shard, and so with the store's rows."""
    shape = fs.array(name).shape[1:]
    step = max(1, SCAN_WINDOW_BYTES // (4 * int(np.prod(shape, dtype=np.int64))))
    n_inf = n_nan = 0
    for start in range(lo, hi, step):
        block = fs.read(name, slice(start, min(hi, start + step)))
        n_inf += int(np.isinf(block).sum())
        n_nan += int(np.isnan(block).sum())
        del block  # its memory goes back to the reader for the next window
    return n_inf, n_nan


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


def _scan_records(fs: FeatureStore) -> list[str]:
    """Every sample, split and progress array: shape, absent chunks (from format 4) and damaged ones."""
    out = []
    for group in (SAMPLES, SPLITS, PROGRESS):
        for key, arr in group_at(fs._root, group).arrays():
            if group != PROGRESS and tuple(arr.shape) != (fs.num_samples,):
                out.append(f"{group}/{key}: shape {tuple(arr.shape)} != ({fs.num_samples},)")
            # The machine record is written only by writers that know their machine (extraction, not
            # save_features): an absent cell is "unrecorded", never data read as a fill value.
            optional = group == PROGRESS and key == MACHINE_RECORD
            if fs.every_chunk and (group != PROGRESS or fs.attrs.get("complete")) and not optional:
                out += missing_chunks(arr)
            try:
                arr[...]
            except Exception:
                out += damaged_chunks(arr)
    return out
