"""probe/data.py: ProbeData from a store: errors that say what to do, memory budgets."""

import numpy as np
import pytest
from probe_data_fixtures import FEAT, FLAT, N, make_features, write_store

from extract.store import open_store, save_features
from probe.data import ProbeData, ProbeDataError, check_min_samples


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
            list(data.stream(split, 16, shuffle=False))


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
