"""The IDX file format (MNIST, Fashion-MNIST): typed, shaped arrays, optionally gzip-compressed."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IDXError(ValueError):
    """A file that is not a well-formed IDX file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a whole IDX file (`.gz` or plain) into a native-endian array, checking its size."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise IDXError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise IDXError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path:
    """`stem` or `stem.gz` inside `directory` (the two spellings distributions use)."""
    directory = Path(directory)
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: no {stem}[.gz]. On Debian/Ubuntu run `apt-get install dataset-fashion-mnist`; "
        f"elsewhere download Fashion-MNIST's four IDX files into one folder and pass it as the path"
    )


def load_fashion_mnist(split: str, directory: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the 'train' or 'test' split."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, not {split!r}")
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    images = read_idx(find_idx_file(directory, img_stem))
    labels = read_idx(find_idx_file(directory, lbl_stem)).astype(np.int64)
    if len(images) != len(labels):
        raise IDXError(f"{directory}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels
