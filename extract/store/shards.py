"""A shard's bytes, read without zarr's codec pipeline: its index, what it holds, and rows decoded from it.

`layout` decides how a store is laid out; this module reads what that layout put in a shard object: the
index of its inner chunks (at the start or the end), each chunk's crc32c, and blosc/zstd payloads decoded
straight into the caller's buffer. `verify` uses `shard_state`; the reader uses `read_shard_blocks` and
`read_shard_rows_into`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

# zarr's bridge from its async stores to synchronous code: the one name of `zarr.core` the store uses.
# Checked on zarr 3.1.0 and 3.1.6 (tests/test_store_verify.py::test_the_one_zarr_internal_the_store_uses).
from zarr.core.sync import sync

from extract.store.layout import StoreError, shard_shape, sharding_codec

# ---------------------------------------------------------------------------------------------
# Stored objects, through the array's zarr store
# ---------------------------------------------------------------------------------------------


def shard_key(arr: zarr.Array, shard: int) -> str:
    """The store key of shard `shard` along the sample axis (every other axis is one shard)."""
    return f"{arr.path}/{arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))}"


def codec_value(x: Any) -> str:
    """A codec setting as its metadata spells it (zarr gives enums, or plain strings)."""
    return str(getattr(x, "value", x))


def object_size(arr: zarr.Array, key: str) -> int | None:
    """Bytes of the stored object `key` of `arr`'s store; None when it is absent."""
    store = arr.store_path.store
    return int(sync(store.getsize(key))) if sync(store.exists(key)) else None


def object_bytes(arr: zarr.Array, key: str, byte_range: ByteRequest | None = None) -> np.ndarray | None:
    """The stored object `key` (or `byte_range` of it) as uint8; None when it is absent."""
    raw = sync(arr.store_path.store.get(key, prototype=default_buffer_prototype(), byte_range=byte_range))
    return None if raw is None else raw.as_numpy_array()


# ---------------------------------------------------------------------------------------------
# The shard index, read from the array's public codec metadata
# ---------------------------------------------------------------------------------------------

EMPTY_CHUNK = np.iinfo(np.uint64).max  # the offset (and length) the index records for an inner chunk never written


class ChecksumError(StoreError, ValueError):
    """A stored chunk does not match its crc32c: the bytes changed after they were written."""


@dataclasses.dataclass(frozen=True)
class ShardIndexFormat:
    """How a shard records its inner chunks: an (offset, length) uint64 pair per chunk, encoded by the
    sharding codec's `index_codecs` (bytes, then optionally crc32c: 16 bytes a chunk + 4), at the start
    or the end of the shard object. Read from the array's metadata, as the Zarr v3 sharding spec defines it."""

    chunks: int  # inner chunks per shard
    byteorder: str  # "<" or ">"
    checksum: bool
    at_start: bool

    @property
    def nbytes(self) -> int:
        return 16 * self.chunks + (4 if self.checksum else 0)

    def decode(self, raw: np.ndarray, where: str) -> np.ndarray:
        """(chunks, 2) uint64 offsets and lengths from the index's bytes; ChecksumError names `where`."""
        raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
        if raw.size != self.nbytes:
            raise ChecksumError(f"{where}: index of {raw.size} bytes, expected {self.nbytes} (truncated)")
        if self.checksum:
            raw = _checked(raw, where)
        return raw.view(f"{self.byteorder}u8").astype(np.uint64).reshape(self.chunks, 2)

    def encode(self, table: np.ndarray) -> bytes:
        """The index's bytes for a (chunks, 2) table of offsets and lengths."""
        raw = np.ascontiguousarray(table, dtype=f"{self.byteorder}u8").tobytes()
        return raw + checksum_bytes(raw) if self.checksum else raw


