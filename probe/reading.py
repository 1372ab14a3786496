"""Reading a probe's rows from the store: checked for NaN/inf and standardised while each block is in cache.

The reader decodes each touched chunk once and hands every decoded block to a callback in its decode threads;
the probe's callback flags non-finite values (`probe.finite`) and standardises the block in place, so a
window's buffer is its only copy. Only if a block held NaN/inf are the raw rows read again, to name the first
bad one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np

from extract.store import FeatureStore
from probe.finite import check_rows_finite, flag_not_finite
from probe.stats import FeatureStats

__all__ = ["read_rows", "read_whole"]


def read_rows(
    store: FeatureStore,
    order: np.ndarray,
    arrays: Mapping[str, str],
    stats_of: Callable[[str], FeatureStats],
    sample_ids: Sequence[Any] | None,
    known_finite: Container[str] = (),
) -> dict[str, np.ndarray]:
    """Rows `order` (in that order) of every store array in `arrays` ({result key: array}), checked and
    standardised with `stats_of(array)` (float32). Arrays in `known_finite` are not checked: the caller knows
    these rows of them finite."""
    out: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        stats = stats_of(array)
        not_finite: list[bool] = []
        check = array not in known_finite

        def check_and_standardise(
            block: np.ndarray, stats: FeatureStats = stats, flag: list = not_finite, check: bool = check
        ) -> None:
            # NaN/inf survive standardising (the statistics are finite), and the sum of standardised values
            # does not overflow: checked after it.
            stats.apply(block)
            if check:
                flag_not_finite(flag, block)

        # The window's memory is the reader's: reused by a later window once no batch of it is held.
        x = store.read(array, order, each=check_and_standardise)
        if not_finite:
            check_rows_finite(array, store.read(array, order), order, sample_ids)
        out[key] = x
    return out


def read_whole(store: FeatureStore, array: str, shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """Every row of `array` as raw float32 `shape`, and whether all its values are finite (found while decoding)."""
    not_finite: list[bool] = []
    raw = store.read(array, out=np.empty(shape, np.float32), each=functools.partial(flag_not_finite, not_finite))
    return raw, not not_finite
