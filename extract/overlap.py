"""Overlap I/O with the U-Net: images load ahead of the compute (extract/loader.py: threads or
processes), and finished units are compressed and written by a writer thread behind it."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from extract.compute import ExtractionError
from extract.loader import LoadedPixels, load_pixels
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


def to_batch(loaded: LoadedPixels, pin: bool) -> Batch:
    """Loaded pixels as a torch batch; page-locked (one host copy) when it will go to a GPU."""
    pixels = torch.from_numpy(loaded.pixels)
    if pin:
        pixels = pixels.pin_memory()
    return Batch(loaded.unit, loaded.offset, loaded.indices, pixels, loaded.ids, loaded.errors)


def load_batch(
    source: ImageSource,
    image_size: int,
    method: str,
    pin: bool,
    unit: int,
    offset: int,
    indices: np.ndarray,
) -> Batch:
    """One micro-batch loaded here and now (calibration, benchmarks)."""
    return to_batch(load_pixels(source, image_size, method, unit, offset, indices), pin)


def plan_batches(writer: StoreWriter, units: Sequence[int], micro_batch: int) -> list[tuple[int, int, np.ndarray]]:
    out = []
    for unit in units:
        start, stop = writer.unit_rows(unit)
        for lo in range(start, stop, micro_batch):
            out.append((unit, lo - start, np.arange(lo, min(stop, lo + micro_batch), dtype=np.int64)))
    return out


def prefetch(submit: Callable[..., Future], jobs: Sequence[tuple[Any, ...]], depth: int) -> Iterator[Any]:
    """Results of submit(*job) in order, with at most `depth` jobs in flight."""
    pending: list[Future] = []
    it = iter(jobs)
    for job in it:
        pending.append(submit(*job))
        if len(pending) >= depth:
            break
    while pending:
        fut = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(submit(*nxt))
        yield fut.result()


class UnitWriter:
    """Writes finished units in a background thread so the U-Net never waits on compression."""

    def __init__(self, writer: StoreWriter, machine: Mapping[str, Any] | None = None, max_queued: int = 2):
        self.writer = writer
        self.machine = machine  # the signature each unit records (extract.hardware.machine_signature)
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
                self.writer.write_unit(unit, arrays, valid=valid, errors=errors, machine=self.machine)
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
