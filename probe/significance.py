"""Paired significance for two classifiers scored on the same test items."""

from __future__ import annotations

import math

import numpy as np


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact (binomial) McNemar test on per-item correctness of two classifiers.

    b = items only A gets right, c = items only B gets right; under H0 (equal accuracy) b ~ Bin(b+c, 1/2).
    Returns the two-sided p-value with b, c and the accuracy difference in points (A - B).
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-d and equal in length, got {a.shape} and {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n = b + c
    k = min(b, c)
    # two-sided exact p: 2 * P(X <= k), X ~ Bin(n, 1/2), summed in log space for large n
    if n == 0:
        p = 1.0
    else:
        logs = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
        ]
        top = max(logs)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(v - top) for v in logs))
    return {"only_a": b, "only_b": c, "p_value": p, "diff_points": 100.0 * (a.mean() - bb.mean()) if a.size else 0.0}
