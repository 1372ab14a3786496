"""Batches of cached features, in a seeded order: the interface every probe trains from.

`BatchStream` is the protocol the trainer reads; `ArrayStream` serves numpy arrays from memory (tests and the
scikit-learn estimators); `probe.data.FeatureStream` serves a Zarr store, in memory or shard by shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["BatchStream", "ArrayStream"]


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
            raise ValueError(f"labels must be a 1-d integer array of class indices, got dtype {y.dtype}, shape {y.shape}")
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
