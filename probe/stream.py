"""Batches of cached features, in a seeded order: the interface every probe trains from.

`BatchStream` is the protocol the trainer reads; `ArrayStream` serves numpy arrays from memory (tests and the
scikit-learn estimators); `FeatureStream` serves a `probe.data.ProbeData` (a Zarr store), in memory or window
by window.

One function (`probe.order.epoch_order`) fixes an epoch's order in both of FeatureStream's modes, with windows of
about `ProbeData.window_bytes()` (`shuffle_buffer`, at most a quarter of the memory budget; the whole split when
it is smaller).

Noise draws (a store that keeps K apart): a FeatureStream reads draw e mod K in epoch e ("rotate", training),
draw 0 ("first") or every draw ("mean": batches carry each draw's array too, and `draw_inputs` tells
`probe.evaluation` how to average the heads' logits over them). The order never depends on the draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from probe.data import ProbeData
from probe.errors import ProbeDataError
from probe.order import Window, epoch_order

__all__ = ["BatchStream", "ArrayStream", "FeatureStream", "DRAW_MODES"]

DRAW_MODES = ("rotate", "first", "mean")


@runtime_checkable
class BatchStream(Protocol):
    """One split of a cached dataset, served in batches.

    - `num_samples`: the number of samples one full iteration yields.
    - `set_epoch(epoch)`: fixes the order of the next iteration; a shuffling stream must give the same order for
      the same (seed, epoch) (this is what makes runs reproducible and resumable), a non-shuffling one ignores it.
    - `__iter__()`: yields `(xs, y)` with `xs: dict[str, torch.Tensor]` (feature name -> float32 CPU tensor,
      batch first, e.g. (B, C, H, W) or (B, D)) and `y: torch.Tensor` int64 (B,), class indices 0..K-1.
      Every batch carries the same feature names. Standardisation, if any, is the stream's job.
    """

    @property
    def num_samples(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]: ...


class ArrayStream:
    """In-memory `BatchStream` over numpy arrays.

    `arrays` maps feature names to arrays sharing the first axis with `labels` (int class indices 0..K-1).
    With `shuffle=True` the order of epoch e is a permutation drawn from a torch.Generator seeded from
    (seed, e) alone, so it does not depend on how many epochs ran before (resume-safe).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray | Sequence[int],
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not arrays:
            raise ValueError("arrays must hold at least one feature")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        y = np.asarray(labels)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-d integer array of class indices, got dtype {y.dtype}, shape {y.shape}"
            )
        if y.size and y.min() < 0:
            raise ValueError("labels must be class indices >= 0")
        self.arrays: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.ndim < 2 or arr.shape[0] != y.shape[0]:
                raise ValueError(
                    f"feature {name!r} has shape {arr.shape}; expected (N, ...) with N = {y.shape[0]} labels"
                )
            self.arrays[str(name)] = arr
        self.labels = torch.from_numpy(y.astype(np.int64))
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self._epoch = 0

    @property
    def num_samples(self) -> int:
        n = int(self.labels.shape[0])
        return n - n % self.batch_size if self.drop_last else n

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        # SeedSequence mixes (seed, epoch) into well-separated streams; a torch.Generator draws the permutation.
        state = int(np.random.SeedSequence([self.seed, self._epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.randperm(self.labels.shape[0], generator=torch.Generator().manual_seed(state))

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n = int(self.labels.shape[0])
        order = self._order()
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if self.drop_last and stop - start < self.batch_size:
                break
            if order is None:
                xs = {k: _to_tensor(a[start:stop]) for k, a in self.arrays.items()}
                yield xs, self.labels[start:stop]
            else:
                idx = order[start:stop]
                idx_np = idx.numpy()
                yield {k: _to_tensor(a[idx_np]) for k, a in self.arrays.items()}, self.labels[idx]


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class FeatureStream:
    """A `BatchStream`: `(xs: {name: float32 tensor (B, C, H, W)}, y: int64 tensor (B,))` batches of one split.

    Backed either by in-memory standardised arrays or by the store itself (read window by window, the next
    window prefetched in a thread while the current one is consumed). Call `set_epoch` before iterating
    to get that epoch's order; the order depends on (seed, epoch) only.

    `seed` defaults to the data's seed. `draws`: "rotate" (epoch e reads draw e mod K), "first" (draw 0) or
    "mean" (every draw, for logits averaged over them); default "rotate" for the train split and the data's
    `eval_draws` for the others.
    """

    def __init__(
        self,
        data: ProbeData,
        split: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        buffer_rows: int | None = None,
        drop_last: bool = False,
        prefetch: bool = True,
        draws: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ProbeDataError(f"batch_size must be >= 1, got {batch_size}")
        draws = draws or ("rotate" if split == "train" else data.eval_draws)
        if draws not in DRAW_MODES:
            raise ProbeDataError(f"draws={draws!r}: choose one of {', '.join(DRAW_MODES)}")
        self._data = data
        self.split = split
        self.rows = data.rows(split)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = data.seed if seed is None else int(seed)
        self.drop_last = bool(drop_last)
        self.prefetch = bool(prefetch)
        self.draws = draws
        # A "mean" window holds every draw of its rows: K times fewer rows keep it within its memory share.
        # (Evaluation streams are unshuffled, so the window size changes no order.)
        reads = data.draws if draws == "mean" else 1
        self.buffer_rows = (
            int(buffer_rows) if buffer_rows else max(data.chunk_rows, data.default_buffer_rows() // reads)
        )
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples one full iteration yields (a dropped last partial batch is not counted)."""
        n = len(self.rows)
        return n - n % self.batch_size if self.drop_last else n

    @property
    def in_memory(self) -> bool:
        return self._data.in_memory

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def draw(self) -> int | None:
        """The noise draw this epoch reads; None when it reads every draw ("mean")."""
        if self.draws == "mean":
            return None
        return self._data.train_draw(self.epoch) if self.draws == "rotate" else 0

    @property
    def draw_inputs(self) -> list[dict[str, str]] | None:
        """For "mean" over K > 1 draws: per draw, feature name -> the batch key holding that draw; else None."""
        if self.draws != "mean" or self._data.draws == 1:
            return None
        arrays = {n: self._data.draw_arrays(n) for n in self._data.features}
        return [{n: a[d] for n, a in arrays.items()} for d in range(self._data.draws)]

    def _sources(self) -> dict[str, str]:
        """Batch key -> store array: the features under their own names, plus the other draws' arrays for "mean"."""
        data = self._data
        if self.draws == "mean":
            return {a: a for n in data.features for a in data.draw_arrays(n)}
        draw = self.draw or 0
        return {n: data.draw_arrays(n)[draw] for n in data.features}

    def windows(self) -> list[Window]:
        return epoch_order(self.rows, self._data.chunk_rows, self.buffer_rows, self.seed, self.epoch, self.shuffle)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        windows = self.windows()
        sources = self._sources()
        if self._data.in_memory:
            yield from self._memory_batches(windows, sources)
        else:
            yield from self._batches(self._store_windows(windows, sources))

    def _memory_batches(
        self, windows: list[Window], sources: dict[str, str]
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # Gather batch by batch from the resident arrays: no second copy of the split per epoch.
        order = np.concatenate([w.order for w in windows]) if windows else np.empty(0, np.int64)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        arrays = self._data.memory_arrays()
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield (
                {key: torch.from_numpy(arrays[a][idx]) for key, a in sources.items()},
                torch.from_numpy(self._data.all_labels[idx]),
            )

    def _store_windows(
        self, windows: list[Window], sources: dict[str, str]
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        read = self._data.read_window
        if not self.prefetch or len(windows) <= 1:
            for w in windows:
                yield read(w, sources), self._data.all_labels[w.order]
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-prefetch") as pool:
            pending: Future = pool.submit(read, windows[0], sources)
            for i, w in enumerate(windows):
                xs = pending.result()
                if i + 1 < len(windows):
                    pending = pool.submit(read, windows[i + 1], sources)
                yield xs, self._data.all_labels[w.order]

    def _batches(
        self, source: Iterator[tuple[dict[str, np.ndarray], np.ndarray]]
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # A batch that spans two windows is assembled from its two parts alone: concatenating the carried
        # rows with the whole next window would hold a third window-sized copy.
        carry: tuple[dict[str, np.ndarray], np.ndarray] | None = None
        bs = self.batch_size
        for xs, y in source:
            start = 0
            if carry is not None:
                start = min(bs - len(carry[1]), len(y))
                xs_c = {n: np.concatenate([carry[0][n], a[:start]]) for n, a in xs.items()}
                y_c = np.concatenate([carry[1], y[:start]])
                if len(y_c) < bs:
                    carry = (xs_c, y_c)
                    continue
                carry = None
                yield {n: torch.from_numpy(a) for n, a in xs_c.items()}, torch.from_numpy(y_c)
            full = start + (len(y) - start) - (len(y) - start) % bs
            for lo in range(start, full, bs):
                yield (
                    {n: torch.from_numpy(np.ascontiguousarray(a[lo : lo + bs])) for n, a in xs.items()},
                    torch.from_numpy(np.ascontiguousarray(y[lo : lo + bs])),
                )
            # The carried rows are copied so the window they came from can be freed.
            carry = ({n: a[full:].copy() for n, a in xs.items()}, y[full:].copy()) if full < len(y) else None
        if carry is not None and not self.drop_last:
            yield (
                {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in carry[0].items()},
                torch.from_numpy(np.ascontiguousarray(carry[1])),
            )
