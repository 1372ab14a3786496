"""Shared data of the probe data tests (test_data, test_splits, test_stats, test_stream): a small store.

Each test module wraps `write_store` in its own `store_path` fixture."""

import numpy as np

from extract.store import save_features

N, K = 120, 3
FEAT, FLAT = "t090_b24_avg2", "t150_b19_avg1"


def make_features(rng, n=N):
    y = np.arange(n) % K
    x = rng.normal(size=(n, 3, 2, 2)).astype(np.float32) * 2.0 + 5.0 + y[:, None, None, None]
    flat = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
    return {FEAT: x, FLAT: flat}, y


def write_store(tmp_path):
    """The small store most data tests read (train rows 0..89, test the rest, 16-row shards)."""
    feats, y = make_features(np.random.default_rng(0))
    save_features(
        tmp_path / "s.zarr",
        feats,
        y,
        {"train": np.arange(90), "test": np.arange(90, N)},
        class_names=["a", "b", "c"],
        shard_rows=16,
    )
    return tmp_path / "s.zarr"
