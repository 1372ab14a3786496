"""A shard's bytes, read without zarr's codec pipeline: its index, what it holds, and rows decoded from it.

`layout` decides how a store is laid out; this module reads what that layout put in a shard object: the
index of its inner chunks (at the start or the end), each chunk's crc32c, and blosc/zstd payloads decoded
straight into the caller's buffer. `verify` uses `shard_state`; the reader uses `read_shard_rows_into`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from extract.store.layout import StoreError, sharding_codec

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

    codec = sharding_codec(arr)
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

    codec = sharding_codec(arr)
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
    codec = sharding_codec(arr)
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
