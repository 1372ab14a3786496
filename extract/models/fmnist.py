"""The embedded Fashion-MNIST model: its architecture and its training data, in one place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.idx import FASHION_MNIST_DIR, load_fashion_mnist
from extract.preprocess import reference

NAME = "fmnist32"
# A CPU-sized unconditional ADM: the same code as the released models, 32x32 input, ~1.9M parameters.
FLAGS: dict[str, Any] = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 2,
    "channel_mult": "1,2,2",
    "attention_resolutions": "8",
    "num_head_channels": 32,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "learn_sigma": False,
    "dropout": 0.0,
}


def training_images(directory: str | os.PathLike = FASHION_MNIST_DIR, limit: int | None = None) -> torch.Tensor:
    """Fashion-MNIST's training split, preprocessed exactly as extraction will see it: (N, 3, 32, 32) in [-1, 1]."""
    images, _ = load_fashion_mnist("train", Path(directory))
    if limit is not None:
        images = images[:limit]
    out = np.stack([reference(img, FLAGS["image_size"]) for img in images])
    return torch.from_numpy(out)
