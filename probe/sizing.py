"""How much of a store a probe holds at once: in memory or streamed, the shuffle window, the unit of the order.

Peak RSS of a probe stays within `memory_budget` plus a constant:

- the data: in memory, all rows of the features as float32 (<= budget, or it streams); streamed, the window
  being consumed, the one being read ahead and the previous one while its last batch is referenced, each
  under 1.25 x budget / 4 (the shuffle window is the smaller of `shuffle_buffer` and a quarter of the budget,
  and its unit a shard or, when a shard is larger than a sixteenth of the budget, a run of inner chunks of at
  most a quarter window). A window's memory is the reader's: once no batch of it is held, the next window
  reuses it (fresh pages cost more than decoding), and the reader gives free memory back before it
  allocates more, so at most those three windows are ever resident;
- the statistics pass: 3 blocks of `probe.stats.STATS_BLOCK_BYTES` (16 MiB) float32 plus one float64 copy
  of one (~80 MiB), freed before training;
- the reader: ~16 MiB per decode thread (8 MiB of decode scratch, up to 8 MiB of the bytes read from a local
  store; `open_store(workers=...)`, default the cores here);
- the model and heads (parameters, gradients, optimiser state: a 27-head linear sweep on 4,096-d features is
  ~1 MB), one batch and its activations;
- the Python/torch/zarr baseline (485-515 MB peak RSS measured for `diffbank probe linear/sweep` on Linux).

Process-wide malloc settings are left alone: a streamed probe once set glibc's mmap threshold to 1 MiB so
freed windows went back to the OS, which made every batch-sized allocation fresh pages (an in-memory epoch
5x slower in the same process); windows now reuse their memory through the reader, and without the setting
the peak stayed within the bound (linear 578 against 543 MiB, sweep 563 against 545, bound 659 / 692).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from extract.store import FeatureStore
from probe.splits import optional_attr

__all__ = ["row_bytes", "window_bytes", "buffer_rows", "chunk_rows"]


def row_bytes(shapes: Iterable[Sequence[int]]) -> int:
    """Bytes of one row of every feature as float32: what a window holds per row, per noise draw."""
    return sum(math.prod(s) * 4 for s in shapes)


def window_bytes(shuffle_buffer: int, memory_budget: int) -> int:
    """Bytes of one shuffle window: `shuffle_buffer`, at most a quarter of the memory budget.

    A streamed epoch holds up to three windows at once (the one being consumed, the one read ahead, and
    the previous one while its last batch is still referenced), each under 1.25 quarters (a window
    overshoots by less than one unit, see `chunk_rows`), so the data stays within the budget.
    """
    return min(shuffle_buffer, memory_budget // 4)


def buffer_rows(unit_rows: int, window: int, row: int) -> int:
    """Shuffle window in rows: what `window` bytes hold at `row` bytes a row, at least one unit.

    It depends on the features, `shuffle_buffer` and the memory budget, never on the mode, so a run gives
    the same batches on a machine that streams and on one that holds everything in memory (and the same
    as before budgets sized windows whenever the budget is at least 4 x `shuffle_buffer` and a shard at most
    a sixteenth of it).
    """
    return max(unit_rows, window // max(1, row))


def chunk_rows(store: FeatureStore, feature: str, row: int, memory_budget: int, window: int) -> int:
    """The unit of `epoch_order`: a shard, or a run of inner chunks when a shard is large for the budget.

    Whole shards (the order of every earlier run) whenever a shard's float32 rows fit a sixteenth of the
    memory budget; under a smaller budget the largest multiple of the inner chunk (of `feature`) that fits a
    quarter of the window (at least one inner chunk), so a window (< buffer rows + one unit) stays near its
    share of the budget.
    """
    shard = optional_attr(store, "shard_rows")
    if shard:
        shard = int(shard)
        if shard * row <= memory_budget // 16:
            return shard
        limit = window // 4
        array = getattr(store, "array", None)
        inner = int(array(feature).chunks[0]) if array is not None else shard
        inner = max(1, min(inner, shard))
        return max(inner, limit // max(1, row) // inner * inner)
    first = store.to_dask(feature)
    return int(first.chunks[0][0]) if first.chunks[0] else 1
