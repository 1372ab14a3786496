"""Which stored chunks must exist, and errors that name a missing or damaged chunk.

Zarr reads an absent chunk as its fill value, so a deleted file would read as zeros, labels 0 or
"invalid" without a word. diffbank's rules instead: a feature shard of a unit marked done must exist
when the writer recorded anything but zeros for it (`required_units`), and from format 4
(`EVERY_CHUNK_SINCE`) the writer stores every chunk of every array, zeros included, so any absent chunk
of a sample or split array, of a progress array once the store is finalized complete, and any empty inner
chunk of a marked unit, is damage. Damage is a
`MissingChunk` or `DamagedChunk` naming the array, the chunk and its rows (or units).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import zarr
from zarr.core.sync import sync

from extract.store.layout import StoreError, shard_shape, v3_metadata
from extract.store.shards import EMPTY_CHUNK


class MissingChunk(StoreError):
    """A chunk that the store's records say was written is absent: it would read as fill values."""


class DamagedChunk(StoreError):
    """A stored chunk fails its checksum or does not decode."""


def chunk_grid(arr: zarr.Array) -> tuple[int, ...]:
    """Stored objects per axis: shards of a sharded array, chunks of any other."""
    step = arr.shards or arr.chunks
    return tuple(math.ceil(s / c) for s, c in zip(arr.shape, step))


def describe_chunk(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """'<array>: chunk <key> (<axis> lo-hi)': the rows (units, for progress arrays) a stored object holds."""
    step = int((arr.shards or arr.chunks)[0])
    lo, hi = coords[0] * step, min(arr.shape[0], (coords[0] + 1) * step)
    axis = (v3_metadata(arr).dimension_names or ("rows",))[0] or "rows"
    axis = {"sample": "rows", "unit": "units"}.get(axis, axis)
    return f"{arr.path}: chunk {arr.metadata.encode_chunk_key(coords)} ({axis} {lo}-{hi - 1})"


def stored_keys(arr: zarr.Array) -> set[str]:
    """Keys (relative to the array) of its stored chunks or shards: one listing of the store."""
    store = arr.store_path.store
    prefix = f"{arr.path}/"

    async def listing() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return {key[len(prefix) :] for key in sync(listing()) if key != f"{prefix}zarr.json"}


def missing_chunks(arr: zarr.Array, required: Callable[[tuple[int, ...]], bool] = lambda coords: True) -> list[str]:
    """The chunks of `arr` that `required(coords)` says must exist and that are absent, described."""
    present = stored_keys(arr)
    return [
        f"{describe_chunk(arr, coords)} is absent (it would read as fill values)"
        for coords in np.ndindex(*chunk_grid(arr))
        if required(coords) and arr.metadata.encode_chunk_key(coords) not in present
    ]


def check_present(arr: zarr.Array, required: Callable[[tuple[int, ...]], bool] = lambda coords: True) -> None:
    """Raise MissingChunk naming the first absent chunk that must exist (and how many there are)."""
    missing = missing_chunks(arr, required)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingChunk(f"{missing[0]}{more}; `diffbank store verify` lists every problem")


def read_checked(arr: zarr.Array) -> np.ndarray:
    """The whole (small) array; a chunk that fails its checksum or does not decode is named."""
    try:
        return np.asarray(arr[...])
    except StoreError:
        raise
    except Exception:  # zarr's error names no chunk: find the first bad one
        raise DamagedChunk(damaged_chunks(arr)[0]) from None


def damaged_chunks(arr: zarr.Array) -> list[str]:
    """Each stored object of `arr` that fails its checksum or does not decode, described."""
    step = arr.shards or arr.chunks
    out = []
    for coords in np.ndindex(*chunk_grid(arr)):
        where = tuple(slice(c * s, min(n, (c + 1) * s)) for c, s, n in zip(coords, step, arr.shape))
        try:
            arr[where]
        except Exception as exc:
            why = "fails its checksum" if "checksum" in str(exc).lower() else f"does not decode ({exc})"
            out.append(f"{describe_chunk(arr, coords)} {why}")
    return out or [f"{arr.path}: does not decode"]


def required_units(done: np.ndarray, stats: np.ndarray | None, every_chunk: bool) -> np.ndarray:
    """Per unit, whether a feature's shard must exist: marked done and, in stores that do not store
    every chunk, recorded by the writer as holding something other than zeros (max |x|, infs or NaNs)."""
    done = np.asarray(done).astype(bool)
    if every_chunk or stats is None:
        return done
    stats = np.asarray(stats)
    return done & ((stats[:, 0] > 0) | (stats[:, 1] > 0) | (stats[:, 2] > 0))


@dataclasses.dataclass(frozen=True)
class RequiredShards:
    """Which shards (units) of one feature array must exist, and whether each of their inner chunks must."""

    units: np.ndarray  # bool per shard along the sample axis
    every_chunk: bool

    def check(self, arr: zarr.Array, shard: int, index: np.ndarray | None, lo: int, hi: int, chunk_rows: int) -> None:
        """Raise MissingChunk if shard `shard` (read for rows [lo, hi), `index` its chunk table or None when
        the object is absent) lacks data its unit's markers say was written."""
        if not self.needs((shard,)):
            return
        if index is None:
            raise MissingChunk(
                f"{describe_chunk(arr, (shard,) + (0,) * (arr.ndim - 1))} is marked written but absent "
                f"(it would read as zeros); `diffbank store verify` lists every problem"
            )
        if not self.every_chunk:
            return
        base = shard * int(shard_shape(arr)[0])
        first, last = (lo - base) // chunk_rows, (hi - 1 - base) // chunk_rows
        empty = np.flatnonzero(index[first : last + 1, 0] == EMPTY_CHUNK)
        if empty.size:
            k = first + int(empty[0])
            c_lo = base + k * chunk_rows
            c_hi = min(arr.shape[0], c_lo + chunk_rows)
            raise MissingChunk(
                f"{describe_chunk(arr, (shard,) + (0,) * (arr.ndim - 1))}: inner chunk {k} (rows {c_lo}-{c_hi - 1}) "
                f"is missing from the shard (it would read as zeros)"
            )

    def needs(self, coords: tuple[int, ...]) -> bool:
        """Whether the stored object at chunk-grid `coords` must exist."""
        return coords[0] < len(self.units) and bool(self.units[coords[0]])

    def check_listed(self, arr: zarr.Array) -> None:
        """Every required shard is present, by one listing (for reads that do not go through the fast path)."""
        check_present(arr, self.needs)
