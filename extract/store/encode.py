"""Whole shards of a feature array encoded without zarr's per-chunk machinery: the writer's mirror of `decode`.

zarr writes a shard through its event loop with one task per inner chunk, ~15-40 ms a shard whatever its size,
so a store of 1,110 small features wrote in time proportional to their count, not their bytes. A unit's rows
of a feature fill whole shards (units are shards), so the writer encodes them here: each inner chunk through the
array's own codecs (little-endian bytes, then blosc, zstd or nothing, then optionally crc32c), laid out with its
index as the Zarr v3 sharding codec lays them out, and stored with one request. The bytes are zarr's own
(`tests/test_store_encode.py` compares them); any other layout or codec chain is written by zarr.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, ZstdCodec

from extract.store.layout import shard_shape, sharding_codec
from extract.store.shards import (
    EMPTY_CHUNK,
    DirectCodecs,
    checksum_bytes,
    codec_value,
    direct_codecs,
    shard_key,
    sync,
)


@dataclasses.dataclass(frozen=True)
class ShardEncoder:
    """Encodes the rows of one shard of an array into the object zarr would store for them."""

    codecs: DirectCodecs
    compressor: Any  # a numcodecs codec configured as the array's, or None
    shard_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any

    def encode(self, rows: np.ndarray) -> bytes:
        """The stored object of a shard whose rows (every row the array has there) are `rows`."""
        chunk_rows = self.codecs.chunk_rows
        table = np.full((self.codecs.chunks_per_shard, 2), EMPTY_CHUNK, dtype=np.uint64)
        pieces: list[bytes] = []
        offset = self.codecs.index.nbytes if self.codecs.index.at_start else 0
        for i, lo in enumerate(range(0, len(rows), chunk_rows)):
            chunk = rows[lo : lo + chunk_rows]
            if len(chunk) < chunk_rows:  # the array's last chunk is stored whole, padded with the fill value
                padded = np.full((chunk_rows, *self.row_shape), self.fill_value, dtype=self.dtype)
                padded[: len(chunk)] = chunk
                chunk = padded
            data = np.ascontiguousarray(chunk, dtype=self.dtype).reshape(-1).view(np.uint8)
            piece = bytes(data) if self.compressor is None else bytes(self.compressor.encode(data))
            if self.codecs.checksum:
                piece += checksum_bytes(piece)
            table[i] = (offset, len(piece))
            offset += len(piece)
            pieces.append(piece)
        index = self.codecs.index.encode(table)
        return b"".join([index, *pieces] if self.codecs.index.at_start else [*pieces, index])


def shard_encoder(arr: zarr.Array) -> ShardEncoder | None:
    """An encoder for `arr`'s shards, or None when zarr must write them (another layout, codec or config)."""
    codecs = direct_codecs(arr)
    if codecs is None or not arr.config.write_empty_chunks or np.dtype(arr.dtype).byteorder == ">":
        return None
    inner = list(sharding_codec(arr).codecs)
    compressor: Any = None
    if codecs.compressor == "blosc":
        from numcodecs import Blosc

        blosc = next(c for c in inner if isinstance(c, BloscCodec))
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        compressor = Blosc(
            cname=codec_value(blosc.cname),
            clevel=int(blosc.clevel),
            shuffle=shuffle[codec_value(blosc.shuffle)],
            blocksize=int(blosc.blocksize),
            typesize=int(blosc.typesize),
        )
    elif codecs.compressor == "zstd":
        from numcodecs import Zstd

        zstd = next(c for c in inner if isinstance(c, ZstdCodec))
        compressor = Zstd(level=int(zstd.level), checksum=bool(zstd.checksum))
    return ShardEncoder(
        codecs,
        compressor,
        int(shard_shape(arr)[0]),
        tuple(int(s) for s in arr.shape[1:]),
        np.dtype(arr.dtype),
        arr.metadata.fill_value,
    )


def write_rows(arr: zarr.Array, start: int, rows: np.ndarray, encoder: ShardEncoder | None) -> None:
    """arr[start:start + len(rows)] = rows: shard by shard through `encoder` (`shard_encoder(arr)`) where the rows
    fill whole shards (the array's last shard may be short), else through zarr."""
    stop = start + len(rows)
    if (
        encoder is None
        or not len(rows)
        or start % encoder.shard_rows
        or (stop % encoder.shard_rows and stop != arr.shape[0])
    ):
        arr[start:stop] = rows
        return
    store = arr.store_path.store
    for lo in range(start, stop, encoder.shard_rows):
        payload = encoder.encode(rows[lo - start : lo - start + encoder.shard_rows])
        sync(store.set(shard_key(arr, lo // encoder.shard_rows), default_buffer_prototype().buffer.from_bytes(payload)))
