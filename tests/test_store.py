"""The feature store: layout read with plain zarr, reader API, float16 bookkeeping, refusal, export."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import uuid

import numpy as np
import pytest
import zarr

from extract.store import (
    FLOAT16_MAX,
    FeatureInfo,
    FingerprintMismatch,
    NewStore,
    StoreError,
    StoreWriter,
    cast_with_stats,
    create_store,
    export_hdf5,
    info,
    open_store,
    plan_layout,
    save_features,
    verify,
)
from extract.store.layout import array_at, group_at

N = 23


def _features(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "t090_b24_avg2": rng.standard_normal((N, 8, 2, 2)).astype(np.float32),
        "t150_b19_tok4": rng.standard_normal((N, 16, 4, 4)).astype(np.float32),
        "t090_b24_avg2_flip": rng.standard_normal((N, 8, 2, 2)).astype(np.float16),
    }


@pytest.fixture()
def saved(tmp_path):
    rng = np.random.default_rng(0)
    feats = _features(rng)
    labels = rng.integers(0, 3, N)
    splits = {"train": np.arange(0, 15), "test": np.arange(15, N)}
    fs = save_features(
        tmp_path / "s.zarr",
        feats,
        labels,
        splits,
        sample_ids=[f"img/{i}.png" for i in range(N)],
        class_names=["a", "b", "c"],
        info={"t090_b24_avg2": {"module": "output_blocks.4", "resolution": 16}},
        shard_rows=8,
        chunk_rows=4,
    )
    return fs, feats, labels, splits


def test_round_trip_reader_api(saved):
    fs, feats, labels, splits = saved
    assert fs.num_samples == N and fs.shard_rows == 8
    assert fs.feature_names() == ["t090_b24_avg2", "t150_b19_tok4"]
    assert fs.feature_names(view="flip") == ["t090_b24_avg2_flip"]
    assert set(fs.feature_names(None)) == set(feats)
    for name, data in feats.items():
        np.testing.assert_array_equal(fs.read(name), data.astype(np.float32))
        assert fs.read(name).dtype == np.float32
    info = fs.feature_info("t090_b24_avg2")
    assert (info.t, info.block, info.module, info.resolution, info.pool_kind, info.pool_size) == (
        90,
        24,
        "output_blocks.4",
        16,
        "avg",
        2,
    )
    assert info.shape == (8, 2, 2) and info.dtype == "float32" and info.view == "center"
    assert fs.feature_info("t090_b24_avg2_flip").dtype == "float16"
    np.testing.assert_array_equal(fs.labels, labels)
    assert fs.labels.dtype == np.int64
    assert fs.class_names == ["a", "b", "c"]
    assert fs.sample_ids[3] == "img/3.png"
    assert set(fs.splits) == {"train", "test"}
    np.testing.assert_array_equal(fs.splits["test"], splits["test"])
    assert fs.valid.all() and fs.failures == []
    assert fs.is_complete() and fs.is_complete("t150_b19_tok4")
    # rows: unsorted indices with repeats, masks, slices
    rows = np.array([20, 3, 3, 0])
    np.testing.assert_array_equal(fs.read("t150_b19_tok4", rows), feats["t150_b19_tok4"][rows])
    mask = np.zeros(N, bool)
    mask[[1, 22]] = True
    np.testing.assert_array_equal(fs.read("t150_b19_tok4", mask), feats["t150_b19_tok4"][mask])
    batches = list(fs.iter_batches("t090_b24_avg2", 5, rows=splits["train"]))
    assert [len(b) for b in batches] == [5, 5, 5]
    np.testing.assert_array_equal(np.concatenate(batches), feats["t090_b24_avg2"][:15])
    assert sum(len(b) for b in fs.iter_batches("t090_b24_avg2", 7)) == N
    d = fs.to_dask("t150_b19_tok4")
    assert d.chunks[0] == (8, 8, 7)  # shard rows, not inner chunks
    np.testing.assert_allclose(d.sum().compute(), feats["t150_b19_tok4"].sum(), rtol=1e-4)
    with pytest.raises(KeyError, match="t090_b24_avg2"):
        fs.read("t999_b01_avg1")


def test_layout_with_plain_zarr(saved):
    fs, feats, _, _ = saved
    root = zarr.open_group(fs.url, mode="r")
    assert root.attrs["format"] == "diffbank-feature-store"
    for key in (
        "spec",
        "fingerprint",
        "versions",
        "diffbank_version",
        "created",
        "format_version",
        "dataset_manifest_sha256",
    ):
        assert key in root.attrs, key
    assert set(root.attrs["versions"]) >= {"torch", "zarr", "numpy", "dask", "diffbank"}
    arr = root["features/t150_b19_tok4"]
    # format 3: every axis but `sample` is the feature's own, so xarray can hold all features in one Dataset
    assert arr.metadata.dimension_names == ("sample", "t150_b19_tok4_channel", "t150_b19_tok4_y", "t150_b19_tok4_x")
    assert root["samples/label"].metadata.dimension_names == ("sample",)
    assert arr.shape == (N, 16, 4, 4) and arr.shards == (8, 16, 4, 4) and arr.chunks == (4, 16, 4, 4)
    assert arr.attrs["t"] == 150 and arr.attrs["block"] == 19 and arr.attrs["pool_kind"] == "tok"
    assert arr.attrs["stats"]["complete"] is True
    assert "blosc" in type(arr.compressors[0]).__name__.lower()
    np.testing.assert_array_equal(arr[:], feats["t150_b19_tok4"])
    assert root["samples/label"].dtype == np.int64
    assert root["samples/id"][:2].tolist() == ["img/0.png", "img/1.png"]
    assert root["splits/train"][:].sum() == 15
    assert root["_progress/done"][:].all()


def test_float16_overflow_bookkeeping(tmp_path):
    x = np.zeros((10, 2, 1, 1), np.float32)
    x[1, 0] = 70000.0  # overflows float16
    x[2, 1] = -1e6
    x[3, 0] = 100.0
    x[4, 1] = np.nan
    out, stats = cast_with_stats(x, "float16")
    assert out.dtype == np.float16 and np.isinf(out).sum() == 2
    assert stats.tolist() == [1e6, 2, 1, 2]
    fs = save_features(
        tmp_path / "o.zarr",
        {"t010_b02_avg1": x},
        np.zeros(10, int),
        None,
        info={"t010_b02_avg1": {"dtype": "float16"}},
        shard_rows=4,
    )
    s = fs.feature_info("t010_b02_avg1").stats
    assert s["max_abs"] == 1e6 and s["n_inf"] == 2 and s["n_nan"] == 1 and s["n_overflow"] == 2
    assert FLOAT16_MAX == 65504
    rep = verify(fs, full_scan=True)
    assert rep.ok, rep


def _infos() -> list[FeatureInfo]:
    return [FeatureInfo("t010_b02_avg1", 10, 2, "input_blocks.1", 4, 8, "avg", 1, (4, 1, 1), "float32")]


def test_typed_accessors_name_a_node_of_the_wrong_kind(saved):
    fs, _, _, _ = saved
    root = zarr.open_group(fs.url, mode="r")
    assert array_at(root, "samples/label").shape == (N,)
    assert "label" in group_at(root, "samples")
    with pytest.raises(StoreError, match="'samples' in the store is a group"):
        array_at(root, "samples")
    with pytest.raises(StoreError, match="'samples/label' in the store is an array"):
        group_at(root, "samples/label")
    with pytest.raises(KeyError):
        array_at(root, "samples/nothing")


def test_feature_key_of_a_tapped_feature_and_of_a_saved_one():
    tapped = _infos()[0]
    assert tapped.key.name == "t010_b02_avg1"
    untapped = dataclasses.replace(tapped, name="embedding", t=None, block=None, pool_kind=None, pool_size=None)
    with pytest.raises(StoreError, match="'embedding' has no timestep"):
        _ = untapped.key


def test_fingerprint_mismatch_refused_and_resume_reopens(tmp_path):
    url = str(tmp_path / "f.zarr")
    ids, labels, splits = [str(i) for i in range(10)], np.arange(10) % 2, {"train": np.arange(10)}
    new = NewStore(10, _infos(), {"spec": 1}, ids, labels, splits, shard_rows=4)
    w = create_store(url, new)
    w.write_unit(0, {"t010_b02_avg1": np.ones((4, 4, 1, 1), np.float32)})
    again = create_store(url, new)
    assert set(again.pending()) == {1, 2}  # unit 0 is kept
    with pytest.raises(FingerprintMismatch, match="different spec"):
        create_store(url, dataclasses.replace(new, spec={"spec": 2}))
    other = dataclasses.replace(new, sample_ids=[f"x{i}" for i in range(10)])
    with pytest.raises(FingerprintMismatch, match="different dataset"):
        create_store(url, other)
    np.testing.assert_array_equal(open_store(url).read("t010_b02_avg1", slice(0, 4)), 1.0)


def test_not_a_store_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a Zarr store"):
        create_store(tmp_path / "junk", NewStore(2, _infos()))
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing.zarr")


def test_write_unit_validates_before_writing(tmp_path):
    w = create_store(tmp_path / "v.zarr", NewStore(6, _infos(), shard_rows=4))
    with pytest.raises(ValueError, match="expects shape"):
        w.write_unit(1, {"t010_b02_avg1": np.ones((4, 4, 1, 1))})  # unit 1 has 2 rows
    with pytest.raises(KeyError):
        w.write_unit(0, {"nope": np.ones((4, 4, 1, 1))})
    assert set(w.pending()) == {0, 1}
    w.write_unit(
        1,
        {"t010_b02_avg1": np.full((2, 4, 1, 1), 5.0)},
        valid=np.array([True, False]),
        errors=["", "bad.png: truncated"],
    )
    w.finalize()
    fs = open_store(tmp_path / "v.zarr")
    np.testing.assert_array_equal(fs.read("t010_b02_avg1")[4:, 0, 0, 0], [5.0, 0.0])  # invalid row zeroed
    assert fs.failures == [{"index": 5, "id": "5", "reason": "bad.png: truncated"}]
    assert not fs.is_complete()
    rep = verify(fs)
    assert not rep.ok and "not marked done" in str(rep)


def test_worker_reopen_writes_data_only(tmp_path):
    url = tmp_path / "w.zarr"
    create_store(url, NewStore(8, _infos(), shard_rows=4))
    worker = StoreWriter.open(url)
    worker.write_unit(1, {"t010_b02_avg1": np.full((4, 4, 1, 1), 2.0, np.float32)})
    assert list(worker.pending()) == [0]


def test_plan_layout_shares_one_shard_length():
    feats = [
        FeatureInfo(f"f{i}", None, None, None, c, None, None, None, (c, s, s), "float16")
        for i, (c, s) in enumerate([(1024, 16), (1024, 2), (32, 1)])
    ]
    lay = plan_layout(100_000, feats)
    assert all(lay.shard_rows % c == 0 for c in lay.chunk_rows.values())
    assert lay.chunk_rows["f0"] * 1024 * 16 * 16 * 2 <= 4 << 20
    assert lay.chunk_rows["f2"] == 64
    assert 128 << 20 <= lay.shard_rows * 1024 * 16 * 16 * 2 <= 512 << 20
    small = plan_layout(10, feats)
    assert small.shard_rows == 10 and small.num_units == 1


def test_hdf5_export_round_trip(saved, tmp_path):
    h5py = pytest.importorskip("h5py")
    fs, feats, labels, splits = saved
    for compression in ("gzip", "lzf", None):
        out = export_hdf5(fs, tmp_path / f"e-{compression}.h5", compression=compression)
        with h5py.File(out, "r") as h5:
            for name, data in feats.items():
                assert h5[f"features/{name}"].dtype == np.float32
                np.testing.assert_array_equal(h5[f"features/{name}"][:], data.astype(np.float32))
            assert json.loads(h5["features/t090_b24_avg2"].attrs["t"]) == 90
            assert json.loads(h5.attrs["diffbank"])["fingerprint"] == fs.fingerprint
            np.testing.assert_array_equal(h5["samples/label"][:], labels)
            assert h5["splits/test"].dtype == bool and h5["splits/test"].shape == labels.shape
            np.testing.assert_array_equal(np.flatnonzero(h5["splits/test"][:]), splits["test"])
            np.testing.assert_array_equal(h5["splits/train"][:], fs._root["splits/train"][:])
            assert "bool membership mask" in h5["splits"].attrs["meaning"]
            assert h5["samples/id"][0].decode() == "img/0.png"
    with h5py.File(export_hdf5(fs, tmp_path / "k.h5", features=["t090_b24_avg2_flip"], keep_dtype=True), "r") as h5:
        assert list(h5["features"]) == ["t090_b24_avg2_flip"] and h5["features/t090_b24_avg2_flip"].dtype == np.float16


def test_fsspec_memory_store():
    url = f"memory://diffbank-test-{uuid.uuid4().hex}/s.zarr"
    x = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    fs = save_features(url, {"emb": x}, np.array([0, 1, 0, 1, 0, 1]), {"train": [0, 1, 2]}, info={"emb": {"t": 5}})
    again = open_store(url)
    np.testing.assert_array_equal(again.read("emb"), x)
    assert again.feature_info("emb").t == 5 and fs.url == url
    assert verify(again).ok


def test_verify_ok_and_detects_fingerprint_tampering(saved):
    fs, *_ = saved
    assert verify(fs, full_scan=True).ok
    root = zarr.open_group(fs.url, mode="r+", use_consolidated=False)
    root.attrs["fingerprint"] = "0" * 64
    rep = verify(open_store(fs.url))
    assert not rep.ok and "fingerprint" in str(rep)


def test_separate_noise_draws_are_one_feature_of_k_arrays_that_verify_info_and_export_walk(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 2, 2, 2)).astype(np.float32)
    arrays = {"t150_b15_tok8": base, "t150_b15_tok8_d1": base + 1, "t150_b15_tok8_d2": base + 2}
    fs = save_features(
        tmp_path / "k3.zarr", arrays, np.arange(40) % 2, None, info={n: {"draws": 3} for n in arrays}, shard_rows=8
    )
    assert fs.feature_names() == ["t150_b15_tok8"]
    assert fs.draw_names("t150_b15_tok8") == list(arrays)
    assert [fs.feature_info(n).draw for n in arrays] == [0, 1, 2]
    assert fs.array("t150_b15_tok8_d2").attrs["noise_draws"] == 3
    with pytest.raises(KeyError, match="draw 1 of a feature"):
        fs.draw_names("t150_b15_tok8_d1")
    np.testing.assert_array_equal(fs.read("t150_b15_tok8_d2"), base + 2)
    full = verify(fs, full_scan=True)
    assert full.ok and full.checked["features"] == 3, full
    assert [f["name"] for f in info(fs)["features"]] == list(arrays)
    if importlib.util.find_spec("xarray"):  # every draw is a node of the store's DataTree
        tree = fs.to_xarray()
        assert sorted(tree.children) == sorted(arrays)
        np.testing.assert_array_equal(tree["t150_b15_tok8_d1"]["t150_b15_tok8_d1"].values, base + 1)
    # A one-draw store's arrays carry no draw attributes (its metadata is what it always was).
    plain = save_features(tmp_path / "one.zarr", {"t150_b15_tok8": base}, np.arange(40) % 2, None, shard_rows=8)
    assert "noise_draws" not in plain.array("t150_b15_tok8").attrs
    assert plain.draw_names("t150_b15_tok8") == ["t150_b15_tok8"]
    with pytest.raises(StoreError, match="noise draw 1 of 1"):
        save_features(tmp_path / "bad.zarr", {"t150_b15_tok8_d1": base}, np.arange(40) % 2, None)