def shard_index_format(arr: zarr.Array) -> ShardIndexFormat:
    """The index format of `arr`'s shards; StoreError for index codecs other than bytes [+ crc32c]."""
    codec = sharding_codec(arr)
    if codec is None:
        raise StoreError(f"{arr.path}: not a sharded array")
    chain = list(codec.index_codecs)
    checksum = len(chain) == 2 and isinstance(chain[1], Crc32cCodec)
    if not chain or not isinstance(chain[0], BytesCodec) or len(chain) > 1 + checksum:
        raise StoreError(f"{arr.path}: shard index codecs {chain} are not read here (bytes, then optionally crc32c)")
    endian = codec_value(chain[0].endian)
    chunks = int(np.prod([s // c for s, c in zip(shard_shape(arr), codec.chunk_shape)], dtype=np.int64))
    at_start = codec_value(codec.index_location) == "start"
    return ShardIndexFormat(chunks, "<" if endian == "little" else ">", checksum, at_start)


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
    codec = sharding_codec(arr)
    key = shard_key(arr, shard)
    nbytes = object_size(arr, key)
    if nbytes is None:
        return ShardState(key, present=False)
    if codec is None:
        return ShardState(key, present=True, nbytes=nbytes)
    chunk_rows = int(codec.chunk_shape[0])
    index_format = shard_index_format(arr)
    index_size = index_format.nbytes
    if nbytes < index_size:
        return ShardState(key, True, nbytes, f"truncated: {nbytes} bytes, less than its index", (), chunk_rows)
    lo = 0 if index_format.at_start else nbytes - index_size
    index_bytes = object_bytes(arr, key, RangeByteRequest(lo, lo + index_size))
    if index_bytes is None:
        return ShardState(key, present=False)
    try:
        table = index_format.decode(index_bytes, f"{key} (index)")
    except ChecksumError as exc:  # the shard was truncated or overwritten
        return ShardState(key, True, nbytes, f"unreadable index ({exc}); truncated or corrupt", (), chunk_rows)
    at_start = index_format.at_start
    empty = table[:, 0] == EMPTY_CHUNK
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
    index: ShardIndexFormat

    @property
    def chunks_per_shard(self) -> int:
        return self.index.chunks


def direct_codecs(arr: zarr.Array) -> DirectCodecs | None:
    """How to decode `arr`'s inner chunks without zarr's per-chunk machinery; None: let zarr do it."""
    codec = sharding_codec(arr)
    if codec is None or not np.dtype(arr.dtype).isnative or np.dtype(arr.dtype).kind != "f":
        return None
    if any(s != c for s, c in zip(codec.chunk_shape[1:], arr.shape[1:])):
        return None  # chunked along samples only, as this layout writes them
    chain = list(codec.codecs)
    if not chain or not isinstance(chain[0], BytesCodec):
        return None
    if sys.byteorder != "little" or codec_value(chain[0].endian) != "little":
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
    index = shard_index_format(arr)
    return DirectCodecs(compressor, checksum, int(codec.chunk_shape[0]), index)


def shard_index(arr: zarr.Array, codecs: DirectCodecs, shard: int) -> np.ndarray | None:
    """(chunks_per_shard, 2) offsets and lengths of a shard's inner chunks; None if the shard is absent."""
    size = codecs.index.nbytes
    request = RangeByteRequest(0, size) if codecs.index.at_start else SuffixByteRequest(size)
    raw = object_bytes(arr, shard_key(arr, shard), request)
    if raw is None:
        return None
    rows = int(shard_shape(arr)[0])
    last = min(arr.shape[0], (shard + 1) * rows) - 1
    return codecs.index.decode(
        raw, f"{arr.path}: the index of shard {shard_key(arr, shard)} (rows {shard * rows}-{last})"
    )


def read_shard_rows_into(
    arr: zarr.Array, codecs: DirectCodecs, index: np.ndarray | None, lo: int, hi: int, out: np.ndarray
) -> None:
    """Decode rows [lo, hi) of one shard into `out` (shape (hi-lo, ...), the stored dtype, C order)."""
    for start, block in read_shard_blocks(arr, codecs, index, lo, hi, out):
        if not np.may_share_memory(block, out):
            out[start : start + len(block)] = block


def read_shard_blocks(
    arr: zarr.Array, codecs: DirectCodecs, index: np.ndarray | None, lo: int, hi: int, scratch: np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """Rows [lo, hi) of one shard as blocks of the stored dtype: (first row - lo, its rows), in row order.

    One ranged request fetches every inner chunk the rows touch, and each chunk's crc32c is checked. A chunk
    whose payload holds its values as they are (no compressor, or a blosc frame stored uncompressed: float16
    activations rarely compress) is served as a view of the fetched bytes, valid until this thread's next
    read; other chunks are decompressed into `scratch` (shape (hi-lo, ...)) at their rows' place.
    """
    shard_rows = int(shard_shape(arr)[0])
    shard = lo // shard_rows
    base = shard * shard_rows
    c_first = (lo - base) // codecs.chunk_rows
    c_last = (hi - 1 - base) // codecs.chunk_rows
    if index is None:
        scratch[...] = arr.metadata.fill_value
        return [(0, scratch)]
    table = index[c_first : c_last + 1]
    empty = table[:, 0] == EMPTY_CHUNK
    payload = np.empty(0, dtype=np.uint8)  # stays empty when every chunk the rows touch is empty
    start = 0
    if not empty.all():
        start = int(table[~empty, 0].min())
        stop = int((table[~empty, 0] + table[~empty, 1]).max())
        key = shard_key(arr, shard)
        fetched = _read_local(arr.store_path.store, key, start, stop)
        if fetched is None:
            fetched = object_bytes(arr, key, RangeByteRequest(start, stop))
        if fetched is None or len(fetched) != stop - start:
            raise StoreError(
                f"{arr.path}: shard {shard_key(arr, shard)} (rows {lo}-{hi - 1} read) is shorter than its index "
                f"says (truncated)"
            )
        payload = fetched
    row_shape = scratch.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * scratch.dtype.itemsize
    flat = scratch.reshape(-1).view(np.uint8)
    blocks: list[tuple[int, np.ndarray]] = []
    for i, (offset, length) in enumerate(table.tolist()):
        chunk = c_first + i
        c_lo = base + chunk * codecs.chunk_rows
        c_hi = min(c_lo + codecs.chunk_rows, base + shard_rows, arr.shape[0])
        r_lo, r_hi = max(lo, c_lo), min(hi, c_hi)
        here = scratch[r_lo - lo : r_hi - lo]
        blocks.append((r_lo - lo, here))
        if empty[i]:
            here[...] = arr.metadata.fill_value
            continue
        data = payload[offset - start : offset - start + length]
        if codecs.checksum:
            data = _checked(data, f"{arr.path}: inner chunk {chunk} of shard {shard} (rows {c_lo}-{c_hi - 1})")
        # Inner chunks are stored whole: the store's last one is padded to chunk_rows.
        values = _stored_values(codecs.compressor, data, codecs.chunk_rows * row_bytes, scratch.dtype)
        if values is not None:
            rows = values.view(scratch.dtype).reshape(codecs.chunk_rows, *row_shape)
            blocks[-1] = (r_lo - lo, rows[r_lo - c_lo : r_hi - c_lo])
        elif r_lo == c_lo and r_hi == c_hi and c_hi - c_lo == codecs.chunk_rows:
            _decompress(codecs.compressor, data, flat[(r_lo - lo) * row_bytes : (r_hi - lo) * row_bytes])
        else:  # the chunk sticks out of the requested rows (or is the store's short last chunk)
            whole = np.empty((codecs.chunk_rows, *row_shape), dtype=scratch.dtype)
            _decompress(codecs.compressor, data, whole.reshape(-1).view(np.uint8))
            here[...] = whole[r_lo - c_lo : r_hi - c_lo]
    return blocks


# c-blosc's frame header: 16 bytes, flags at byte 2, uncompressed and frame sizes at bytes 4 and 12.
BLOSC_HEADER = 16
BLOSC_MEMCPYED = 0x02


def _stored_values(compressor: str, data: np.ndarray, nbytes: int, dtype: np.dtype) -> np.ndarray | None:
    """The payload's bytes of values when it holds them as they are, aligned for `dtype`; else None."""
    if compressor == "none":
        values = data
    elif (
        compressor == "blosc"
        and len(data) == BLOSC_HEADER + nbytes
        and data[0] == 2  # c-blosc 1's format version
        and data[2] & BLOSC_MEMCPYED
        and int.from_bytes(data[4:8].tobytes(), "little") == nbytes
        and int.from_bytes(data[12:16].tobytes(), "little") == len(data)
    ):
        values = data[BLOSC_HEADER:]
    else:
        return None
    # torch casts from writable memory only (a remote store's bytes are not): those are decompressed instead.
    if len(values) != nbytes or values.ctypes.data % dtype.itemsize or not values.flags.writeable:
        return None
    return values


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
        got = os.preadv(fd, [buf[: stop - start].data], start)
    finally:
        os.close(fd)
    return buf[:got]


def checksum_bytes(data: Any) -> bytes:
    """The crc32c of `data` as Zarr's crc32c codec appends it (little-endian uint32)."""
    import google_crc32c

    return np.array(google_crc32c.value(data), "<u4").tobytes()


def _checked(data: np.ndarray, where: str) -> np.ndarray:
    """`data` without its trailing crc32c (little-endian, as Zarr's crc32c codec writes it), once it matches."""
    body = data[:-4]
    if len(data) < 4 or checksum_bytes(body) != bytes(data[-4:]):
        raise ChecksumError(f"{where} fails its crc32c checksum (the stored bytes changed)")
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
