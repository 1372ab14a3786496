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
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

FORMAT_NAME = "diffbank-feature-store"
# 2: every array's chunks end in a crc32c checksum (inside each shard, after compression), so a flipped
# byte fails to decode instead of reading as a wrong number. Version 1 stores (no chunk checksums) still read.
# 3: a feature's dimensions are named after it (`feature_dims`), so the features group is one valid xarray
# Dataset over the shared `sample` dimension; version 1 and 2 stores (generic names) still read.
FORMAT_VERSION = 3
CHECKSUMS_SINCE = 2
OWN_DIMS_SINCE = 3
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
# Inner chunk length, measured by benchmarks/bench_reader.py (629 MB float16 feature, 1024 x 2 x 2 per row,
# 2 shared cores, 2 decode threads, three runs): full reads to float32 ran at the same rate within the
# machine's noise (64-row chunks 1.37-1.69 GB/s, 512-row 1.32-1.67), while a random 64-row batch (a
# shuffled probe epoch) cost 51-62 ms against 92-147 ms, since every row drawn decodes its whole chunk: 64.
DEFAULT_CHUNK_ROWS = 64
MAX_CHUNK_BYTES = 4 << 20  # inner chunks of ~1-4 MiB read fast in random 64-row batches
TARGET_SHARD_BYTES = 256 << 20  # few, large objects for object stores
MIN_UNITS = 8  # resume granularity: small stores still get several units
COMPRESSIONS = ("blosc-lz4", "zstd", "none")
# bfloat16 is not a core zarr dtype, so it can be a compute dtype but never a storage one.
STORAGE_DTYPES = ("float16", "float32")
STATS_FIELDS = ("max_abs", "n_inf", "n_nan", "n_overflow")

FEATURES, SAMPLES, SPLITS, PROGRESS = "features", "samples", "splits", "_progress"
FEATURE_DIMS = ("sample", "channel", "y", "x")  # a feature's axes; also its dimension names before format 3
_ARRAY_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SAMPLE_CHUNK = 1 << 16


class StoreError(Exception):
    """A store cannot be created, opened or extended as asked; the message says why and what to do."""


class FingerprintMismatch(StoreError):
    """An existing store was made from a different spec."""


def itemsize(dtype: str) -> int:
    """Bytes per stored value of a storage dtype."""
    if dtype not in STORAGE_DTYPES:
        raise StoreError(f"storage dtype {dtype!r} not supported; use one of {STORAGE_DTYPES}")
    return np.dtype(dtype).itemsize


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


def compressors(compression: str) -> list[Any]:
    """Bytes-to-bytes codecs of a feature array's inner chunks: the compressor, then the checksum."""
    if compression == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise StoreError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


# Sample, split and progress arrays: zarr's default compression plus the checksum.
_SMALL_CODECS = (ZstdCodec(level=0), Crc32cCodec())


def has_checksums(arr: zarr.Array) -> bool:
    """Whether an array's chunks (the inner chunks of a sharded one) carry a crc32c checksum."""
    codecs = list(arr.metadata.codecs)
    sharding = _sharding(arr)
    if sharding is not None:
        codecs = list(sharding.codecs)
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def _sharding(arr: zarr.Array) -> Any:
    from zarr.codecs import ShardingCodec

    codecs = list(arr.metadata.codecs)
    return codecs[0] if codecs and isinstance(codecs[0], ShardingCodec) else None


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


# ---------------------------------------------------------------------------------------------
# Creating the arrays
# ---------------------------------------------------------------------------------------------


def feature_dims(name: str, ndim: int, format_version: int = FORMAT_VERSION) -> tuple[str, ...] | None:
    """Dimension names of feature `name` with `ndim` axes (sample first): None for shapes without names.

    From format 3 every axis but `sample` carries the feature's name (`t090_b24_avg2_channel`): features
    differ in channel and spatial sizes, and xarray requires one size per dimension name across a group,
    while `sample` is shared with the arrays under samples/ and splits/ so they align as coordinates.
    """
    axes = {4: FEATURE_DIMS, 2: FEATURE_DIMS[:2]}.get(ndim)
    if axes is None or format_version < OWN_DIMS_SINCE:
        return axes
    return (axes[0], *(f"{name}_{axis}" for axis in axes[1:]))


