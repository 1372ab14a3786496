"""The reference preprocessing of guided-diffusion.

`center_crop_arr` reproduces guided-diffusion's `image_datasets.center_crop_arr` step for step:
BOX halvings while the short side is at least twice the target (cheap, alias-free shrinking of
large photos), one BICUBIC resize that brings the short side to the target (sizes rounded with
Python's `round`), then a centre crop. Small images (Fashion-MNIST's 28 -> 32) take the same
bicubic step upwards. Pixels then map from uint8 to float32 [-1, 1] as `x / 127.5 - 1`, CHW.

The extraction loop keeps images as uint8 (`pixels`) until they reach the compute device
(`batch_to_model_range`): a quarter of the bytes to copy, and the same float32 values bit for bit
(IEEE division is correctly rounded in numpy and torch alike; tests check all 256 values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

PREPROCESSING = ("reference",)


def _as_pil_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("RGB")  # uint8 2-d: mode L
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    raise ValueError(f"expected an image of shape (H, W[, 1|3|4]), got {arr.shape}")


def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
    """guided-diffusion's resize-and-centre-crop: uint8 (image_size, image_size, 3).

    `image` is a PIL image or a uint8 array (H, W[, C]); grayscale and RGBA become RGB.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    pil = _as_pil_rgb(image)
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize((pil.width // 2, pil.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _scale(x: Any) -> Any:
    return x / 127.5 - 1  # the reference's uint8 -> [-1, 1]


def to_model_range(arr: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW in [-1, 1], as the reference scales pixels."""
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(_scale(arr.astype(np.float32)).transpose(2, 0, 1))


def batch_to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (m, S, S, 3) on any device -> float32 (m, 3, S, S) in [-1, 1], equal to `to_model_range`."""
    import torch  # here only: loader processes import this module and need no torch

    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    return _scale(pixels.permute(0, 3, 1, 2).float()).contiguous()


def reference(image: Any, image_size: int) -> np.ndarray:
    """The reference preprocessing end to end: float32 (3, image_size, image_size) in [-1, 1]."""
    return to_model_range(center_crop_arr(image, image_size))


def pixels(image: Any, image_size: int, method: str = "reference") -> np.ndarray:
    """A spec's `dataset.preprocess` up to the model's pixels: uint8 (image_size, image_size, 3)."""
    if method == "reference":
        return center_crop_arr(image, image_size)
    raise ValueError(f"unknown preprocessing {method!r}; choose one of {', '.join(PREPROCESSING)}")


def preprocess(image: Any, image_size: int, method: str = "reference") -> np.ndarray:
    """A spec's `dataset.preprocess` end to end: float32 (3, image_size, image_size) in [-1, 1]."""
    return to_model_range(pixels(image, image_size, method))
