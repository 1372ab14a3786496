"""probe/data.py: train-only statistics, streamed == in memory, seeded stratified splits and subsets, errors."""

import numpy as np
import pytest
import torch

from extract.store import open_store, save_features
from probe.data import ProbeData, ProbeDataError, Subset, check_min_samples, epoch_order

N, K = 120, 3
FEAT, FLAT = "t090_b24_avg2", "t150_b19_avg1"


def _features(rng, n=N):
    y = np.arange(n) % K
    x = rng.normal(size=(n, 3, 2, 2)).astype(np.float32) * 2.0 + 5.0 + y[:, None, None, None]
    flat = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
    return {FEAT: x, FLAT: flat}, y


@pytest.fixture
def store_path(tmp_path):
    feats, y = _features(np.random.default_rng(0))
    save_features(
        tmp_path / "s.zarr",
        feats,
        y,
        {"train": np.arange(90), "test": np.arange(90, N)},
        class_names=["a", "b", "c"],
        shard_rows=16,
    )
    return tmp_path / "s.zarr"


def test_statistics_come_from_train_rows_only(tmp_path):
    feats, y = _features(np.random.default_rng(1))
    feats[FEAT][90:] += 1000.0  # test rows far away: they must not move the statistics
    store = save_features(
        tmp_path / "s.zarr", feats, y, {"train": np.arange(90), "test": np.arange(90, N)}, shard_rows=16
    )
    data = ProbeData.from_store(store, [FEAT], seed=0)
    train = feats[FEAT][data.rows("train")].astype(np.float64)
    stats = data.stats(FEAT)
    np.testing.assert_allclose(stats.mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, train.std(0), rtol=1e-5)
    x = data.arrays("train")[FEAT]
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    assert data.arrays("test")[FEAT].mean() > 100  # test standardised with train statistics
    # per-channel mode shares one mean per channel
    chan = ProbeData.from_store(store, [FEAT], seed=0, standardize="channel").stats(FEAT)
    assert chan.mean.shape == (3, 1, 1)
    np.testing.assert_allclose(chan.mean.ravel(), train.mean((0, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("shuffle", [True, False])
def test_streamed_and_in_memory_give_identical_batches_and_statistics(store_path, shuffle):
    # Two store objects: the statistics cache is per store object, so each mode computes its own.
    mem = ProbeData.from_store(open_store(store_path), [FEAT, FLAT], seed=3, in_memory=True)
    streamed = ProbeData.from_store(open_store(store_path), [FEAT, FLAT], seed=3, in_memory=False)
    assert mem.in_memory and not streamed.in_memory
    for name in (FEAT, FLAT):
        assert np.array_equal(mem.stats(name).mean, streamed.stats(name).mean)
        assert np.array_equal(mem.stats(name).std, streamed.stats(name).std)
    orders = []
    for epoch in (0, 1):
        s1 = mem.stream("train", 13, shuffle=shuffle, buffer_rows=40)
        s2 = streamed.stream("train", 13, shuffle=shuffle, buffer_rows=40)
        s1.set_epoch(epoch)
        s2.set_epoch(epoch)
        b1, b2 = list(s1), list(s2)
        assert len(b1) == len(b2) == len(s1) == -(-s1.num_samples // 13)
        for (x1, y1), (x2, y2) in zip(b1, b2):
            assert torch.equal(y1, y2)
            assert all(torch.equal(x1[n], x2[n]) for n in (FEAT, FLAT))
            assert x1[FEAT].dtype == torch.float32 and x1[FEAT].shape[1:] == (3, 2, 2)
        orders.append(torch.cat([y for _, y in b1]))
        assert sum(len(y) for _, y in b1) == s1.num_samples
    assert shuffle != torch.equal(orders[0], orders[1])  # a new order each epoch, only when shuffling
    for split in ("train", "val", "test"):
        assert all(np.array_equal(mem.arrays(split)[n], streamed.arrays(split)[n]) for n in (FEAT, FLAT))
    # default windows do not depend on the mode either
    small = ProbeData.from_store(open_store(store_path), [FEAT], seed=3, in_memory=False, shuffle_buffer=600)
    big = ProbeData.from_store(open_store(store_path), [FEAT], seed=3, in_memory=True, shuffle_buffer=600)
    assert small.default_buffer_rows() == big.default_buffer_rows() == 16  # 600 B / 48 B rows, >= a shard
    assert all(torch.equal(a[1], b[1]) for a, b in zip(small.stream("train", 8), big.stream("train", 8)))


def test_epoch_order_visits_each_row_once_and_is_seeded():
    rows = np.sort(np.random.default_rng(0).choice(1000, 300, replace=False))
    windows = epoch_order(rows, 64, 100, seed=5, epoch=2, shuffle=True)
    order = np.concatenate([w.order for w in windows])
    assert np.array_equal(np.sort(order), rows) and not np.array_equal(order, rows)
    for w in windows:  # a window only holds rows of its own chunks
        assert set(np.unique(w.order // 64)) == set(w.chunks)
    again = np.concatenate([w.order for w in epoch_order(rows, 64, 100, seed=5, epoch=2, shuffle=True)])
    other = np.concatenate([w.order for w in epoch_order(rows, 64, 100, seed=6, epoch=2, shuffle=True)])
    assert np.array_equal(order, again) and not np.array_equal(order, other)


def test_validation_is_carved_seeded_and_stratified_from_train(store_path):
    store = open_store(store_path)
    a = ProbeData.from_store(store, [FEAT], seed=0, val_fraction=0.2)
    b = ProbeData.from_store(store, [FEAT], seed=0, val_fraction=0.2)
    c = ProbeData.from_store(store, [FEAT], seed=1, val_fraction=0.2)
    assert np.array_equal(a.rows("val"), b.rows("val")) and not np.array_equal(a.rows("val"), c.rows("val"))
    assert np.array_equal(a.rows("test"), np.arange(90, N))  # the store's test split is kept
    assert np.intersect1d(a.rows("val"), a.rows("train")).size == 0
    assert np.array_equal(np.union1d(a.rows("val"), a.rows("train")), np.arange(90))
    assert np.bincount(a.labels("val"), minlength=K).tolist() == [6, 6, 6]  # 20% of 30 per class
    definition = a.split_definition()
    assert definition["source"]["val"].startswith("carved from train")
    assert definition["splits"]["val"]["per_class"] == [6, 6, 6]


def test_store_without_splits_is_split_train_val_test(tmp_path):
    feats, y = _features(np.random.default_rng(2))
    store = save_features(tmp_path / "s.zarr", feats, y, None, shard_rows=16)
    data = ProbeData.from_store(store, [FEAT], seed=0, val_fraction=0.1, test_fraction=0.25)
    sizes = {s: len(data.rows(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == N and sizes["test"] == 30
    assert np.bincount(data.labels("test")).tolist() == [10, 10, 10]
    assert len(np.unique(np.concatenate([data.rows(s) for s in sizes]))) == N


def test_label_subsets_are_seeded_and_stratified(store_path):
    store = open_store(store_path)
    full = ProbeData.from_store(store, [FEAT], seed=0)
    pct = ProbeData.from_store(store, [FEAT], seed=0, subset="10%")
    shot = ProbeData.from_store(store, [FEAT], seed=0, subset="5-shot")
    assert np.bincount(pct.labels("train")).tolist() == [3, 3, 3]  # 10% of 27 per class, rounded
    assert np.bincount(shot.labels("train")).tolist() == [5, 5, 5]
    assert np.isin(shot.rows("train"), full.rows("train")).all()
    assert np.array_equal(shot.rows("val"), full.rows("val"))  # validation does not depend on the subset
    again = ProbeData.from_store(store, [FEAT], seed=0, subset="5-shot")
    other = ProbeData.from_store(store, [FEAT], seed=1, subset="5-shot")
    assert np.array_equal(shot.rows("train"), again.rows("train"))
    assert not np.array_equal(shot.rows("train"), other.rows("train"))
    # statistics follow the subset: they come from the rows the head trains on
    sub = shot.stats(FEAT)
    np.testing.assert_allclose(sub.mean, store.read(FEAT, shot.rows("train")).mean(0), rtol=1e-5)
    assert shot.split_definition()["subset"] == "5-shot"
    assert Subset.parse("1%") == Subset("fraction", 0.01) and str(Subset.parse("10shot")) == "10-shot"
    with pytest.raises(ProbeDataError, match="not understood"):
        Subset.parse("half")


def test_error_store_without_labels(tmp_path):
    feats, _ = _features(np.random.default_rng(0))
    store = save_features(tmp_path / "s.zarr", feats, np.full(N, -1), None)
    with pytest.raises(ProbeDataError, match="no labels"):
        ProbeData.from_store(store, [FEAT])


def test_error_unknown_feature_lists_existing_ones(store_path):
    with pytest.raises(ProbeDataError, match=rf"'t999_b01_avg1' not in the store.*{FEAT}.*{FLAT}|{FLAT}.*{FEAT}"):
        ProbeData.from_store(open_store(store_path), ["t999_b01_avg1"])


@pytest.mark.parametrize("row", [17, 100])  # a train row (found by the statistics pass), a test row (on read)
@pytest.mark.parametrize("in_memory", [True, False])
def test_error_nan_names_feature_and_row(tmp_path, row, in_memory):
    feats, y = _features(np.random.default_rng(0))
    feats[FEAT][row, 1, 0, 1] = np.inf if row == 17 else np.nan
    store = save_features(
        tmp_path / "s.zarr", feats, y, {"train": np.arange(90), "test": np.arange(90, N)}, shard_rows=16
    )
    data = ProbeData.from_store(store, [FEAT, FLAT], in_memory=in_memory)
    with pytest.raises(ProbeDataError, match=rf"feature '{FEAT}' has NaN or inf values at store row {row}\b"):
        data.stats(FEAT)
        for split in ("train", "val", "test"):
            list(data.stream(split, 16, shuffle=False))


def test_error_split_missing_a_class(tmp_path):
    feats, y = _features(np.random.default_rng(0))
    test = np.flatnonzero((np.arange(N) >= 90) & (y != 2))  # the store's test split has no class "c"
    store = save_features(
        tmp_path / "s.zarr", feats, y, {"train": np.arange(90), "test": test}, class_names=["a", "b", "c"]
    )
    with pytest.raises(ProbeDataError, match=r"'test' split has no samples of 1 class\(es\): 'c'"):
        ProbeData.from_store(store, [FEAT])
    assert ProbeData.from_store(store, [FEAT], allow_missing_classes=True).num_classes == 3


def test_error_too_few_samples_for_k(store_path):
    with pytest.raises(ProbeDataError, match=r"class 'a' \(label 0\) has only 27 train samples, fewer than k=28"):
        ProbeData.from_store(open_store(store_path), [FEAT], subset="28-shot")
    with pytest.raises(ProbeDataError, match="kNN with k=200 needs at least 200 samples but only 81"):
        check_min_samples(81, 200, "kNN with k=200")


def test_memory_budget_decides_the_mode(store_path):
    store = open_store(store_path)
    assert ProbeData.from_store(store, [FEAT], memory_budget="1GiB").in_memory
    small = ProbeData.from_store(store, [FEAT], memory_budget=100)
    assert not small.in_memory and small.default_buffer_rows() >= store.shard_rows
    with pytest.raises(ProbeDataError, match="memory budget"):
        ProbeData.from_store(store, [FEAT], memory_budget="lots")


def test_memory_budget_strings():
    from probe.data import default_memory_budget, parse_memory

    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("500MB") == 500 * 10**6 and parse_memory(4096) == 4096
    assert parse_memory("25%") == default_memory_budget(0.25) and parse_memory(None) == default_memory_budget()
    for bad in ("", "lots", "-1GB"):
        with pytest.raises(ProbeDataError, match="not understood"):
            parse_memory(bad)
    with pytest.raises(ProbeDataError, match=">= 0"):
        parse_memory(-1)
