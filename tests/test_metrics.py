"""probe/metrics.py: metrics against scikit-learn; the one selection rule."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score, top_k_accuracy_score

from probe.metrics import classification_metrics, select_best, selection_rank


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 400)
    scores = rng.normal(size=(400, 8)) + np.eye(8)[y] * 1.5
    m = classification_metrics(y, scores, class_names=[f"c{i}" for i in range(8)])
    pred = scores.argmax(1)
    assert m["top1"] == pytest.approx(accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=np.arange(8)))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=np.arange(8)).tolist()
    np.testing.assert_allclose(m["per_class_accuracy"], recall_score(y, pred, average=None, labels=np.arange(8)))
    assert m["mean_per_class_accuracy"] == pytest.approx(np.mean(m["per_class_accuracy"]))


def test_absent_class_is_null_and_few_classes_cap_topk():
    m = classification_metrics(np.array([0, 0, 1]), np.array([[2.0, 1, 0], [0, 1, 2], [0, 3, 1]]))
    assert m["per_class_accuracy"] == [0.5, 1.0, None] and m["top5_k"] == 3 and m["top5"] == 1.0


def test_logistic_scores_with_minus_inf_columns():
    # a class absent from train has -inf scores; it ranks last, as in the raw scores
    scores = np.array([[0.0, -np.inf, 1, 2, 3, 4, 5], [5.0, -np.inf, 4, 3, 2, 1, 0]])
    m = classification_metrics(np.array([0, 0]), scores)
    assert m["top5_k"] == 5 and m["top5"] == 0.5 and m["top1"] == 0.5


def test_selection_rule():
    rows = [("a", 0.8, 0.5), ("b", 0.9, 0.7), ("c", 0.9, 0.6), ("d", 0.9, 0.6), ("e", None, 0.1)]
    best = select_best(rows, lambda r: selection_rank(r[1], r[2]))
    assert best[0] == "c"  # val top-1, then val loss, then the earlier candidate
    assert select_best([], lambda r: selection_rank(None)) is None
    assert selection_rank(0.5, float("nan")) < selection_rank(0.5, 10.0)
