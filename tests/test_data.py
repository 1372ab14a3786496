"""probe/data.py: ProbeData from a store: errors that say what to do, memory budgets."""

import numpy as np
import pytest
from probe_data_fixtures import DRAW_OFFSET, FEAT, FLAT, N, draw_of, make_features, write_draws_store, write_store

from extract.store import open_store, save_features
from probe.data import ProbeData
from probe.errors import ProbeDataError
from probe.stream import FeatureStream


@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path)


def test_error_store_without_labels(tmp_path):
    feats, _ = make_features(np.random.default_rng(0))
    store = save_features(tmp_path / "s.zarr", feats, np.full(N, -1), None)
    with pytest.raises(ProbeDataError, match="no labels"):
        ProbeData.from_store(store, [FEAT])


def test_error_unknown_feature_lists_existing_ones(store_path):
    with pytest.raises(ProbeDataError, match=rf"'t999_b01_avg1' not in the store.*{FEAT}.*{FLAT}|{FLAT}.*{FEAT}"):
        ProbeData.from_store(open_store(store_path), ["t999_b01_avg1"])


@pytest.mark.parametrize("row", [17, 100])  # a train row (found by the statistics pass), a test row (on read)
@pytest.mark.parametrize("in_memory", [True, False])
def test_error_nan_names_feature_and_row(tmp_path, row, in_memory):
    feats, y = make_features(np.random.default_rng(0))
    feats[FEAT][row, 1, 0, 1] = np.inf if row == 17 else np.nan
    store = save_features(
        tmp_path / "s.zarr", feats, y, {"train": np.arange(90), "test": np.arange(90, N)}, shard_rows=16
    )
    data = ProbeData.from_store(store, [FEAT, FLAT], in_memory=in_memory)
    with pytest.raises(ProbeDataError, match=rf"feature '{FEAT}' has NaN or inf values at store row {row}\b"):
        data.stats(FEAT)
        for split in ("train", "val", "test"):
            list(FeatureStream(data, split, 16, shuffle=False))


def test_error_split_missing_a_class(tmp_path):
    feats, y = make_features(np.random.default_rng(0))
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


def test_memory_budget_decides_the_mode(store_path):
    store = open_store(store_path)
    assert ProbeData.from_store(store, [FEAT], memory_budget="1GiB").in_memory
    small = ProbeData.from_store(store, [FEAT], memory_budget=100)
    assert not small.in_memory and small.default_buffer_rows() >= store.shard_rows
    with pytest.raises(ProbeDataError, match="memory budget"):
        ProbeData.from_store(store, [FEAT], memory_budget="lots")


# -- noise draws kept apart (combine: separate) -------------------------------------------------------------


@pytest.mark.parametrize("in_memory", [True, False])
def test_train_stream_reads_draw_e_mod_k_and_eval_draw_0(tmp_path, in_memory):
    path = write_draws_store(tmp_path)
    data = ProbeData.from_store(open_store(path), [FEAT], standardize="none", in_memory=in_memory)
    assert data.store_draws == data.draws == 3 and data.draw_arrays(FEAT) == [FEAT, f"{FEAT}_d1", f"{FEAT}_d2"]
    train, test = FeatureStream(data, "train", 32, shuffle=True), FeatureStream(data, "test", 32, shuffle=False)
    orders = []
    for epoch in range(6):
        train.set_epoch(epoch)
        batches = list(train)
        assert {draw_of(xs[FEAT]) for xs, _ in batches} == {epoch % 3}, epoch
        orders.append(np.concatenate([y.numpy() for _, y in batches]))
        test.set_epoch(epoch)
        assert {draw_of(xs[FEAT]) for xs, _ in test} == {0}
    # The order is the stream's (seed, epoch) alone: the draw never changes which rows come when.
    plain = ProbeData.from_store(open_store(path), [FEAT], standardize="none", in_memory=in_memory, draws=1)
    one = FeatureStream(plain, "train", 32, shuffle=True)
    for epoch in range(3):
        one.set_epoch(epoch)
        assert {draw_of(xs[FEAT]) for xs, _ in one} == {0}
        assert np.array_equal(np.concatenate([y.numpy() for _, y in one]), orders[epoch])


