"""probe/stream.py: epoch order; streamed batches equal in-memory ones."""

import numpy as np
import pytest
import torch
from probe_data_fixtures import FEAT, FLAT, write_store

from extract.store import open_store
from probe.data import ProbeData
from probe.order import epoch_order
from probe.stream import FeatureStream


@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path)


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
        s1 = FeatureStream(mem, "train", 13, shuffle=shuffle, buffer_rows=40)
        s2 = FeatureStream(streamed, "train", 13, shuffle=shuffle, buffer_rows=40)
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
    assert all(
        torch.equal(a[1], b[1]) for a, b in zip(FeatureStream(small, "train", 8), FeatureStream(big, "train", 8))
    )


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


def test_memory_budget_caps_the_shuffle_window_in_both_modes(store_path):
    kw = dict(seed=3, shuffle_buffer="1GiB", memory_budget=4 * 48 * 40)  # a quarter of the budget: 40 rows of 48 B
    mem = ProbeData.from_store(open_store(store_path), [FEAT], in_memory=True, **kw)
    streamed = ProbeData.from_store(open_store(store_path), [FEAT], in_memory=False, **kw)
    assert mem.default_buffer_rows() == streamed.default_buffer_rows() == 40
    assert mem.split_definition()["shuffle"]["buffer_rows"] == 40
    s1, s2 = FeatureStream(mem, "train", 7), FeatureStream(streamed, "train", 7)
    assert len(s2.windows()) > 1  # batches span windows
    b1, b2 = list(s1), list(s2)
    assert [len(y) for _, y in b2] == [7] * (s2.num_samples // 7) + ([s2.num_samples % 7] if s2.num_samples % 7 else [])
    for (x1, y1), (x2, y2) in zip(b1, b2):
        assert torch.equal(y1, y2) and torch.equal(x1[FEAT], x2[FEAT])
    # a generous budget leaves the window to shuffle_buffer, as before budgets sized it
    big = ProbeData.from_store(open_store(store_path), [FEAT], seed=3, memory_budget="8GiB", shuffle_buffer=600)
    assert big.default_buffer_rows() == 16


def test_a_shard_large_for_the_budget_is_shuffled_in_runs_of_inner_chunks(tmp_path):
    from probe_data_fixtures import N, make_features

    from extract.store import save_features

    feats, y = make_features(np.random.default_rng(0))
    split = {"train": np.arange(90), "test": np.arange(90, N)}
    store = save_features(tmp_path / "s.zarr", {FEAT: feats[FEAT]}, y, split, shard_rows=64, chunk_rows=16)
    shard_bytes = 64 * 48
    roomy = ProbeData.from_store(store, [FEAT], memory_budget=16 * shard_bytes, in_memory=False)
    assert roomy.chunk_rows == 64  # whole shards, as before budgets sized the unit
    kw = dict(seed=1, memory_budget=16 * shard_bytes - 1)
    tight = ProbeData.from_store(open_store(tmp_path / "s.zarr"), [FEAT], in_memory=False, **kw)
    mem = ProbeData.from_store(open_store(tmp_path / "s.zarr"), [FEAT], in_memory=True, **kw)
    assert tight.chunk_rows == mem.chunk_rows == 48  # inner chunks filling a quarter window (3071 B)
    windows = FeatureStream(tight, "train", 8).windows()
    assert all(set(np.unique(w.order // 48)) == set(w.chunks) for w in windows)
    assert max(len(w.order) * 48 for w in windows) < 1.25 * tight.window_bytes() + 48 * 48
    for (x1, y1), (x2, y2) in zip(FeatureStream(tight, "train", 8), FeatureStream(mem, "train", 8)):
        assert torch.equal(y1, y2) and torch.equal(x1[FEAT], x2[FEAT])
