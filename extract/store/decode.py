"""The decode engine: rows of sharded float arrays decoded into float32 outputs by a pool of threads.

Each task fetches the bytes of a run of inner chunks with one (ranged) request, checks their crc32c,
decompresses them into a scratch of its own (or straight into the output, for float32) and casts that
into its slice of the output with torch. Remote stores get several requests in flight at once, so a read
from S3 is not bound by latency. Arrays whose layout the fast path does not decode go through zarr.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from extract.store.layout import is_local, shard_shape
from extract.store.memory import cast_into, scatter_into
from extract.store.presence import RequiredShards
from extract.store.shards import DirectCodecs, direct_codecs, read_shard_blocks, read_shard_rows_into, shard_index

# Stored bytes one task decodes. A task's working set (compressed payload, float16 scratch, float32 output:
# ~4x this) should stay in the last-level cache: reading a 629 MB float16 feature on one thread took
# 0.18 CPU s with 2 MiB tasks and 0.24 s with 8 MiB (0.20 s at 1 and 4 MiB; 32 MiB L3).
TASK_BYTES = 2 << 20

# Called on every float32 block of decoded rows, in place (see FeatureStore.read's `each`).
BlockStep = Callable[[np.ndarray], None]


def default_workers(url: str) -> int:
    """Decode threads: the cores here; for remote stores more, since most of a request's time is waiting."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores) if is_local(url) else max(8, cores)


