"""Images -> preprocessed uint8 pixels, in this process or in loader processes.

Pillow holds the GIL while it decodes a JPEG (measured: decoding ran at 417 images/s on one thread and
423 on two, while bicubic resizing went from 198 to 436), so threads cannot scale the decode: with
`num_workers > 0` images are decoded and preprocessed in that many processes, each holding the source
from its start, and only (indices -> uint8 pixels) travel. What runs in them imports no torch.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from extract.preprocess import pixels
from extract.sources import ImageSource


@dataclass
class LoadedPixels:
    unit: int
    offset: int  # first row of this micro-batch inside the unit
    indices: np.ndarray  # global sample indices
    pixels: np.ndarray  # (m, S, S, 3) uint8; zeros for failed images
    ids: list[str]
    errors: list[str]  # "" for good rows, else why the image failed


def load_pixels(
    source: ImageSource, image_size: int, method: str, unit: int, offset: int, indices: np.ndarray
) -> LoadedPixels:
    out = np.zeros((len(indices), image_size, image_size, 3), dtype=np.uint8)
    errors: list[str] = []
    ids: list[str] = []
    for row, index in enumerate(indices):
        item = source.load_rgb(int(index))
        ids.append(item.sample_id)
        if item.error is None:
            try:
                out[row] = pixels(item.image, image_size, method)
            except Exception as exc:  # a decodable image that preprocessing cannot take is a failure too
                errors.append(f"preprocess: {type(exc).__name__}: {exc}")
                continue
            errors.append("")
        else:
            errors.append(item.error)
    return LoadedPixels(unit, offset, indices, out, ids, errors)


# What a loader process holds from its start: (source, image_size, method).
_WORKER_STATE: tuple[ImageSource, int, str] | None = None


def _init_worker(source: ImageSource, image_size: int, method: str) -> None:
    global _WORKER_STATE
    _WORKER_STATE = (source, image_size, method)


def _load_in_worker(unit: int, offset: int, indices: np.ndarray) -> LoadedPixels:
    assert _WORKER_STATE is not None, "loader process started without its source"
    source, image_size, method = _WORKER_STATE
    return load_pixels(source, image_size, method, unit, offset, indices)


def _context() -> multiprocessing.context.BaseContext:
    """fork on Linux, as PyTorch's DataLoader does: the child only decodes (no torch, no OpenMP, no
    locks of the parent's threads), it inherits the source without pickling, and a caller's script
    needs no `if __name__ == "__main__"` guard. spawn elsewhere (there the guard is needed)."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


class Loader:
    """`submit(unit, offset, indices)` -> future of LoadedPixels, from threads or processes."""

    def __init__(self, source: ImageSource, image_size: int, method: str, processes: int, threads: int = 2):
        self.processes = processes
        if processes > 0:
            self._pool: Executor = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=_context(),
                initializer=_init_worker,
                initargs=(source, image_size, method),
            )
            self._fn = _load_in_worker
        else:
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diffbank-load")
            self._source, self._size, self._method = source, image_size, method
            self._fn = self._load_here

    def _load_here(self, unit: int, offset: int, indices: np.ndarray) -> LoadedPixels:
        return load_pixels(self._source, self._size, self._method, unit, offset, indices)

    def submit(self, unit: int, offset: int, indices: np.ndarray):  # noqa: ANN201 - a concurrent.futures.Future
        return self._pool.submit(self._fn, unit, offset, indices)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