def create_feature_array(
    group: zarr.Group, info: FeatureInfo, layout: Layout, compression: str, format_version: int = FORMAT_VERSION
) -> None:
    """`format_version`: the store's, so a feature added to an older store is named as its others are."""
    shape = (layout.num_samples, *info.shape)
    dims = feature_dims(info.name, len(shape), format_version)
    group.create_array(
        info.name,
        shape=shape,
        dtype=info.dtype,
        chunks=(layout.chunk_rows[info.name], *info.shape),
        shards=(layout.shard_rows, *info.shape),
        compressors=compressors(compression),
        fill_value=0.0,
        dimension_names=dims,
        attributes=info.to_attrs(),
    )


def create_progress(group: zarr.Group, names: Sequence[str], num_units: int) -> None:
    width = max(1, len(names))
    group.create_array(
        "done",
        shape=(num_units, len(names)),
        dtype="uint8",
        chunks=(1, width),
        compressors=_SMALL_CODECS,
        fill_value=0,
        dimension_names=("unit", "feature"),
        attributes={
            "features": list(names),
            "meaning": "1 = this (unit, feature) was fully written; markers come after the data",
        },
    )
    group.create_array(
        "stats",
        shape=(num_units, len(names), len(STATS_FIELDS)),
        dtype="float64",
        chunks=(1, width, len(STATS_FIELDS)),
        compressors=_SMALL_CODECS,
        fill_value=0.0,
        dimension_names=("unit", "feature", "stat"),
        attributes={"fields": list(STATS_FIELDS)},
    )


def create_samples(group: zarr.Group, ids: np.ndarray, labels: np.ndarray, shard_rows: int) -> None:
    n = int(len(ids))
    group.create_array(
        "label",
        data=labels,
        chunks=(min(n, _SAMPLE_CHUNK),),
        compressors=_SMALL_CODECS,
        dimension_names=("sample",),
        attributes={"unknown": -1},
    )
    ids_arr = group.create_array(
        "id",
        shape=(n,),
        dtype=str,
        chunks=(min(n, _SAMPLE_CHUNK),),
        compressors=_SMALL_CODECS,
        dimension_names=("sample",),
    )
    ids_arr[:] = ids
    group.create_array(
        "valid",
        shape=(n,),
        dtype=bool,
        chunks=(shard_rows,),
        compressors=_SMALL_CODECS,
        fill_value=False,
        dimension_names=("sample",),
        attributes={"meaning": "False: the image failed (rows zero) or its unit is not written yet"},
    )
    group.create_array(
        "error",
        shape=(n,),
        dtype=str,
        chunks=(shard_rows,),
        compressors=_SMALL_CODECS,
        fill_value="",
        dimension_names=("sample",),
    )


def create_splits(group: zarr.Group, masks: Mapping[str, np.ndarray]) -> None:
    for name, mask in masks.items():
        group.create_array(
            name,
            data=mask,
            chunks=(min(len(mask), _SAMPLE_CHUNK),),
            compressors=_SMALL_CODECS,
            dimension_names=("sample",),
        )


# ---------------------------------------------------------------------------------------------
# Inspecting stored shards (verify)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardState:
    """What one stored shard of a feature array holds, read from its bytes without decoding data.

    `present` is False when the object is absent (it reads as zeros); `problem` names a shard that
    cannot be decoded at all (truncated, or an index that fails its checksum); `empty_chunks` lists the
    inner chunks (0-based within the shard) that the index records as never written.
    """

    key: str
    present: bool
    nbytes: int = 0
    problem: str = ""
    empty_chunks: tuple[int, ...] = ()
    chunk_rows: int = 0