def test_mean_stream_carries_every_draw_and_statistics_come_from_draw_0(tmp_path):
    path = write_draws_store(tmp_path)
    data = ProbeData.from_store(open_store(path), [FEAT], eval_draws="mean", in_memory=False, memory_budget="64KiB")
    stream = FeatureStream(data, "test", 8, shuffle=False)
    assert stream.draw_inputs == [{FEAT: FEAT}, {FEAT: f"{FEAT}_d1"}, {FEAT: f"{FEAT}_d2"}]
    assert stream.buffer_rows <= max(data.chunk_rows, data.default_buffer_rows() // 3)  # K draws per row held
    xs, _ = next(iter(stream))
    assert sorted(xs) == [FEAT, f"{FEAT}_d1", f"{FEAT}_d2"]
    # One scale for all draws: draw 0's train statistics, so draw d sits d * OFFSET / std above draw 0.
    stats = data.stats(FEAT)
    gap = (xs[f"{FEAT}_d2"] - xs[FEAT]).numpy()
    np.testing.assert_allclose(gap, np.broadcast_to(2 * DRAW_OFFSET / stats.std, gap.shape), rtol=1e-4)
    alone = ProbeData.from_store(write_store(tmp_path / "one"), [FEAT])
    assert np.array_equal(stats.mean, alone.stats(FEAT).mean) and np.array_equal(stats.std, alone.stats(FEAT).std)


def test_draw_options_are_checked_before_reading(tmp_path):
    path = write_draws_store(tmp_path)
    with pytest.raises(ProbeDataError, match="draws=4, but the store keeps 3 noise draws"):
        ProbeData.from_store(open_store(path), [FEAT], draws=4)
    with pytest.raises(ProbeDataError, match="draws=0"):
        ProbeData.from_store(open_store(path), [FEAT], draws=0)
    with pytest.raises(ProbeDataError, match="eval_draws='all'"):
        ProbeData.from_store(open_store(path), [FEAT], eval_draws="all")
    with pytest.raises(ProbeDataError, match="not in the store"):  # a draw is not a feature of its own
        ProbeData.from_store(open_store(path), [f"{FEAT}_d1"])
    assert open_store(path).feature_names() == [FEAT]
    with pytest.raises(ProbeDataError, match="store keeps 1 noise draw per feature"):
        ProbeData.from_store(open_store(write_store(tmp_path / "one")), [FEAT], draws=2)


@pytest.mark.parametrize("in_memory", [True, False])
def test_finite_values_whose_sum_overflows_are_not_reported(tmp_path, in_memory):
    """The NaN/inf check sums each block: finite values near float32's limit overflow that sum, and the rows
    checked again one by one then clear them."""
    feats, y = make_features(np.random.default_rng(0))
    big = np.where(np.arange(feats[FEAT].size).reshape(feats[FEAT].shape) % 2, 3e38, 2e38).astype(np.float32)
    store = save_features(tmp_path / "s.zarr", {FEAT: big}, y, {"train": np.arange(90), "test": np.arange(90, N)})
    data = ProbeData.from_store(store, [FEAT], in_memory=in_memory, standardize="none")
    rows = np.concatenate([x[FEAT].numpy() for x, _ in FeatureStream(data, "test", 16, shuffle=False)])
    assert np.array_equal(rows, big[data.rows("test")])


def test_train_windows_of_a_feature_are_checked_for_nan_once_by_the_statistics_pass(tmp_path, monkeypatch):
    """The statistics pass checks a feature's train rows; its streamed train windows are not checked again, but
    windows with other rows, and other noise draws of the feature, are (a NaN there is still named)."""
    import probe.reading

    checked: list[int] = []
    check = probe.reading.flag_not_finite
    monkeypatch.setattr(
        probe.reading, "flag_not_finite", lambda flags, block: checked.append(len(block)) or check(flags, block)
    )
    feats, y = make_features(np.random.default_rng(0))
    d1 = feats[FEAT] + np.float32(DRAW_OFFSET)
    d1[40, 0, 1, 1] = np.nan  # a train row of draw 1 only
    store = save_features(
        tmp_path / "s.zarr",
        {FEAT: feats[FEAT], f"{FEAT}_d1": d1},
        y,
        {"train": np.arange(90), "test": np.arange(90, N)},
        info={a: {"draws": 2} for a in (FEAT, f"{FEAT}_d1")},
        shard_rows=16,
    )
    data = ProbeData.from_store(store, [FEAT], in_memory=False, draws=2)
    train = FeatureStream(data, "train", 16, shuffle=True)
    assert sum(len(b) for _, b in train) == len(data.rows("train")) and not checked  # draw 0
    list(FeatureStream(data, "test", 16, shuffle=False))
    assert sum(checked) == len(data.rows("test"))
    train.set_epoch(1)  # draw 1
    with pytest.raises(ProbeDataError, match=rf"'{FEAT}_d1' has NaN or inf values at store row 40\b"):
        list(train)
