"""Linear CKA: known properties, the minibatch estimator against full batch, stores and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probe.cka import MinibatchCKA, hsic_unbiased, linear_cka, linear_gram
from probe.errors import ProbeDataError


def related(n: int = 600, d: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets with a shared low-dimensional part: CKA well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    x = z @ rng.normal(size=(4, d)) + 0.5 * rng.normal(size=(n, d))
    y = np.tanh(z @ rng.normal(size=(4, 2 * d))) + 0.5 * rng.normal(size=(n, 2 * d))
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_set_with_itself_is_one(debiased):
    x, _ = related()
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    x, y = related()
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(x.shape[1], x.shape[1])))
    base = linear_cka(x, y, debiased=debiased)
    assert 0.05 < base < 0.95
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(3.7 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, rel=1e-9)
    # ...but not to an anisotropic scaling of the features.
    scale = np.linspace(0.1, 10, x.shape[1])
    assert abs(linear_cka(x * scale, y, debiased=debiased) - base) > 1e-3


def test_the_u_centred_inner_product_is_song_et_als_unbiased_hsic():
    x, y = related(n=40)
    k, l_gram = linear_gram(x), linear_gram(y)
    n = len(k)
    kt, lt = k.copy(), l_gram.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    ones = np.ones(n)
    song = (
        np.trace(kt @ lt)
        + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * ones @ kt @ lt @ ones
    ) / (n * (n - 3))
    assert hsic_unbiased(k, l_gram) == pytest.approx(song, rel=1e-10)


def test_the_minibatch_estimate_agrees_with_full_batch():
    """Stated tolerance: within 0.01 of the full-batch debiased CKA at N = 2000, minibatches of 200
    (measured: 0.0002 at batch 200, 0.004 at batch 50)."""
    x, y = related(n=2000, seed=3)
    full = linear_cka(x, y, debiased=True)
    acc = MinibatchCKA()
    order = np.random.default_rng(0).permutation(len(x))
    for lo in range(0, len(x), 200):
        rows = order[lo : lo + 200]
        acc.update([x[rows], y[rows]])
    matrix = acc.cka_
    assert matrix.shape == (2, 2) and np.allclose(np.diag(matrix), 1.0)
    assert matrix[0, 1] == pytest.approx(full, abs=0.01)
    assert matrix[0, 1] == pytest.approx(matrix[1, 0], rel=1e-12)
    # One batch of every row is the full-batch estimate itself.
    one = MinibatchCKA().update([x], [y]).cka_
    assert one[0, 0] == pytest.approx(full, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------


class FakeStore:
    """The few store attributes CKA reads, over arrays in memory."""

    def __init__(self, url, features, ids, splits):
        self.url, self._features = url, features
        self.sample_ids = np.asarray(ids)
        self.valid = np.ones(len(ids), dtype=bool)
        self.splits = splits
        self.reads = []

    def feature_names(self, view="center"):
        return list(self._features)

    def feature_info(self, name):
        return type("Info", (), {"shape": self._features[name].shape[1:]})

    def read(self, name, rows):
        assert np.all(np.diff(rows) > 0), "rows are read in store order"
        self.reads.append(len(rows))
        return self._features[name][rows].astype(np.float32)


def fake_pair(n=400):
    x, y = related(n=n, seed=5)
    store = FakeStore(
        "a", {"f1": x.reshape(n, 5, 2, 2), "f2": y}, [f"s{i}" for i in range(n)], {"train": np.arange(n)}
    )
    # The other store holds the same samples in reverse order, and one extra.
    ids = [f"s{i}" for i in reversed(range(n))] + ["extra"]
    other = FakeStore("b", {"g": np.concatenate([y[::-1], y[:1]])}, ids, {"train": np.arange(n + 1)})
    return store, other, x, y


def test_store_cka_reads_windows_within_the_budget_and_matches_rows_by_id():
    from probe.cka_stores import store_cka

    store, other, x, y = fake_pair()
    result = store_cka(store, batch_size=100, memory_budget=2_000_000)
    assert result.row_features == ["f1", "f2"] and result.rows == 400 and result.batches == 4
    assert np.allclose(np.diag(result.cka), 1.0)
    vs = store_cka(store, other, batch_size=100, memory_budget=2_000_000)
    assert vs.cka.shape == (2, 1)
    # f2 and g are the same samples' values: CKA 1 despite the other store's row order.
    assert vs.cka[1, 0] == pytest.approx(1.0, abs=1e-9)
    assert vs.cka[0, 0] == pytest.approx(result.cka[0, 1], abs=1e-9)
    small = FakeStore("c", {"f": x}, [f"s{i}" for i in range(400)], {})
    store_cka(small, batch_size=100, memory_budget=200_000)
    assert max(small.reads) < 400  # the budget forced several windows


def test_store_cka_refuses_what_it_cannot_do():
    from probe.cka_stores import store_cka

    store, _, _, _ = fake_pair()
    with pytest.raises(ProbeDataError, match="no split 'test'; splits: train"):
        store_cka(store, split="test")
    with pytest.raises(ProbeDataError, match="raise --memory-budget"):
        store_cka(store, memory_budget=1000)
    with pytest.raises(ProbeDataError, match="no feature 'nope'"):
        store_cka(store, features=["nope"])


def test_analyze_cka_on_an_extracted_store(tmp_path):
    """The command on a real store: the JSON, the heat map, and each feature's CKA with itself."""
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from diffbank.cli import main

    reference = __import__("pathlib").Path(__file__).resolve().parent / "data" / "reference" / "store.zarr"
    result = CliRunner().invoke(
        main, ["analyze", "cka", str(reference), "--out", str(tmp_path), "--batch-size", "16", "--vs", str(reference)]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "cka.json").read_text())
    matrix = np.array(record["cka"], dtype=float)
    assert matrix.shape == (len(record["row_features"]), len(record["col_features"]))
    assert np.allclose(np.diag(matrix), 1.0, atol=1e-6)
    assert (tmp_path / "cka.png").stat().st_size > 1000
