"""`diffbank probe compare`: paired comparison of runs from their results.json + logits.npz."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from diffbank.cli import main
from extract.store import save_features
from probe.compare import CompareError, compare_runs
from probe.logits import SplitScores, write_logits
from probe.options import KnnOptions, LogisticOptions
from probe.run import run_knn, run_logistic
from probe.significance import holm, mcnemar, paired_difference_interval

N, D, K, N_TRAIN = 240, 12, 3, 160
FEATURE = "t090_b24_avg1"


def _data():
    rng = np.random.default_rng(1)
    y = np.arange(N) % K
    x = (rng.normal(size=(K, D))[y] * 0.6 + rng.normal(size=(N, D))).astype(np.float32)
    return x.reshape(N, D, 1, 1), y


def _save(path, order):
    """The store with its rows in `order` (each sample keeps its id, label and features)."""
    x, y = _data()
    ids = [f"img{i:04d}" for i in range(N)]
    # splits named by sample, so both stores fit, select and test on the same images
    splits = {
        "train": np.flatnonzero(order < N_TRAIN - 30),
        "val": np.flatnonzero((order >= N_TRAIN - 30) & (order < N_TRAIN)),
        "test": np.flatnonzero(order >= N_TRAIN),
    }
    return save_features(
        path, {FEATURE: x[order]}, y[order], splits, sample_ids=[ids[i] for i in order], class_names=list("abc")
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(5)
    # the same samples, train and test rows each in another order
    shuffled = np.concatenate([rng.permutation(N_TRAIN), N_TRAIN + rng.permutation(N - N_TRAIN)])
    return _save(base / "a.zarr", np.arange(N)), _save(base / "b.zarr", shuffled)


def _fake_run(path, correct, fingerprint="f" * 64, ids=None, rows=None):
    """A run directory whose test scores get exactly `correct` right (labels all 0)."""
    path.mkdir(parents=True)
    n = len(correct)
    logits = np.zeros((n, 2), dtype=np.float32)
    logits[~np.asarray(correct), 1] = 1.0
    rows = np.arange(n) if rows is None else rows
    scores = SplitScores(logits=logits, rows=rows, labels=np.zeros(n, dtype=np.int64), ids=ids)
    write_logits(path / "logits.npz", {"test": scores}, fingerprint)
    (path / "results.json").write_text(json.dumps({"command": "fake", "features": [], "store": {}}))
    return path


def test_identical_runs_have_p_one(stores, tmp_path):
    for name in ("k1", "k2"):
        run_knn(stores[0], tmp_path / name, KnnOptions(ks=[5]))
    report = compare_runs([tmp_path / "k1", tmp_path / "k2"])
    (pair,) = report["pairs"]
    assert pair["mcnemar_p"] == 1.0 and pair["only_a"] == pair["only_b"] == 0 and pair["difference"] == 0
    assert pair["matched_by"] == "store rows" and pair["n"] == N - N_TRAIN
    assert pair["ci95"][0] < 0 < pair["ci95"][1]
    assert "multiple_comparisons" not in report


def test_constructed_disagreement_gives_the_exact_binomial_p(tmp_path):
    # 50 images both get right, 10 only A, 2 only B, 8 neither
    a = np.array([1] * 50 + [1] * 10 + [0] * 2 + [0] * 8, dtype=bool)
    b = np.array([1] * 50 + [0] * 10 + [1] * 2 + [0] * 8, dtype=bool)
    report = compare_runs([_fake_run(tmp_path / "a", a), _fake_run(tmp_path / "b", b)])
    (pair,) = report["pairs"]
    assert (pair["both_correct"], pair["only_a"], pair["only_b"], pair["both_wrong"]) == (50, 10, 2, 8)
    exact = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12  # two-sided, Bin(12, 1/2), 2 or fewer
    assert pair["mcnemar_p"] == pytest.approx(exact, rel=1e-12)
    assert pair["accuracy_a"] == pytest.approx(60 / 70) and pair["difference"] == pytest.approx(8 / 70)
    assert pair["ci95"][0] < 8 / 70 < pair["ci95"][1]


def test_mismatched_rows_are_refused(stores, tmp_path):
    run_knn(stores[0], tmp_path / "s0", KnnOptions(ks=[5]))
    run_knn(stores[0], tmp_path / "s1", KnnOptions(ks=[5], subset="10%"))  # other train rows, same test rows
    assert compare_runs([tmp_path / "s0", tmp_path / "s1"])["pairs"][0]["matched_by"] == "store rows"
    x, y = _data()
    carved = save_features(
        tmp_path / "c.zarr", {FEATURE: x}, y, {"train": np.arange(N_TRAIN), "test": np.arange(N_TRAIN, N)}
    )
    for seed in (0, 1):  # validation carved out of train with each seed: other val images
        run_knn(carved, tmp_path / f"v{seed}", KnnOptions(ks=[5], seed=seed))
    with pytest.raises(CompareError, match=r"v0 and v1 scored other val images \(15 vs 15, \d+ sample ids shared"):
        compare_runs([tmp_path / "v0", tmp_path / "v1"], split="val")
    unnamed = [_fake_run(tmp_path / n, np.ones(5, bool), fingerprint=n * 64) for n in "cd"]
    unnamed.append(_fake_run(tmp_path / "e", np.ones(6, bool), fingerprint="c" * 64))
    with pytest.raises(CompareError, match="other stores.*do not name their samples"):
        compare_runs(unnamed[:2])
    with pytest.raises(CompareError, match=r"other test rows \(5 vs 6, one store\)"):
        compare_runs([unnamed[0], unnamed[2]])
    with pytest.raises(CompareError, match="no logits.npz"):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "results.json").write_text("{}")
        compare_runs([tmp_path / "s0", tmp_path / "bare"])


def test_rows_are_matched_by_id_across_stores_in_another_order(stores, tmp_path):
    # stores written from arrays share a fingerprint and their test rows are 160..239 in both: only the ids
    # tell that row 160 of one is another image than row 160 of the other
    opts = LogisticOptions(l2s=[1e-2], refit="train")
    ra = run_logistic(stores[0], tmp_path / "a", opts)
    rb = run_logistic(stores[1], tmp_path / "b", opts)
    (pair,) = compare_runs([tmp_path / "a", tmp_path / "b"])["pairs"]
    assert pair["matched_by"] == "sample ids" and pair["n"] == N - N_TRAIN
    assert pair["accuracy_a"] == pytest.approx(ra["metrics"]["test"]["top1"])
    assert pair["accuracy_b"] == pytest.approx(rb["metrics"]["test"]["top1"])
    # the same samples and the same convex fit: image by image the same answers once paired by id
    assert pair["only_a"] == pair["only_b"] == 0 and pair["mcnemar_p"] == 1.0
    # paired by row instead, the shuffled store's answers would disagree
    ids = {"x": list("pqrs"), "y": list("srqp")}
    fake = {n: _fake_run(tmp_path / n, np.array([1, 1, 0, 0], bool), ids=np.array(i)) for n, i in ids.items()}
    (pair,) = compare_runs([fake["x"], fake["y"]])["pairs"]
    assert (pair["matched_by"], pair["only_a"], pair["only_b"]) == ("sample ids", 2, 2)


def test_several_runs_give_every_pair_with_holm(tmp_path):
    rng = np.random.default_rng(0)
    runs = [_fake_run(tmp_path / f"r{i}", rng.random(200) < 0.6 + 0.1 * i) for i in range(3)]
    report = compare_runs(runs)
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [("r0", "r1"), ("r0", "r2"), ("r1", "r2")]
    assert [p["holm_p"] for p in report["pairs"]] == holm([p["mcnemar_p"] for p in report["pairs"]])
    assert all(p["holm_p"] >= p["mcnemar_p"] for p in report["pairs"])
    assert "Holm" in report["multiple_comparisons"]


def test_cli_prints_a_table_or_json_and_writes_json(tmp_path):
    a = _fake_run(tmp_path / "a", np.array([1, 1, 1, 0], bool))
    b = _fake_run(tmp_path / "b", np.array([1, 0, 0, 0], bool))
    runner = CliRunner()
    result = runner.invoke(main, ["probe", "compare", str(a), str(b), "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "McNemar p" in result.output and "Newcombe" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["pairs"][0]["only_a"] == 2
    result = runner.invoke(main, ["probe", "compare", str(a), str(b), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["pairs"][0]["mcnemar_p"] == 0.5
    c = _fake_run(tmp_path / "c", np.ones(5, bool), fingerprint="0" * 64)
    result = runner.invoke(main, ["probe", "compare", str(a), str(c)])
    assert result.exit_code != 0 and "cannot be paired" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_holm_and_the_paired_interval():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    low, high = paired_difference_interval(50, 10, 2, 8)
    assert paired_difference_interval(50, 2, 10, 8) == pytest.approx((-high, -low))
    assert -1 <= low < 8 / 70 < high <= 1
    # no disagreement: an interval around 0, not a point (Wald's would be [0, 0])
    low, high = paired_difference_interval(90, 0, 0, 10)
    assert low < 0 < high
    # large n: close to Wald
    both, only_a, only_b, neither = 8000, 300, 200, 1500
    n = both + only_a + only_b + neither
    d = (only_a - only_b) / n
    se = math.sqrt(only_a + only_b - (only_a - only_b) ** 2 / n) / n
    low, high = paired_difference_interval(both, only_a, only_b, neither)
    assert low == pytest.approx(d - 1.959964 * se, abs=5e-4) and high == pytest.approx(d + 1.959964 * se, abs=5e-4)


def test_the_published_paired_tests_follow_from_the_saved_per_image_results() -> None:
    # docs/results/reproduction_cpu_full.json's McNemar results, recomputed by the same test probe compare runs
    # from the per-image correctness that run saved: a figure in the docs that its file does not give fails here.
    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    correct = np.load(root / "reproduction_cpu_full_test_correct.npz")
    published = json.loads((root / "reproduction_cpu_full.json").read_text())["tests"]
    linear = "final"
    assert len(published) == 8  # README's 7 and random vs pixels
    for pair, figures in published.items():
        a, b = pair.split("_vs_")
        b = linear if b == "linear" else b
        test = mcnemar(correct[a], correct[b])
        assert (test["only_a"], test["only_b"]) == (figures["only_a"], figures["only_b"]), pair
        assert test["p_value"] == pytest.approx(figures["p_value"], rel=1e-9), pair
        assert 100 * (correct[a].mean() - correct[b].mean()) == pytest.approx(figures["diff_points"], abs=1e-9)
