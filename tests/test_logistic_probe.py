"""`probe logistic`: the exact torch solver against scikit-learn's on one store, and the logits.npz that the
logistic and kNN probes write for `probe compare`."""

import numpy as np
import pytest

from extract.store import save_features
from probe.logits import read_logits
from probe.options import KnnOptions, LogisticOptions
from probe.recipe import ProbeConfigError
from probe.run import run_knn, run_logistic

N, D, K = 400, 40, 4
FEATURE = "t090_b24_avg1"
L2S = [1.0, 1e-1, 1e-2, 1e-3, 1e-4]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = np.arange(N) % K
    x = (rng.normal(size=(K, D))[y] * 0.35 + rng.normal(size=(N, D))).astype(np.float32)
    path = tmp_path_factory.mktemp("logistic") / "s.zarr"
    splits = {"train": np.arange(300), "test": np.arange(300, N)}
    return save_features(path, {FEATURE: x.reshape(N, D, 1, 1)}, y, splits, class_names=list("abcd"))


def test_torch_and_sklearn_solvers_select_the_same_l2_and_agree(store, tmp_path):
    exact = run_logistic(store, tmp_path / "torch", LogisticOptions(l2s=L2S))
    ref = run_logistic(store, tmp_path / "sklearn", LogisticOptions(solver="sklearn", l2s=L2S))
    n_train = exact["split_definition"]["splits"]["train"]["n"]
    # one grid, two parametrisations: C = 1 / (l2 n_train)
    assert sorted(r["C"] for r in ref["sweep"]) == pytest.approx(sorted(1 / (v * n_train) for v in L2S))
    assert ref["selected"]["C"] == pytest.approx(exact["selected"]["C"])
    assert exact["selected"]["l2"] == pytest.approx(1 / (ref["selected"]["C"] * n_train))
    by_c = {round(r["C"], 9): r["val_top1"] for r in ref["sweep"]}
    for row in exact["sweep"]:
        assert abs(row["val_top1"] - by_c[round(row["C"], 9)]) <= 0.04
        assert row["iterations"] > 0 and row["loss"] > 0 and not row["hit_max_iter"]
    assert abs(exact["metrics"]["test"]["top1"] - ref["metrics"]["test"]["top1"]) <= 0.03
    assert exact["metrics"]["test"]["top1"] > 0.6  # chance is 0.25
    assert exact["refit"]["l2"] == exact["selected"]["l2"] and exact["refit"]["iterations"] > 0
    assert exact["solver"] == "torch-lbfgs" and exact["config"]["solver"] == "torch"


def test_refit_on_train_scores_the_selected_fit(store, tmp_path):
    out = run_logistic(store, tmp_path / "t", LogisticOptions(l2s=L2S, refit="train"))
    assert out["refit"] is None and out["refit_on"] == "train"
    selected = next(r for r in out["sweep"] if r["l2"] == out["selected"]["l2"])
    assert out["metrics"]["val"]["top1"] == pytest.approx(selected["val_top1"])


@pytest.mark.parametrize("command", ["logistic", "knn"])
def test_probe_writes_logits_with_rows_labels_ids_and_store(store, tmp_path, command):
    run, opts = (run_logistic, LogisticOptions(l2s=[1e-2])) if command == "logistic" else (run_knn, KnnOptions(ks=[5]))
    out = run(store, tmp_path / command, opts)
    scores, fingerprint = read_logits(tmp_path / command / "logits.npz")
    assert fingerprint == store.fingerprint == out["logits"]["store_fingerprint"]
    test = scores["test"]
    assert np.array_equal(test.rows, np.arange(300, N)) and np.array_equal(test.labels, store.labels[300:])
    assert list(test.ids) == [str(i) for i in range(300, N)]
    assert test.logits.shape == (N - 300, K)
    assert test.correct.mean() == pytest.approx(out["metrics"]["test"]["top1"])
    assert scores["val"].correct.mean() == pytest.approx(out["metrics"]["val"]["top1"])
    assert out["logits"]["splits"]["test"]["n"] == N - 300


@pytest.mark.parametrize(
    "options,match",
    [
        ({"solver": "liblinear"}, "solver must be one of"),
        ({"cs": [1.0], "l2s": [1.0]}, "not both"),
        ({"l2s": [0.0]}, "l2s must be"),
        ({"refit": "val"}, "refit must be one of"),
        ({"solver": "sklearn", "device": "cuda"}, "runs on the CPU"),
    ],
)
def test_bad_options_are_refused_before_reading(tmp_path, options, match):
    with pytest.raises(ProbeConfigError, match=match):
        run_logistic(tmp_path / "no-store.zarr", tmp_path / "out", LogisticOptions(**options))
    assert not (tmp_path / "out").exists()
