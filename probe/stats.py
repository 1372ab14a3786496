"""Standardisation statistics from the train rows only, in one out-of-core float64 pass, checked for NaN/inf.

Mode `"dim"` standardises every element of the (C, H, W) map: what a linear head or a logistic regression
wants (the paper's linear head has no normalisation of its own). `"channel"` shares one mean/std per channel
across positions, which keeps the spatial structure token heads see; `"none"` passes values through.
Dimensions without spread get std 1 instead of a division by ~0. Statistics are cached per store object.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from probe.errors import ProbeDataError
from probe.recipe import STANDARDIZE_MODES
from probe.splits import rows_digest

__all__ = ["FeatureStats", "compute_stats", "check_chunk_finite", "cached_stats"]


@dataclass(frozen=True)
class FeatureStats:
    """Train-split standardisation statistics of one feature (float32, broadcastable to one sample)."""

    mean: np.ndarray
    std: np.ndarray
    mode: str
    rows_digest: str
    count: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Standardise a float32 batch in place (and return it); identical bits whatever the batch."""
        if self.mode != "none":
            x -= self.mean
            x /= self.std
        return x


def _reduce_axes(ndim: int, mode: str) -> tuple[int, ...]:
    if mode == "channel" and ndim >= 3:
        return (0, *range(2, ndim))
    return (0,)


def compute_stats(
    name: str, source: da.Array, rows: np.ndarray, mode: str, sample_ids: Sequence[Any] | None = None
) -> FeatureStats:
    """Mean/std over `rows` of a dask array (chunked along rows), in float64, checking finiteness.

    One dask pass computes the moments and a per-row finiteness flag together, so a NaN or inf is found
    in the same read that would have used it, and reported with its store row.
    """
    if mode not in STANDARDIZE_MODES:
        raise ProbeDataError(f"standardize={mode!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
    x = source[rows]
    finite = da.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if mode == "none":
        (ok,) = dask.compute(finite)
        _raise_if_not_finite(name, ok, rows, sample_ids)
        shape = (1,) * (x.ndim - 1)
        return FeatureStats(np.zeros(shape, np.float32), np.ones(shape, np.float32), mode, rows_digest(rows), len(rows))
    axes = _reduce_axes(x.ndim, mode)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    ok, mean, var = dask.compute(finite, mean, var)
    _raise_if_not_finite(name, ok, rows, sample_ids)
    std = np.sqrt(var)
    # A constant dimension carries no information; dividing by ~0 would only amplify rounding noise.
    tiny = std <= 1e-6 * max(float(np.max(std, initial=0.0)), 1e-12)
    std = np.where(tiny, 1.0, std)
    return FeatureStats(mean[0].astype(np.float32), std[0].astype(np.float32), mode, rows_digest(rows), len(rows))


def _raise_if_not_finite(name: str, ok: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    bad = np.flatnonzero(~np.asarray(ok))
    if len(bad) == 0:
        return
    row = int(rows[bad[0]])
    sid = f" (sample id {sample_ids[row]!r})" if sample_ids is not None and len(sample_ids) > row else ""
    raise ProbeDataError(
        f"feature {name!r} has NaN or inf values at store row {row}{sid} and {len(bad) - 1} other row(s) "
        f"of this read; the extraction overflowed (float16 storage saturates above 65504) or failed. "
        f"Mark those rows invalid in the store or re-extract them"
    )


def check_chunk_finite(name: str, x: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not ok.all():
        _raise_if_not_finite(name, ok, rows, sample_ids)


# Statistics are cached per store object: a second ProbeData on the same store and train rows (e.g. a
# logistic sweep after a linear run in one session) does not read the train split again.
_STATS_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], FeatureStats]] = weakref.WeakKeyDictionary()


def cached_stats(store: Any) -> dict[tuple[str, str, str], FeatureStats]:
    try:
        return _STATS_CACHE.setdefault(store, {})
    except TypeError:  # an object that cannot be weakly referenced: no cross-object cache
        return {}
