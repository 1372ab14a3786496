"""probe/stats.py: standardisation statistics from the train rows only."""

import numpy as np
from probe_data_fixtures import FEAT, N, make_features

import probe.stats
from extract.store import save_features
from probe.data import ProbeData


def test_statistics_come_from_train_rows_only(tmp_path):
    feats, y = make_features(np.random.default_rng(1))
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


def test_streamed_statistics_in_blocks_match_numpy_despite_a_large_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(probe.stats, "STATS_BLOCK_BYTES", 5 * 48)  # 5-row blocks: many blocks, a short last one
    feats, y = make_features(np.random.default_rng(2))
    feats[FEAT] = (feats[FEAT] * 0.01 + 3000.0).astype(np.float32)  # mean >> std: naive sum of squares cancels
    store = save_features(tmp_path / "s.zarr", feats, y, {"train": np.arange(90), "test": np.arange(90, N)})
    data = ProbeData.from_store(store, [FEAT], seed=0, in_memory=False)
    train = feats[FEAT][data.rows("train")].astype(np.float64)
    stats = data.stats(FEAT)
    np.testing.assert_allclose(stats.mean, train.mean(0), rtol=1e-7)
    np.testing.assert_allclose(stats.std, train.std(0), rtol=1e-4)
    assert stats.count == len(train)


def test_in_memory_arrays_get_the_store_probes_statistics(tmp_path):
    # One standardiser: statistics of an in-memory array (the estimators, the benchmarks) are those a probe
    # computes from the same rows in the store.
    feats, y = make_features(np.random.default_rng(3))
    store = save_features(tmp_path / "s.zarr", feats, y, {"train": np.arange(N)})
    for mode in ("dim", "channel"):
        data = ProbeData.from_store(store, [FEAT], seed=0, standardize=mode, in_memory=False)
        rows = np.sort(data.rows("train"))
        mine = probe.stats.array_stats(FEAT, feats[FEAT][rows], mode)
        theirs = data.stats(FEAT)
        assert np.array_equal(mine.mean, theirs.mean) and np.array_equal(mine.std, theirs.std)
