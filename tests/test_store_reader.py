"""The fast reader: parallel decode into float32 for every row selection, codec and edge of the layout."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from extract.store import FORMAT_VERSION, open_store, save_features
from extract.store.memory import allocation

N = 45  # 3 shards of 16 (the last short), 4-row chunks: every kind of edge


@pytest.fixture(params=["blosc-lz4", "zstd", "none"])
def stored(tmp_path, request):
    rng = np.random.default_rng(3)
    feats = {
        "t090_b24_avg2": rng.standard_normal((N, 6, 2, 2)).astype(np.float16),
        "t150_b19_tok4": rng.standard_normal((N, 3, 4, 4)).astype(np.float32),
    }
    path = tmp_path / "r.zarr"
    save_features(
        path,
        feats,
        np.arange(N) % 3,
        {"train": np.arange(30), "test": np.arange(30, N)},
        shard_rows=16,
        chunk_rows=4,
        compression=request.param,
    )
    return path, feats


@pytest.mark.parametrize("workers", [1, 3])
def test_every_selection_equals_plain_zarr(stored, workers):
    path, feats = stored
    fs = open_store(path, workers=workers)
    rng = np.random.default_rng(0)
    for name, data in feats.items():
        want = data.astype(np.float32)
        np.testing.assert_array_equal(fs.read(name), want)
        plain = np.asarray(zarr.open_array(str(path / "features" / name), mode="r")[:], dtype=np.float32)
        np.testing.assert_array_equal(plain, want)
        for rows in (slice(3, 41), slice(15, 17), slice(44, 45), slice(0, 0), slice(40, 2, -3)):
            np.testing.assert_array_equal(fs.read(name, rows), want[rows])
        for idx in (rng.permutation(N), np.array([44, 0, 0, 17, 16, 15, -1]), rng.choice(N, 9), np.array([], int)):
            np.testing.assert_array_equal(fs.read(name, idx), want[idx])
        mask = rng.random(N) > 0.5
        np.testing.assert_array_equal(fs.read(name, mask), want[mask])
        out = np.full((N, *data.shape[1:]), np.nan, np.float32)
        assert fs.read(name, out=out) is out
        np.testing.assert_array_equal(out, want)
        with pytest.raises(ValueError, match="out must be"):
            fs.read(name, out=np.empty((N, *data.shape[1:]), np.float16))


@pytest.mark.parametrize("workers", [1, 3])
def test_each_sees_every_row_once_in_blocks_and_its_changes_land_in_the_result(stored, workers):
    """`each` runs in the decode threads on blocks that partition the rows, before they land in the result:
    a row-wise step (here a standardisation) gives what applying it to the plain read gives, in every path."""
    path, feats = stored
    fs = open_store(path, workers=workers)
    rng = np.random.default_rng(1)
    mean, scale = np.float32(0.25), np.float32(3.0)
    for name, data in feats.items():
        want = (data.astype(np.float32) - mean) / scale
        selections = (None, slice(3, 41), slice(40, 2, -3), rng.permutation(N), np.array([44, 0, 0, 17, 16, 15, -1]))
        for rows in selections:
            seen = []

            def standardise(block, seen=seen, shape=data.shape[1:]):
                assert block.dtype == np.float32 and block.shape[1:] == shape
                seen.append(len(block))
                block -= mean
                block /= scale

            got = fs.read(name, rows, each=standardise)
            expect = want if rows is None else want[rows]
            np.testing.assert_array_equal(got, expect)
            assert sum(seen) == len(expect), (rows, seen)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iter_batches_in_order_with_read_ahead(stored, prefetch):
    path, feats = stored
    fs = open_store(path)
    name, data = "t090_b24_avg2", feats["t090_b24_avg2"].astype(np.float32)
    batches = list(fs.iter_batches(name, 7, prefetch=prefetch))
    assert [len(b) for b in batches] == [7] * 6 + [3]
    np.testing.assert_array_equal(np.concatenate(batches), data)  # earlier batches stay valid
    order = np.random.default_rng(1).permutation(N)
    got = np.concatenate(list(fs.iter_batches(name, 10, order, prefetch=prefetch)))
    np.testing.assert_array_equal(got, data[order])
    np.testing.assert_array_equal(np.concatenate(list(fs.iter_batches(name, 4, slice(5, 30)))), data[5:30])


def test_to_xarray_views(stored):
    xr = pytest.importorskip("xarray")
    path, feats = stored
    fs = open_store(path)
    for name, data in feats.items():
        da = fs.to_xarray(name)
        assert da.dims == ("sample", "channel", "y", "x") and da.name == name
        assert da.attrs["t"] == int(name[1:4]) and da.attrs["storage_dtype"] == str(data.dtype)
        np.testing.assert_array_equal(da.coords["label"].values, np.arange(N) % 3)
        assert da.coords["split"].values[0] == "train" and da.coords["split"].values[-1] == "test"
        assert da.coords["valid"].values.all() and da.coords["id"].values[2] == "2"
        assert da.chunks is not None  # lazy: nothing read yet
        np.testing.assert_array_equal(da.isel(sample=slice(10, 20)).values, data[10:20])
    tree = fs.to_xarray()
    assert isinstance(tree, xr.DataTree)
    assert sorted(tree.children) == sorted(feats)
    np.testing.assert_array_equal(tree["t150_b19_tok4"]["t150_b19_tok4"].values, feats["t150_b19_tok4"])


def test_plain_xarray_and_zarr_open_what_the_readme_says(stored):
    """README's recipes for teams without diffbank: every feature in one Dataset, samples as coordinates."""
    xr = pytest.importorskip("xarray")
    path, feats = stored
    fs = open_store(path)
    tree = xr.open_datatree(str(path), engine="zarr")
    assert sorted(tree.children) == ["_progress", "features", "samples", "splits"]
    ds = tree["features"].to_dataset().assign_coords(tree["samples"].to_dataset().variables)
    assert sorted(ds.data_vars) == sorted(feats)
    for name, data in feats.items():
        x = ds[name]
        assert x.dims == ("sample", f"{name}_channel", f"{name}_y", f"{name}_x")
        assert x.dtype == data.dtype and x.attrs["t"] == int(name[1:4])
        np.testing.assert_array_equal(x.values.astype(np.float32), fs.read(name))
    np.testing.assert_array_equal(ds["label"].values, fs.labels)
    assert ds["valid"].values.all() and str(ds["id"].values[2]) == "2"
    assert ds["t090_b24_avg2"].where(ds["valid"], drop=True).shape == feats["t090_b24_avg2"].shape
    assert int(tree["splits"]["train"].sum()) == 30
    assert tree.attrs["format_version"] == FORMAT_VERSION >= 3 and tree.attrs["fingerprint"] == fs.fingerprint
    one = xr.open_zarr(str(path), group="features")  # the features group alone
    np.testing.assert_array_equal(one["t150_b19_tok4"].values, feats["t150_b19_tok4"])
    root = zarr.open_group(str(path), mode="r")
    name = "t090_b24_avg2"
    np.testing.assert_array_equal(root[f"features/{name}"][:10], feats[name][:10])
    assert root.attrs["features"] == fs.feature_names(None)


