"""`probe logistic`: the exact torch solver against scikit-learn's on one store, and the logits.npz that the
logistic and kNN probes write for `probe compare`."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.store import save_features
from probe.exact_logistic import L2_GRID
from probe.logits import read_logits
from probe.options import KnnOptions, LogisticOptions
from probe.recipe import ProbeConfigError
from probe.run import run_knn, run_logistic
from probe.splits import carve_validation

N, D, K = 400, 40, 4
FEATURE = "t090_b24_avg1"
L2S = [1.0, 1e-1, 1e-2, 1e-3, 1e-4]


def _store(path, classes=K):
    rng = np.random.default_rng(0)
    y = np.arange(N) % classes
    x = (rng.normal(size=(classes, D))[y] * 0.35 + rng.normal(size=(N, D))).astype(np.float32)
    splits = {"train": np.arange(300), "test": np.arange(300, N)}
    names = [chr(ord("a") + c) for c in range(classes)]
    return save_features(path, {FEATURE: x.reshape(N, D, 1, 1)}, y, splits, class_names=names)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("logistic") / "s.zarr")


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


def test_probe_logistic_reproduces_the_benchmark_protocol(tmp_path):
    """`probe logistic --refit train` on a store is the Fashion-MNIST benchmark's linear probe: one split rule,
    one standardiser, one solver and grid, so the same L2 is selected and the same images are right."""
    script = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(script))
    try:
        import fmnist_reproduction
    finally:
        sys.path.pop(0)
    store = _store(tmp_path / "ten.zarr", classes=10)  # the benchmark's probe is Fashion-MNIST's: 10 classes
    train = store.splits["train"]
    fit_rows, val_rows = carve_validation(train, store.labels[train], 0.1, seed=0)
    rows = {"train": fit_rows, "fit": fit_rows, "val": val_rows, "test": store.splits["test"]}
    key = (90, 24, "avg1")
    feats = {key: torch.from_numpy(store.read(FEATURE))}
    y = torch.from_numpy(store.labels)
    bench = fmnist_reproduction.probe_grid(feats, y, {k: torch.from_numpy(v) for k, v in rows.items()}, [key])
    out = run_logistic(store, tmp_path / "p", LogisticOptions(refit="train"))
    assert out["config"]["l2s"] == sorted(L2_GRID)
    assert out["selected"]["l2"] == bench["selected"]["l2"]
    assert round(100 * out["selected"]["val_top1"], 2) == bench["selected"]["val"]
    scores, _ = read_logits(tmp_path / "p" / "logits.npz")
    assert np.array_equal(scores["test"].correct, bench["_correct"])
    by_l2 = {r["l2"]: r for r in bench["grid"]}
    for row in out["sweep"]:
        assert row["iterations"] == by_l2[row["l2"]]["iterations"]
        assert row["loss"] == pytest.approx(by_l2[row["l2"]]["loss"], rel=1e-4)
