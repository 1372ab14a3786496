"""NaN/inf in features read for a probe: found while blocks are decoded, then named by store row.

A store's own record of non-finite values is not trusted (stores come from other teams): probes look for them
in every block they read. Finding them is cheap (`flag_not_finite`, run in the decode threads while a block is
in cache); naming the first bad row reads the rows again and happens only when some turned up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from probe.errors import ProbeDataError

__all__ = ["flag_not_finite", "check_chunk_finite", "check_rows_finite"]


def flag_not_finite(flags: list[bool], block: np.ndarray) -> None:
    """Note (for the caller, after a parallel read) that `block` (float32) may hold NaN or inf.

    One pass: the block's sum is finite iff its values are, unless finite values overflow it (beyond 3.4e38),
    a false alarm the caller's row check then clears. torch's sum took 206 us for 4 MiB against 305 us for
    numpy's isfinite().all() (a boolean copy, then its reduction)."""
    if not math.isfinite(float(torch.from_numpy(block).sum())):
        flags.append(True)


def check_chunk_finite(name: str, x: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    """Raise naming the first store row of `rows` (ascending) whose values in `x` are not all finite."""
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if ok.all():
        return
    bad = np.flatnonzero(~ok)
    row = int(rows[bad[0]])
    sid = f" (sample id {sample_ids[row]!r})" if sample_ids is not None and len(sample_ids) > row else ""
    raise ProbeDataError(
        f"feature {name!r} has NaN or inf values at store row {row}{sid} and {len(bad) - 1} other row(s) "
        f"of this read; the extraction overflowed (float16 storage saturates above 65504) or failed. "
        f"Mark those rows invalid in the store or re-extract them"
    )


def check_rows_finite(name: str, x: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    """Raise naming the lowest store row of `rows` (any order) whose values in `x` are not all finite."""
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not ok.all():
        order = np.argsort(rows, kind="stable")
        check_chunk_finite(name, x[order], rows[order], sample_ids)
