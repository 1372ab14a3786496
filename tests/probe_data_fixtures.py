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


DRAW_OFFSET = 100.0  # draw d = draw 0 + d * DRAW_OFFSET: unstandardised, a batch's mean names its draw


def write_draws_store(tmp_path, draws=3, name="draws.zarr"):
    """The small store with FEAT's noise draws kept apart (`combine: separate`): FEAT, FEAT_d1, ... ."""
    feats, y = make_features(np.random.default_rng(0))
    arrays = {FEAT: feats[FEAT]}
    arrays.update({f"{FEAT}_d{d}": feats[FEAT] + np.float32(d * DRAW_OFFSET) for d in range(1, draws)})
    save_features(
        tmp_path / name,
        arrays,
        y,
        {"train": np.arange(90), "test": np.arange(90, N)},
        class_names=["a", "b", "c"],
        info={a: {"draws": draws} for a in arrays},
        shard_rows=16,
    )
    return tmp_path / name


def draw_of(x):
    """The draw an unstandardised (standardize="none") batch of FEAT was read from (see DRAW_OFFSET)."""
    return int(round(float(np.mean(np.asarray(x))) / DRAW_OFFSET))
