"""The labelled images DifFeed trains on, keyed by their global index (which also keys their noise)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from probe.splits import carve_validation


class ImageSet:
    """Labelled images by key: `load(keys) -> float32 (n, 3, H, W)` in [-1, 1].

    `keys` are the samples' global indices (in the source), which also key their noise, so a sample keeps its
    noise whatever subset or order it is used in.
    """

    def __init__(self, labels: np.ndarray, keys: np.ndarray, load: Callable[[np.ndarray], Any]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)
        if self.labels.shape != self.keys.shape or self.labels.ndim != 1:
            raise ValueError(f"labels {self.labels.shape} and keys {self.keys.shape} must be equal 1-d arrays")
        self._load = load

    @classmethod
    def from_array(
        cls, images: np.ndarray | torch.Tensor, labels: np.ndarray, keys: np.ndarray | None = None
    ) -> ImageSet:
        """Images already preprocessed, float32 (N, 3, H, W); `keys` default to their row numbers."""
        array = torch.as_tensor(images, dtype=torch.float32)
        keys = np.arange(len(array)) if keys is None else np.asarray(keys, dtype=np.int64)
        position = {int(k): i for i, k in enumerate(keys)}
        return cls(labels, keys, lambda ks: array[torch.as_tensor([position[int(k)] for k in ks])])

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> ImageSet:
        positions = np.asarray(positions, dtype=np.int64)
        return ImageSet(self.labels[positions], self.keys[positions], self._load)

    def images(self, positions: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self._load(self.keys[np.asarray(positions, dtype=np.int64)]), dtype=torch.float32)

    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.keys).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]


def validation_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): a seeded, stratified `fraction` of `data` held out for selection."""
    positions = np.arange(len(data), dtype=np.int64)
    kept, held = carve_validation(positions, data.labels, fraction, seed)  # the store probes' rule
    return data.subset(kept), data.subset(held)
