"""Paired significance for two classifiers scored on the same test items."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """Exact (binomial) McNemar test on per-item correctness of two classifiers.

    b = items only A gets right, c = items only B gets right; under H0 (equal accuracy) b ~ Bin(b+c, 1/2).
    Returns the two-sided p-value (`scipy.stats.binomtest`) with b, c and the accuracy difference in points
    (A - B).
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise ValueError(f"correctness vectors must be 1-d and equal in length, got {a.shape} and {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"only_a": b, "only_b": c, "p_value": p, "diff_points": 100.0 * (a.mean() - bb.mean()) if a.size else 0.0}
