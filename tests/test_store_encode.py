"""extract/store/encode.py: the writer's own shard encoder stores exactly the bytes zarr would."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from extract.store import open_store, save_features
from extract.store.encode import shard_encoder, write_rows
from extract.store.layout import every_chunk_written
from extract.store.shards import object_bytes, shard_key

N = 45  # 3 shards of 16 (the last short, its last chunk short too)


@pytest.fixture(params=["blosc-lz4", "zstd", "none"])
def written(tmp_path, request):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((N, 6, 2, 2)).astype(np.float16)
    noise[16:24] = 0  # a chunk of fill values: stored too
    smooth = np.repeat(np.arange(N, dtype=np.float32), 48).reshape(N, 3, 4, 4)  # compresses
    feats = {"t090_b24_avg2": noise, "t150_b19_tok4": smooth}
    path = tmp_path / "s.zarr"
    save_features(
        path,
        feats,
        np.arange(N) % 3,
        {"train": np.arange(N)},
        shard_rows=16,
        chunk_rows=6,
        compression=request.param,
    )
    return path, feats


def stored_shards(arr: zarr.Array) -> list[bytes | None]:
    shards = -(-arr.shape[0] // arr.shards[0])
    out = []
    for shard in range(shards):
        raw = object_bytes(arr, shard_key(arr, shard))
        out.append(None if raw is None else raw.tobytes())
    return out


def test_shards_are_byte_for_byte_what_zarr_writes(written):
    path, feats = written
    fs = open_store(path)
    for name, data in feats.items():
        arr = fs.array(name)
        ours = stored_shards(arr)  # the store's writer encodes shards itself
        with every_chunk_written():
            plain = zarr.open_array(str(path / "features" / name), mode="r+")
            encoder = shard_encoder(plain)
            assert encoder is not None
            assert [encoder.encode(data[lo : lo + 16]) for lo in range(0, N, 16)] == ours
            plain[:] = data  # zarr's own sharding codec
        assert stored_shards(arr) == ours
        np.testing.assert_array_equal(fs.read(name), data.astype(np.float32))


def test_writes_that_do_not_cover_whole_shards_go_through_zarr(written):
    path, feats = written
    fs = open_store(path)
    arr = zarr.open_array(str(path / "features" / "t090_b24_avg2"), mode="r+", config={"write_empty_chunks": True})
    rows = np.full((5, 6, 2, 2), 7, np.float16)
    write_rows(arr, 18, rows, shard_encoder(arr))  # inside shard 1
    want = feats["t090_b24_avg2"].copy()
    want[18:23] = rows
    np.testing.assert_array_equal(fs.read("t090_b24_avg2"), want.astype(np.float32))
    write_rows(arr, 16, want[16:48], shard_encoder(arr))  # shards 1 and 2 (the last, short) whole
    np.testing.assert_array_equal(fs.read("t090_b24_avg2"), want.astype(np.float32))


def test_arrays_that_skip_chunks_of_fill_values_are_left_to_zarr(written):
    path, _ = written
    arr = zarr.open_array(str(path / "features" / "t090_b24_avg2"), mode="r", config={"write_empty_chunks": False})
    assert shard_encoder(arr) is None


def test_the_writer_encodes_its_shards_itself(tmp_path, monkeypatch):
    from extract.store.encode import ShardEncoder

    encoded: list[int] = []
    encode = ShardEncoder.encode
    monkeypatch.setattr(ShardEncoder, "encode", lambda self, rows: encoded.append(len(rows)) or encode(self, rows))
    x = np.random.default_rng(0).standard_normal((N, 6, 2, 2)).astype(np.float16)
    save_features(tmp_path / "s.zarr", {"t090_b24_avg2": x}, np.arange(N) % 3, {"train": np.arange(N)}, shard_rows=16)
    assert encoded == [16, 16, 13]