def test_zero_rows_stay_zero_under_xarray(tmp_path):
    """The arrays' fill value is 0.0: xarray must not mask it as missing (a failed image's row is zeros)."""
    xr = pytest.importorskip("xarray")
    data = np.ones((6, 2, 1, 1), np.float16)
    data[2] = 0
    save_features(tmp_path / "z.zarr", {"t010_b01_avg1": data}, np.zeros(6, int), {"train": np.arange(6)})
    got = xr.open_zarr(str(tmp_path / "z.zarr"), group="features")["t010_b01_avg1"].values
    np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_iter_batches_reuses_blocks_only_when_no_batch_of_them_is_held(stored, prefetch, monkeypatch):
    """Blocks are recycled (no fresh memory per block), yet a batch the caller keeps never changes."""
    import extract.store.reader as reader

    monkeypatch.setattr(reader, "BLOCK_BYTES", 8 * 6 * 2 * 2 * 4)  # 8-row blocks of t090_b24_avg2
    path, feats = stored
    fs = open_store(path)
    name, data = "t090_b24_avg2", feats["t090_b24_avg2"].astype(np.float32)
    for rows in (None, np.random.default_rng(2).permutation(N)):
        want = data if rows is None else data[rows]
        buffers, kept, got = set(), [], []
        for i, batch in enumerate(fs.iter_batches(name, 4, rows, prefetch=prefetch)):
            buffers.add(batch.base.__array_interface__["data"][0])
            got.append(batch.copy())
            if i % 5 == 0:
                kept.append((i, batch))  # held to the end: its block must never be reused
        np.testing.assert_array_equal(np.concatenate(got), want)
        for i, batch in kept:
            np.testing.assert_array_equal(batch, want[4 * i : 4 * i + 4])
        assert len(buffers) < len(got) // 2, (len(buffers), len(got))  # recycled, not one per block


def test_read_reuses_the_memory_of_dropped_results_and_never_that_of_held_ones(stored):
    """Fresh memory costs page faults: a result the caller dropped lends its memory to the next read of a
    similar size, a held one never changes, and free memory that does not fit is given back, not hoarded."""
    import gc
    import weakref

    path, feats = stored
    fs = open_store(path)
    big, small = "t090_b24_avg2", "t150_b19_tok4"  # 24 and 48 values a row: big[:40] is 960, small[:8] 384
    want = feats[big].astype(np.float32)
    held = fs.read(big)
    dropped = fs.read(big, slice(0, 40))
    assert not np.shares_memory(held, dropped)
    memory = weakref.ref(allocation(dropped))
    del dropped
    again = fs.read(big, slice(5, 45))  # same size: the dropped result's memory
    assert allocation(again) is memory()
    np.testing.assert_array_equal(again, want[5:45])
    np.testing.assert_array_equal(held, want)  # read twice since, unchanged
    del again
    tiny = fs.read(small, slice(0, 8))  # under half the free memory: new memory, and the free one is given back
    gc.collect()
    assert memory() is None
    np.testing.assert_array_equal(tiny, feats[small][:8])
    tiny_memory = weakref.ref(allocation(tiny))
    del tiny
    fs.release_memory()
    assert tiny_memory() is None