def shard_state(arr: zarr.Array, shard: int) -> ShardState:
    """Check shard `shard` (along the sample axis) of a sharded feature array: its size and its index.

    Only the index is fetched (a ranged request), not the data: verify decodes the data separately, and
    a remote shard of 256 MiB should cross the network once.
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    codec = _sharding(arr)
    coords = (shard,) + (0,) * (arr.ndim - 1)
    key = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
    store = arr.store_path.store
    if not sync(store.exists(key)):
        return ShardState(key, present=False)
    nbytes = int(sync(store.getsize(key)))
    if codec is None:
        return ShardState(key, present=True, nbytes=nbytes)
    chunk_rows = int(codec.chunk_shape[0])
    per_shard = tuple(s // c for s, c in zip(arr.shards, codec.chunk_shape))
    index_size = codec._shard_index_size(per_shard)
    if nbytes < index_size:
        return ShardState(key, True, nbytes, f"truncated: {nbytes} bytes, less than its index", (), chunk_rows)
    at_start = str(getattr(codec.index_location, "value", codec.index_location)) == "start"
    lo = 0 if at_start else nbytes - index_size
    index_bytes = sync(
        store.get(key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(lo, lo + index_size))
    )
    try:
        index = sync(codec._decode_shard_index(index_bytes, per_shard))
    except Exception as exc:  # a checksum mismatch in the index: the shard was truncated or overwritten
        return ShardState(key, True, nbytes, f"unreadable index ({exc}); truncated or corrupt", (), chunk_rows)
    table = index.offsets_and_lengths.reshape(-1, 2)
    empty = table[:, 0] == np.iinfo(np.uint64).max
    data_lo, data_hi = (index_size, nbytes) if at_start else (0, nbytes - index_size)
    ends = table[~empty, 0].astype(np.int64) + table[~empty, 1].astype(np.int64)
    starts = table[~empty, 0].astype(np.int64)
    if ends.size and (starts.min() < data_lo or ends.max() > data_hi):
        return ShardState(
            key, True, nbytes, f"truncated: chunks reach byte {int(ends.max())} of {data_hi}", (), chunk_rows
        )
    return ShardState(key, True, nbytes, "", tuple(int(i) for i in np.flatnonzero(empty)), chunk_rows)


# ---------------------------------------------------------------------------------------------
# Fast reads: inner chunks decoded straight into the caller's buffer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DirectCodecs:
    """The inner-chunk codec chain of a feature array, when it is one the fast path decodes itself:
    little-endian bytes, then blosc, zstd or nothing, then optionally crc32c."""

    compressor: str  # "blosc" | "zstd" | "none"
    checksum: bool
    chunk_rows: int
    chunks_per_shard: int
    index_size: int
    index_at_start: bool


def direct_codecs(arr: zarr.Array) -> DirectCodecs | None:
    """How to decode `arr`'s inner chunks without zarr's per-chunk machinery; None: let zarr do it."""
    from zarr.codecs import BytesCodec

    codec = _sharding(arr)
    if codec is None or not np.dtype(arr.dtype).isnative or np.dtype(arr.dtype).kind != "f":
        return None
    if any(s != c for s, c in zip(codec.chunk_shape[1:], arr.shape[1:])):
        return None  # chunked along samples only, as this layout writes them
    chain = list(codec.codecs)
    if not chain or not isinstance(chain[0], BytesCodec):
        return None
    if sys.byteorder != "little" or str(getattr(chain[0].endian, "value", chain[0].endian)) != "little":
        return None
    rest = chain[1:]
    checksum = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if checksum:
        rest = rest[:-1]
    if not rest:
        compressor = "none"
    elif len(rest) == 1 and isinstance(rest[0], BloscCodec):
        compressor = "blosc"
    elif len(rest) == 1 and isinstance(rest[0], ZstdCodec):
        compressor = "zstd"
    else:
        return None
    per_shard = int(arr.shards[0]) // int(codec.chunk_shape[0])
    index_size = codec._shard_index_size((per_shard,) + (1,) * (arr.ndim - 1))
    at_start = str(getattr(codec.index_location, "value", codec.index_location)) == "start"
    return DirectCodecs(compressor, checksum, int(codec.chunk_shape[0]), per_shard, index_size, at_start)


class ChecksumError(ValueError):
    """A stored chunk does not match its crc32c: the bytes changed after they were written."""


def shard_index(arr: zarr.Array, codecs: DirectCodecs, shard: int) -> np.ndarray | None:
    """(chunks_per_shard, 2) offsets and lengths of a shard's inner chunks; None if the shard is absent."""
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
    request = RangeByteRequest(0, codecs.index_size) if codecs.index_at_start else SuffixByteRequest(codecs.index_size)
    raw = sync(arr.store_path.store.get(key, prototype=default_buffer_prototype(), byte_range=request))
    if raw is None:
        return None
    codec = _sharding(arr)
    index = sync(codec._decode_shard_index(raw, (codecs.chunks_per_shard,) + (1,) * (arr.ndim - 1)))
    return index.offsets_and_lengths.reshape(-1, 2)


