"""The on-disk layout of a feature store: the only code that knows it.

A store is a Zarr v3 hierarchy, written once (possibly by many workers) and read many times:

    /                        root attributes: spec, fingerprint, provenance, versions, format version
    /features/<name>         (N, C, h, w) float16|float32, chunked along N only, sharded, compressed,
                             dimension_names (sample, <name>_channel, <name>_y, <name>_x) (`feature_dims`);
                             attributes describe the feature
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
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from extract.features import FeatureKey, pool_label

if TYPE_CHECKING:  # only the types: zarr's metadata and array config classes are internal
    from zarr.core.array_spec import ArrayConfigParams
    from zarr.core.metadata import ArrayV3Metadata

FORMAT_NAME = "diffbank-feature-store"
# 2: every array's chunks end in a crc32c checksum (inside each shard, after compression), so a flipped
# byte fails to decode instead of reading as a wrong number. Version 1 stores (no chunk checksums) still read.
# 3: a feature's dimensions are named after it (`feature_dims`), so the features group is one valid xarray
# Dataset over the shared `sample` dimension; version 1 and 2 stores (generic names) still read.
# 4: every chunk is stored, fill values included, so an absent one is damage (`extract.store.presence`).
FORMAT_VERSION = 4
CHECKSUMS_SINCE, OWN_DIMS_SINCE, EVERY_CHUNK_SINCE = 2, 3, 4
# Array config of every write: chunks equal to the fill value are stored too (zarr's default skips them).
WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}


def every_chunk_written() -> Any:
    """A context in which arrays opened (`group[name]`) take `WRITE_EVERY_CHUNK` as their config."""
    return zarr.config.set({f"array.{k}": v for k, v in WRITE_EVERY_CHUNK.items()})


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
# Inner chunk length, measured by benchmarks/bench_reader.py (629 MB float16 feature, 1024 x 2 x 2 per row,
# 2 shared cores, 2 decode threads, three runs): full reads to float32 ran at the same rate within the
# machine's noise (64-row chunks 1.37-1.69 GB/s, 512-row 1.32-1.67), while a random 64-row batch (a
# shuffled probe epoch) cost 51-62 ms against 92-147 ms, since every row drawn decodes its whole chunk: 64.
DEFAULT_CHUNK_ROWS = 64
MAX_CHUNK_BYTES = 4 << 20  # inner chunks of ~1-4 MiB read fast in random 64-row batches
TARGET_SHARD_BYTES = 256 << 20  # few, large objects for object stores
MIN_UNITS = 8  # resume granularity: small stores still get several units
# bfloat16 is not a core zarr dtype, so it can be a compute dtype but never a storage one.
STATS_FIELDS = ("max_abs", "n_inf", "n_nan", "n_overflow")

FEATURES, SAMPLES, SPLITS, PROGRESS = "features", "samples", "splits", "_progress"
MACHINE_RECORD = "machine"  # _progress/machine; stores written before it have none
FEATURE_DIMS = ("sample", "channel", "y", "x")  # a feature's axes; also its dimension names before format 3
_ARRAY_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class StoreError(Exception):
    """A store cannot be created, opened or extended as asked; the message says why and what to do."""


class FingerprintMismatch(StoreError):
    """An existing store was made from a different spec."""



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
    draw: int = 0  # the noise draw this array holds, of `draws` kept apart (combine: separate)
    draws: int = 1

    def to_attrs(self) -> dict[str, Any]:
        # Draw attributes only where draws are kept apart: a one-array-per-feature store's metadata is unchanged.
        draws = {"noise_draw": self.draw, "noise_draws": self.draws} if self.draws > 1 else {}
        return {
            "t": self.t,
            "block": self.block,
            "module": self.module,
            "channels": self.channels,
            "resolution": self.resolution,
            "pool_kind": self.pool_kind,
            "pool_size": self.pool_size,
            "pool": None if self.pool_kind is None else f"{self.pool_kind}{self.pool_size}",
            "shape": list(self.shape),
            "storage_dtype": self.dtype,
            "view": self.view,
            **draws,
        }

    @classmethod
    def from_attrs(cls, name: str, attrs: Mapping[str, Any], shape: Sequence[int]) -> FeatureInfo:
        return cls(
            name=name,
            t=attrs.get("t"),
            block=attrs.get("block"),
            module=attrs.get("module"),
            channels=int(attrs.get("channels", shape[0])),
            resolution=attrs.get("resolution"),
            pool_kind=attrs.get("pool_kind"),
            pool_size=attrs.get("pool_size"),
            shape=tuple(int(s) for s in shape),
            dtype=str(attrs.get("storage_dtype")),
            view=attrs.get("view", "center"),
            stats=attrs.get("stats"),
            draw=int(attrs.get("noise_draw", 0)),
            draws=int(attrs.get("noise_draws", 1)),
        )

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def key(self) -> FeatureKey:
        """Where a model feature was tapped; StoreError for a feature saved without one (`save_features`)."""
        if self.t is None or self.block is None or self.pool_kind is None or self.pool_size is None:
            raise StoreError(f"feature {self.name!r} has no timestep, block and pooling: it was not extracted")
        return FeatureKey(self.t, self.block, pool_label(self.pool_kind, self.pool_size), self.view, self.draw)


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


def plan_layout(
    num_samples: int,
    features: Sequence[FeatureInfo],
    *,
    shard_rows: int | None = None,
    chunk_rows: int | None = None,
    target_shard_bytes: int = TARGET_SHARD_BYTES,
    max_shard_rows: int | None = None,
) -> Layout:
    """Choose one shard length for all arrays and an inner chunk length per array.

    Inner chunks aim at <= 4 MiB (default 64 rows); the shard length is a multiple of every chunk
    length and aims at ~256 MiB for the widest feature, capped by N. A shard is also the unit of
    resume, so `max_shard_rows` (the caller's estimate of a minute of compute) caps it, and so does
    `MIN_UNITS`: an interrupted run loses at most one unit. Neither depends on the machine, so the
    same spec always gets the same layout and the same bytes.
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
            by_count = math.ceil(math.ceil(num_samples / MIN_UNITS) / want_chunk) * want_chunk
            by_time = max(want_chunk, int(max_shard_rows or by_bytes) // want_chunk * want_chunk)
            shard_rows = min(by_bytes, by_count, by_time, math.ceil(num_samples / want_chunk) * want_chunk)
    shard_rows = int(shard_rows)
    if shard_rows < 1:
        raise StoreError(f"shard_rows must be positive, got {shard_rows}")
    chunks: dict[str, int] = {}
    for f in features:
        limit = max(1, min(want_chunk, MAX_CHUNK_BYTES // max(f.row_bytes, 1), shard_rows))
        # largest divisor of the shard length within the limit: shards must hold whole chunks
        chunks[f.name] = max(d for d in range(1, limit + 1) if shard_rows % d == 0)
    return Layout(num_samples, shard_rows, chunks)


def has_checksums(arr: zarr.Array) -> bool:
    """Whether an array's chunks (the inner chunks of a sharded one) carry a crc32c checksum."""
    codecs = list(v3_metadata(arr).codecs)
    sharding = sharding_codec(arr)
    if sharding is not None:
        codecs = list(sharding.codecs)
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def sharding_codec(arr: zarr.Array) -> Any:
    from zarr.codecs import ShardingCodec

    codecs = list(v3_metadata(arr).codecs)
    return codecs[0] if codecs and isinstance(codecs[0], ShardingCodec) else None


def shard_shape(arr: zarr.Array) -> tuple[int, ...]:
    if arr.shards is None:
        raise StoreError(f"{arr.path}: not a sharded array")
    return arr.shards


def check_array_name(name: str, what: str) -> None:
    if not _ARRAY_NAME_RE.match(str(name)):
        raise StoreError(f"{what} {name!r}: use letters, digits, '_', '-' or '.'")


def manifest_hash(sample_ids: Sequence[str], labels: np.ndarray) -> str:
    """sha256 over (id, label) pairs in row order: two stores of the same dataset share it."""
    h = hashlib.sha256()
    for sid, label in zip(sample_ids, np.asarray(labels).tolist()):
        h.update(f"{sid}\t{int(label)}\n".encode())
    return h.hexdigest()


def as_str(values: Any) -> np.ndarray:
    """A fixed-width unicode copy of zarr's variable-length strings (numpy's StringDType)."""
    return np.array(np.asarray(values).tolist(), dtype=str).reshape(np.shape(values))


# zarr types a group's member as array or group (and an array's attributes as any JSON value); the layout
# above says which each path is, so these check it once and give the rest of the code the precise type.
def array_at(group: zarr.Group, path: str) -> zarr.Array:
    """The array at `path` (e.g. "samples/label") below `group`; KeyError if absent."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{path!r} in the store is a group where the layout has an array")
    return node


def group_at(group: zarr.Group, path: str) -> zarr.Group:
    """The group at `path` (e.g. "features") below `group`; KeyError if absent."""
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{path!r} in the store is an array where the layout has a group")
    return node


def attributes(node: zarr.Array | zarr.Group) -> dict[str, Any]:
    """A copy of a node's attributes, whose shapes the layout defines."""
    return dict(node.attrs)


def v3_metadata(arr: zarr.Array) -> ArrayV3Metadata:
    """An array's Zarr v3 metadata: stores are written in format 3 only."""
    meta = arr.metadata
    if meta.zarr_format != 3:
        raise StoreError(f"array {arr.path!r} is not a Zarr v3 array; feature stores are Zarr format 3")
    return meta


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def open_group(
    url: str | os.PathLike,
    mode: str,
    storage_options: dict[str, Any] | None = None,
    use_consolidated: bool | None = None,
) -> zarr.Group:
    kwargs: dict[str, Any] = {"mode": mode}
    if storage_options:
        kwargs["storage_options"] = storage_options
    if use_consolidated is not None:
        kwargs["use_consolidated"] = use_consolidated
    return zarr.open_group(os.fspath(url) if isinstance(url, os.PathLike) else url, **kwargs)


def existing_root(url: str, storage_options: dict[str, Any] | None) -> zarr.Group | None:
    """The root group if a Zarr hierarchy is already at `url`, else None."""
    try:
        return open_group(url, "r", storage_options, use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError is a FileNotFoundError too
        return None


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()
