"""Linear CKA (Kornblith et al. 2019) between feature sets, full-batch and as the minibatch estimator of
Nguyen, Raghu & Kornblith (2021, "Do wide and deep networks learn the same things?").

The minibatch estimator averages the unbiased HSIC (Song et al. 2012) of each minibatch's linear Gram
matrices, then forms CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) from the averages: memory is
O(batch²) per feature whatever N is, and with the unbiased HSIC the estimate does not drift with the
batch size the way averaging biased per-batch CKA values would.

Unbiased HSIC is an inner product of U-centred Gram matrices (Székely & Rizzo 2014): with K̃ the Gram
matrix with its diagonal zeroed, U(K)_ij = K̃_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) off the
diagonal (r the row sums, s the total) and 0 on it, HSIC_1(K, L) = <U(K), U(L)> / (n(n-3)). So all
pairs of F features cost one (F, n²) x (n², F) product per minibatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_BATCH = 4  # the unbiased HSIC divides by n - 3


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(len(x), -1)


def linear_gram(x: np.ndarray) -> np.ndarray:
    """X Xᵀ of the rows (float64), the feature's shape flattened."""
    x = _flat(x).astype(np.float64, copy=False)
    return x @ x.T


def u_centered(gram: np.ndarray) -> np.ndarray:
    """The U-centred Gram matrix: <U(K), U(L)> / (n(n-3)) is Song et al.'s unbiased HSIC."""
    n = len(gram)
    if n < MIN_BATCH:
        raise ValueError(f"the unbiased HSIC needs at least {MIN_BATCH} rows, got {n}")
    k = gram.astype(np.float64, copy=True)
    np.fill_diagonal(k, 0.0)
    rows = k.sum(axis=1)
    total = rows.sum()
    k -= rows[:, None] / (n - 2)
    k -= rows[None, :] / (n - 2)
    k += total / ((n - 1) * (n - 2))
    np.fill_diagonal(k, 0.0)
    return k


def hsic_unbiased(k: np.ndarray, l_gram: np.ndarray) -> float:
    n = len(k)
    return float(np.vdot(u_centered(k), u_centered(l_gram)) / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray, *, debiased: bool = False) -> float:
    """Full-batch linear CKA of two row-aligned feature sets. debiased: from the unbiased HSIC (the
    minibatch estimator with one batch of every row); else Kornblith et al.'s centred-Gram form."""
    x, y = _flat(x).astype(np.float64), _flat(y).astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same rows in both: {len(x)} vs {len(y)}")
    if debiased:
        k, l_gram = linear_gram(x), linear_gram(y)
        return hsic_unbiased(k, l_gram) / np.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l_gram, l_gram))
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


class MinibatchCKA:
    """Accumulates the unbiased HSIC of every (row feature, column feature) pair over minibatches.

    `update(rows, cols)` takes one minibatch: a list of arrays (n, ...) for the row features and one for
    the column features (the same list for a store against itself); `cka_` is the (rows x cols) matrix.
    """

    def __init__(self) -> None:
        self.cross_: np.ndarray | None = None
        self.self_rows_: np.ndarray | None = None
        self.self_cols_: np.ndarray | None = None
        self.batches_ = 0
        self.rows_seen_ = 0

    @staticmethod
    def _centered(features: Sequence[np.ndarray]) -> np.ndarray:
        n = len(features[0])
        out = np.empty((len(features), n * n), dtype=np.float64)
        for i, x in enumerate(features):
            if len(x) != n:
                raise ValueError(f"every feature of a minibatch needs its {n} rows, one has {len(x)}")
            out[i] = u_centered(linear_gram(x)).ravel()
        return out

    def update(self, rows: Sequence[np.ndarray], cols: Sequence[np.ndarray] | None = None) -> MinibatchCKA:
        n = len(rows[0])
        scale = 1.0 / (n * (n - 3)) if n >= MIN_BATCH else 0.0
        a = self._centered(rows)
        b = a if cols is None else self._centered(cols)
        if len(b[0]) != len(a[0]):
            raise ValueError("the row and column features of a minibatch need the same rows")
        cross = (a @ b.T) * scale
        self_a = np.einsum("ij,ij->i", a, a) * scale
        self_b = self_a if cols is None else np.einsum("ij,ij->i", b, b) * scale
        if self.cross_ is None:
            self.cross_, self.self_rows_, self.self_cols_ = cross, self_a.copy(), self_b.copy()
        else:
            self.cross_ += cross
            self.self_rows_ += self_a
            self.self_cols_ += self_b
        self.batches_ += 1
        self.rows_seen_ += n
        return self

    @property
    def cka_(self) -> np.ndarray:
        if self.cross_ is None or self.self_rows_ is None or self.self_cols_ is None:  # all set by one update
            raise ValueError("no minibatch seen yet: call update first")
        # The 1/batches of the averages cancels in the ratio.
        denom = np.sqrt(np.outer(self.self_rows_, self.self_cols_))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, self.cross_ / denom, np.nan)