class Decoder:
    """Decodes rows of one store's arrays; caches each array's codec chain and each shard's index."""

    def __init__(self, workers: int):
        # Threads that decode chunks; 1 reads chunk runs one after the other (no prefetch).
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._scratch = threading.local()
        self._codecs: dict[str, DirectCodecs | None] = {}
        self._indices: dict[tuple[str, int], np.ndarray | None] = {}

    def read_range(
        self, arr: zarr.Array, start: int, stop: int, out: np.ndarray, each: BlockStep, required: RequiredShards
    ) -> None:
        """out[:] = arr[start:stop] as float32, `each` applied to every decoded block; a shard (or inner
        chunk) that `required` says must exist and is absent raises MissingChunk."""
        codecs = self._codecs_of(arr)
        if codecs is None:  # a layout the fast path does not decode itself: zarr does, then one cast
            if stop > start:
                required.check_listed(arr)
                cast_into(out, np.asarray(arr[start:stop]))
                each(out)
            return
        step = self._task_rows(arr, codecs)
        shard_rows = int(shard_shape(arr)[0])
        tasks = []
        lo = start
        while lo < stop:
            # tasks end on chunk boundaries and never cross a shard
            shard_end = (lo // shard_rows + 1) * shard_rows
            hi = min(stop, shard_end, (lo // codecs.chunk_rows) * codecs.chunk_rows + step)
            tasks.append(self._range_task(arr, codecs, lo, hi, out[lo - start : hi - start], each, required))
            lo = hi
        self._run(tasks)

    def read_rows(
        self, arr: zarr.Array, idx: np.ndarray, out: np.ndarray, each: BlockStep, required: RequiredShards
    ) -> None:
        """out[:] = arr[idx] as float32 (idx: non-negative int64 row indices, any order, repeats allowed)."""
        codecs = self._codecs_of(arr)
        if codecs is None:
            required.check_listed(arr)
            uniq, inverse = np.unique(idx, return_inverse=True)
            cast_into(out, np.asarray(arr.oindex[(uniq,) + (slice(None),) * (arr.ndim - 1)])[inverse])
            each(out)
            return
        # Decode each run of touched chunks once (a run never crosses a shard), then gather its rows.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        chunk_of = sorted_idx // codecs.chunk_rows
        shard_chunks = int(shard_shape(arr)[0]) // codecs.chunk_rows
        task_chunks = max(1, self._task_rows(arr, codecs) // codecs.chunk_rows)
        breaks = np.flatnonzero(
            (np.diff(chunk_of) > 1) | (np.diff(chunk_of // shard_chunks) != 0) | (np.diff(chunk_of // task_chunks) != 0)
        )
        bounds = np.concatenate([[0], breaks + 1, [len(sorted_idx)]])
        tasks = [
            self._gather_task(arr, codecs, sorted_idx[a:b], order[a:b], out, each, required)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        self._run(tasks)

    def _codecs_of(self, arr: zarr.Array) -> DirectCodecs | None:
        with self._lock:
            if arr.path not in self._codecs:
                self._codecs[arr.path] = direct_codecs(arr)
            return self._codecs[arr.path]

    def _index(self, arr: zarr.Array, codecs: DirectCodecs, shard: int) -> np.ndarray | None:
        key = (arr.path, shard)
        with self._lock:
            if key in self._indices:
                return self._indices[key]
        index = shard_index(arr, codecs, shard)
        with self._lock:
            self._indices[key] = index
        return index

    def _scratch_for(self, slot: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """This thread's buffer `slot`, reused from task to task: a fresh one per task would cost a page
        fault per 4 KiB, which measured slower than the decompression itself."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = getattr(self._scratch, slot, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            setattr(self._scratch, slot, buf)
        return buf[:nbytes].view(dtype).reshape(shape)

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        """Run zero-argument tasks, in parallel when there are workers to spare; the first error is raised."""
        if self.workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                task()
            return
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="diffbank-read")
        for future in [self._pool.submit(task) for task in tasks]:
            future.result()

    @staticmethod
    def _task_rows(arr: zarr.Array, codecs: DirectCodecs) -> int:
        row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        chunk = codecs.chunk_rows
        return max(chunk, (TASK_BYTES // max(row_bytes, 1)) // chunk * chunk)

    def _range_task(
        self,
        arr: zarr.Array,
        codecs: DirectCodecs,
        lo: int,
        hi: int,
        dst: np.ndarray,
        each: BlockStep,
        required: RequiredShards,
    ) -> Callable[[], None]:
        def task() -> None:
            shard = lo // int(shard_shape(arr)[0])
            index = self._index(arr, codecs, shard)
            required.check(arr, shard, index, lo, hi, codecs.chunk_rows)
            if arr.dtype == np.float32:
                read_shard_rows_into(arr, codecs, index, lo, hi, dst)
            else:
                scratch = self._scratch_for("stored", dst.shape, arr.dtype)
                for first, block in read_shard_blocks(arr, codecs, index, lo, hi, scratch):
                    cast_into(dst[first : first + len(block)], block)
            each(dst)

        return task

    def _gather_task(
        self,
        arr: zarr.Array,
        codecs: DirectCodecs,
        rows: np.ndarray,
        positions: np.ndarray,
        out: np.ndarray,
        each: BlockStep,
        required: RequiredShards,
    ) -> Callable[[], None]:
        def task() -> None:
            lo = int(rows[0]) // codecs.chunk_rows * codecs.chunk_rows
            hi = min(arr.shape[0], (int(rows[-1]) // codecs.chunk_rows + 1) * codecs.chunk_rows)
            shard = lo // int(shard_shape(arr)[0])
            index = self._index(arr, codecs, shard)
            required.check(arr, shard, index, lo, hi, codecs.chunk_rows)
            scratch = self._scratch_for("stored", (hi - lo, *arr.shape[1:]), arr.dtype)
            blocks = read_shard_blocks(arr, codecs, index, lo, hi, scratch)
            contiguous = int(positions[-1]) - int(positions[0]) == len(positions) - 1 and np.all(
                np.diff(positions) == 1
            )
            dst = (
                out[positions[0] : positions[-1] + 1]
                if contiguous
                else self._scratch_for("float32", (len(rows), *arr.shape[1:]), np.float32)
            )
            # Each block's rows are picked and cast in one step; a shuffled window reads whole chunk runs, so
            # its rows of a block are often a slice, not a gather.
            offsets = rows - lo
            cuts = np.searchsorted(offsets, [first for first, _ in blocks[1:]])
            for (first, block), a, z in zip(blocks, [0, *cuts], [*cuts, len(rows)]):
                if a == z:
                    continue
                picked = offsets[a:z] - first
                if int(picked[-1]) - int(picked[0]) == z - a - 1:
                    cast_into(dst[a:z], block[int(picked[0]) : int(picked[-1]) + 1])
                else:
                    cast_into(dst[a:z], block[picked])
            each(dst)
            if not contiguous:
                scatter_into(out, positions, dst)

        return task
