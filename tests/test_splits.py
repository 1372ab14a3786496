"""probe/splits.py: seeded stratified hold-outs, stores without splits, label subsets."""

import numpy as np
import pytest
from probe_data_fixtures import FEAT, K, N, make_features, write_store

from extract.store import open_store, save_features
from probe.data import ProbeData
from probe.errors import ProbeDataError
from probe.splits import Subset


@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path)


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
    feats, y = make_features(np.random.default_rng(2))
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