def test_a_truncated_shard_fails_to_read_with_a_clear_error(stored):
    path, _ = stored
    shard = path / "features" / "t090_b24_avg2" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-40])
    fs = open_store(path)
    with pytest.raises(Exception, match="checksum|truncated|shorter"):
        fs.read("t090_b24_avg2")
    np.testing.assert_array_equal(fs.read("t150_b19_tok4", slice(0, 16)).shape, (16, 3, 4, 4))


def test_bytes_on_disk_counts_every_file_of_the_store(tmp_path):
    """One stat per shard the grid names inside feature folders, a walk elsewhere: the same total as a walk of
    every file, and a file outside the features' grids (here beside the store's groups) still counts."""
    url = tmp_path / "s.zarr"
    x = np.random.default_rng(0).standard_normal((200, 3, 2, 2)).astype(np.float16)
    save_features(
        url,
        {"t010_b01_avg2": x, "t020_b01_avg2": x},
        np.arange(200) % 4,
        {"train": np.arange(200)},
        chunk_rows=16,
        shard_rows=64,
    )
    (url / "notes.txt").write_text("kept beside the store")

    def walked() -> int:
        return sum(p.stat().st_size for p in url.rglob("*") if p.is_file())

    fs = open_store(url)
    assert fs.nbytes_stored() == walked()


@pytest.mark.parametrize("compression", ["blosc-lz4", "none"])
def test_chunks_stored_as_they_are_are_read_from_the_fetched_bytes(tmp_path, compression):
    """Float16 activations rarely compress: blosc then stores a chunk's values as they are, and the reader casts
    them from the bytes it fetched instead of copying them into a scratch first. Chunks that did compress are
    decompressed into the scratch; both give the stored values, and a range cut mid-chunk gives its rows only."""
    from extract.store.shards import direct_codecs, read_shard_blocks, shard_index

    rng = np.random.default_rng(5)
    noise = rng.standard_normal((40, 64, 2, 2)).astype(np.float16)
    flat = np.repeat(np.arange(40, dtype=np.float16), 256).reshape(40, 64, 2, 2)
    path = tmp_path / "s.zarr"
    save_features(
        path,
        {"t010_b01_avg2": noise, "t020_b01_avg2": flat},
        np.arange(40) % 2,
        {"train": np.arange(40)},
        chunk_rows=8,
        shard_rows=32,
        compression=compression,
    )
    fs = open_store(path)
    for name, want, as_stored in (("t010_b01_avg2", noise, True), ("t020_b01_avg2", flat, compression == "none")):
        arr = fs.array(name)
        codecs = direct_codecs(arr)
        index = shard_index(arr, codecs, 0)
        scratch = np.empty((23, 64, 2, 2), np.float16)
        blocks = read_shard_blocks(arr, codecs, index, 5, 28, scratch)
        assert [first for first, _ in blocks] == [0, 3, 11, 19]
        got = np.concatenate([b for _, b in blocks])
        np.testing.assert_array_equal(got, want[5:28])
        inner = [b for first, b in blocks if first in (3, 11)]  # whole chunks
        assert all(np.shares_memory(b, scratch) != as_stored for b in inner)
        idx = rng.permutation(40)[:17]
        np.testing.assert_array_equal(fs.read(name, idx), want[idx].astype(np.float32))


def test_only_blosc_frames_that_hold_their_values_as_they_are_are_used_as_is():
    from numcodecs import blosc

    from extract.store.shards import _stored_values

    raw = np.random.default_rng(0).standard_normal(512).astype(np.float16)
    fetched = np.frombuffer(blosc.compress(raw, b"lz4", 5, blosc.SHUFFLE), np.uint8)  # read-only, as from S3
    assert _stored_values("blosc", fetched, raw.nbytes, np.dtype(np.float16)) is None
    frame = fetched.copy()  # a local read's buffer
    assert frame[2] & 0x02 and len(frame) == 16 + raw.nbytes  # random float16: stored as is
    values = _stored_values("blosc", frame, raw.nbytes, np.dtype(np.float16))
    np.testing.assert_array_equal(values.view(np.float16), raw)
    assert _stored_values("blosc", frame, raw.nbytes + 2, np.dtype(np.float16)) is None  # not the chunk's size
    assert _stored_values("blosc", frame[:-2], raw.nbytes - 2, np.dtype(np.float16)) is None  # frame sizes disagree
    unaligned = np.empty(len(frame) + 1, np.uint8)[1:]
    unaligned[:] = frame
    assert _stored_values("blosc", unaligned, raw.nbytes, np.dtype(np.float16)) is None
    packed = np.frombuffer(blosc.compress(np.zeros(512, np.float16), b"lz4", 5, blosc.SHUFFLE), np.uint8).copy()
    assert _stored_values("blosc", packed, raw.nbytes, np.dtype(np.float16)) is None  # compressed: decoded instead
