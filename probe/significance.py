"""Paired significance for classifiers scored on the same test items: the exact McNemar test, an interval for
the accuracy difference, and Holm's adjustment when several pairs are tested together."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, norm

__all__ = ["mcnemar", "paired_difference_interval", "holm", "INTERVAL_METHOD"]

INTERVAL_METHOD = (
    "Newcombe (1998) method 10: Wilson score intervals of both accuracies combined with the paired correlation"
)


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


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def paired_difference_interval(
    both: int, only_a: int, only_b: int, neither: int, level: float = 0.95
) -> tuple[float, float]:
    """Interval for accuracy(A) - accuracy(B) (fractions) from the paired 2x2 table (`INTERVAL_METHOD`).

    Unlike the Wald interval it stays inside [-1, 1] and does not collapse to a point when A and B never
    disagree (Newcombe, Statistics in Medicine 17:2635-2650, 1998).
    """
    n = both + only_a + only_b + neither
    if n <= 0 or min(both, only_a, only_b, neither) < 0:
        raise ValueError(
            f"the paired table must hold non-negative counts and n > 0, got {(both, only_a, only_b, neither)}"
        )
    z = float(norm.ppf(0.5 + level / 2))
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = _wilson(both + only_a, n, z)
    l2, u2 = _wilson(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = 0.0 if margins == 0 else (both * neither - only_a * only_b) / math.sqrt(margins)
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2 - lower, p1 - p2 + upper


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error controlled over all the tests, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
