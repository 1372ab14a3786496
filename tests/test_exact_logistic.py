"""Exact logistic probe against scikit-learn's solver, and the McNemar test against scipy's binomial test."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from probe.exact_logistic import fit_logistic, logistic_path
from probe.significance import mcnemar


def _digits():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.tensor(x, dtype=torch.float64), torch.tensor(y)


def test_matches_sklearn_logistic_regression():
    x, y = _digits()
    l2 = 1e-2
    fit = fit_logistic(x, y, 10, l2, tol=1e-9, max_iter=1000)
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=5000).fit(x.numpy(), y.numpy())
    ours = fit.logits(x).argmax(1).numpy()
    assert (ours == ref.predict(x.numpy())).mean() >= 0.995
    # same objective: sklearn's coefficients give (nearly) the same loss, never a lower one
    w = torch.tensor(ref.coef_.T)
    b = torch.tensor(ref.intercept_)
    ref_loss = float(torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum())
    assert fit.loss <= ref_loss + 1e-6
    assert fit.loss == pytest.approx(ref_loss, rel=1e-4)


def test_path_prefers_weaker_regularisation_on_separable_data_and_is_ordered():
    x, y = _digits()
    path = logistic_path(x[:1200], y[:1200], x[1200:], y[1200:], 10, [1e-4, 1.0, 1e-2])
    assert [f.l2 for f, _ in path] == [1.0, 1e-2, 1e-4]
    accs = [a for _, a in path]
    assert accs[-1] > accs[0] and accs[-1] > 0.9


def test_mcnemar_exact_values():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.8
    b = rng.random(500) < 0.75
    res = mcnemar(a, b)
    n_ab, n_ba = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (res["only_a"], res["only_b"]) == (n_ab, n_ba)
    # exact two-sided p of Bin(n, 1/2): twice the smaller tail
    n, k = n_ab + n_ba, min(n_ab, n_ba)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    assert res["p_value"] == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar(a, b[:10])
