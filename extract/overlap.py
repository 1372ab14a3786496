"""Overlap I/O with the U-Net: images load in background threads ahead of the compute, and finished
units are compressed and written by a writer thread behind it."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from extract.compute import ExtractionError
from extract.preprocess import pixels
from extract.sources import ImageSource
from extract.store import StoreWriter

# Testing hook: seconds to sleep after each unit is marked, so a test can kill a run mid-way.
UNIT_DELAY_ENV = "DIFFBANK_DEBUG_UNIT_DELAY"


@dataclasses.dataclass
class Batch:
    unit: int
    offset: int  # first row of this micro-batch inside the unit
    indices: np.ndarray  # global sample indices
    pixels: torch.Tensor  # (m, S, S, 3) uint8 after preprocessing (pinned for a CUDA run); 0 for failed images
    ids: list[str]
    errors: list[str]  # "" for good rows, else why the image failed


def load_batch(
    source: ImageSource,
    image_size: int,
    method: str,
    pin: bool,
    unit: int,
    offset: int,
    indices: np.ndarray,
) -> Batch:
    size = image_size
    batch = torch.zeros((len(indices), size, size, 3), dtype=torch.uint8, pin_memory=pin)
    out = batch.numpy()
    errors: list[str] = []
    ids: list[str] = []
    for row, index in enumerate(indices):
        item = source.load_rgb(int(index))
        ids.append(item.sample_id)
        if item.error is None:
            try:
                out[row] = pixels(item.image, size, method)
            except Exception as exc:  # a decodable image that preprocessing cannot take is a failure too
                errors.append(f"preprocess: {type(exc).__name__}: {exc}")
                continue
            errors.append("")
        else:
            errors.append(item.error)
    return Batch(unit, offset, indices, batch, ids, errors)


def plan_batches(writer: StoreWriter, units: Sequence[int], micro_batch: int) -> list[tuple[int, int, np.ndarray]]:
    out = []
    for unit in units:
        start, stop = writer.unit_rows(unit)
        for lo in range(start, stop, micro_batch):
            out.append((unit, lo - start, np.arange(lo, min(stop, lo + micro_batch), dtype=np.int64)))
    return out


def prefetch(pool_: ThreadPoolExecutor, fn: Any, jobs: Sequence[tuple[Any, ...]], depth: int) -> Iterator[Any]:
    """Results of fn(*job) in order, with at most `depth` jobs in flight."""
    pending: list[Future] = []
    it = iter(jobs)
    for job in it:
        pending.append(pool_.submit(fn, *job))
        if len(pending) >= depth:
            break
    while pending:
        fut = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool_.submit(fn, *nxt))
        yield fut.result()


class UnitWriter:
    """Writes finished units in a background thread so the U-Net never waits on compression."""

    def __init__(self, writer: StoreWriter, max_queued: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self.written: list[int] = []
        self.seconds = 0.0
        self._delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
        self._thread = threading.Thread(target=self._loop, name="diffbank-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            unit, arrays, valid, errors = job
            try:
                t0 = time.perf_counter()
                self.writer.write_unit(unit, arrays, valid=valid, errors=errors)
                self.seconds += time.perf_counter() - t0
                self.written.append(unit)
                if self._delay:
                    time.sleep(self._delay)
            except BaseException as exc:  # surfaced to the main thread at its next put/close
                self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise ExtractionError(f"writing to the store failed: {self._error}") from self._error

    def put(self, unit: int, arrays: dict[str, np.ndarray], valid: np.ndarray, errors: list[str]) -> None:
        self.check()
        self._queue.put((unit, arrays, valid, errors))

    def close(self) -> None:
        """Write what is queued (finished units are worth keeping, even on Ctrl-C), then stop."""
        self._queue.put(None)
        self._thread.join()
        self.check()