def read_shard_rows_into(
    arr: zarr.Array, codecs: DirectCodecs, index: np.ndarray | None, lo: int, hi: int, out: np.ndarray
) -> None:
    """Decode rows [lo, hi) of one shard into `out` (shape (hi-lo, ...), the stored dtype, C order).

    One ranged request fetches every inner chunk the rows touch; each chunk is checked and decompressed
    in place into `out`, or into a chunk-sized scratch only where the range starts or ends mid-chunk.
    """
    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    shard_rows = int(arr.shards[0])
    shard = lo // shard_rows
    base = shard * shard_rows
    c_first = (lo - base) // codecs.chunk_rows
    c_last = (hi - 1 - base) // codecs.chunk_rows
    if index is None:
        out[...] = arr.metadata.fill_value
        return
    table = index[c_first : c_last + 1]
    empty = table[:, 0] == np.iinfo(np.uint64).max
    payload = None
    if not empty.all():
        start = int(table[~empty, 0].min())
        stop = int((table[~empty, 0] + table[~empty, 1]).max())
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"
        payload = _read_local(arr.store_path.store, key, start, stop)
        if payload is None:
            raw = sync(
                arr.store_path.store.get(
                    key, prototype=default_buffer_prototype(), byte_range=RangeByteRequest(start, stop)
                )
            )
            payload = None if raw is None else raw.as_numpy_array()
        if payload is None or len(payload) != stop - start:
            raise StoreError(f"{arr.path}: shard {shard} is shorter than its index says (truncated)")
    row_bytes = out[0].nbytes if len(out) else 0
    flat = out.reshape(-1).view(np.uint8)
    for i, (offset, length) in enumerate(table.tolist()):
        chunk = c_first + i
        c_lo = base + chunk * codecs.chunk_rows
        c_hi = min(c_lo + codecs.chunk_rows, base + shard_rows, arr.shape[0])
        r_lo, r_hi = max(lo, c_lo), min(hi, c_hi)
        if empty[i]:
            out[r_lo - lo : r_hi - lo] = arr.metadata.fill_value
            continue
        data = payload[offset - start : offset - start + length]
        if codecs.checksum:
            data = _checked(data, arr.path, chunk + shard * codecs.chunks_per_shard)
        whole = r_lo == c_lo and r_hi == c_hi and c_hi - c_lo == codecs.chunk_rows
        if whole:
            _decompress(codecs.compressor, data, flat[(r_lo - lo) * row_bytes : (r_hi - lo) * row_bytes])
        else:  # the chunk sticks out of the requested rows (or is the store's short last chunk)
            scratch = np.empty((codecs.chunk_rows, *out.shape[1:]), dtype=out.dtype)
            _decompress(codecs.compressor, data, scratch.reshape(-1).view(np.uint8))
            out[r_lo - lo : r_hi - lo] = scratch[r_lo - c_lo : r_hi - c_lo]


_READ_BUFFER = threading.local()


def _read_local(store: Any, key: str, start: int, stop: int) -> np.ndarray | None:
    """Bytes [start, stop) of a local store's object, read into this thread's reused buffer (valid until
    its next call); None for other stores. zarr's own ranged get hops through its event loop and allocates
    a fresh buffer per request: measured, a third of a full read's time on one core went there."""
    from zarr.storage import LocalStore

    if not isinstance(store, LocalStore) or not hasattr(os, "preadv"):  # preadv: POSIX systems only
        return None
    buf = getattr(_READ_BUFFER, "buf", None)
    if buf is None or buf.nbytes < stop - start:
        buf = _READ_BUFFER.buf = np.empty(stop - start, dtype=np.uint8)
    try:
        fd = os.open(os.path.join(store.root, key), os.O_RDONLY)
    except FileNotFoundError:
        return buf[:0]
    try:
        got = os.preadv(fd, [buf[: stop - start]], start)
    finally:
        os.close(fd)
    return buf[:got]


def _checked(data: np.ndarray, path: str, chunk: int) -> np.ndarray:
    import google_crc32c

    body = data[:-4]
    if np.uint32(google_crc32c.value(body)).tobytes() != bytes(data[-4:]):
        raise ChecksumError(f"{path}: inner chunk {chunk} fails its crc32c checksum (the stored bytes changed)")
    return body


def _decompress(compressor: str, data: np.ndarray, dest: np.ndarray) -> None:
    if compressor == "blosc":
        from numcodecs import blosc

        blosc.decompress(data, dest)
    elif compressor == "zstd":
        from numcodecs import zstd

        zstd.decompress(data, dest)
    else:
        dest[:] = data
