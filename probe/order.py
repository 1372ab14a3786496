"""The order of one epoch over a split's rows, as windows of whole chunks: the rule both of a
`probe.stream.FeatureStream`'s sources (in memory, streamed) and `probe.data.ProbeData.arrays` follow.

Shards in a seeded random order, grouped into windows of about `buffer_rows` split rows, rows shuffled within
each window; unshuffled, store order. The window does not depend on where the rows come from, so both sources
yield bit-identical batches, and a run with the same budget is reproducible on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probe.splits import KEY_ORDER, seeded_rng

__all__ = ["Window", "OrderUnits", "epoch_order"]


@dataclass(frozen=True)
class Window:
    """A read unit of the stream: whole chunks (`chunks`, ascending) and the order of their split rows."""

    chunks: tuple[int, ...]
    order: np.ndarray


@dataclass(frozen=True)
class OrderUnits:
    """What sizes an epoch's order besides the rows and seeds: the unit (`chunk_rows`) and the window
    (`buffer_rows`). Both come from the bytes of a row of every feature read together, so a part of a sweep
    trained on its own (`probe.sweep_worker`) is given the whole sweep's units to see the whole sweep's batches."""

    chunk_rows: int
    buffer_rows: int


def epoch_order(
    rows: np.ndarray, chunk_rows: int, buffer_rows: int, seed: int, epoch: int, shuffle: bool
) -> list[Window]:
    """The order of one epoch over the (sorted) `rows`, as windows of whole chunks.

    Shuffled: chunks in a random order (seeded by seed and epoch), grouped greedily into windows of at
    least `buffer_rows` split rows, rows permuted within each window. Unshuffled: store order. Both the
    in-memory and the streamed source consume this, which is what makes them yield identical batches.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    chunk_of = rows // chunk_rows
    chunk_ids, starts = np.unique(chunk_of, return_index=True)
    groups = np.split(rows, starts[1:])
    rng = seeded_rng(seed, KEY_ORDER, epoch)
    sequence = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    windows: list[Window] = []
    pending: list[int] = []
    count = 0
    for g in sequence:
        pending.append(int(g))
        count += len(groups[g])
        if count >= buffer_rows:
            windows.append(_make_window(pending, chunk_ids, groups, rng, shuffle))
            pending, count = [], 0
    if pending:
        windows.append(_make_window(pending, chunk_ids, groups, rng, shuffle))
    return windows


def _make_window(
    members: list[int], chunk_ids: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator, shuffle: bool
) -> Window:
    order = np.concatenate([groups[g] for g in members])
    if shuffle:
        order = order[rng.permutation(len(order))]
    return Window(tuple(sorted(int(chunk_ids[g]) for g in members)), order)
