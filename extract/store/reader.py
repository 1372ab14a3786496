"""Reading a store's features: cheap to open, reads only what is asked for, never writes.

Feature reads go through the decode engine (`extract.store.decode`) straight into float32 outputs.
Results reuse the memory of results the caller has dropped, and `iter_batches` that of its own blocks
(`extract.store.memory`). What the store records besides feature data comes from `StoreMetadata`.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from extract.store.decode import BlockStep, Decoder, default_workers
from extract.store.layout import StoreError, is_local, local_path, open_group
from extract.store.memory import ReusedMemory
from extract.store.metadata import StoreMetadata
from extract.store.xarray_view import feature_dataarray, store_datatree

# Output rows one prefetched block of iter_batches holds (as float32).
BLOCK_BYTES = 64 << 20


def _unchanged(block: np.ndarray) -> None:
    """The `each` of a read that asks for none."""


class FeatureStore(StoreMetadata):
    """A store opened read-only. Cheap to create; reads only what is asked for."""

    def __init__(
        self,
        root: zarr.Group,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        workers: int | None = None,
    ):
        super().__init__(root, url, storage_options)
        self._decoder = Decoder(int(workers or default_workers(url)))
        # Memory of read()'s results (a probe's windows: a few per feature), reused once the caller drops them.
        self._memory = ReusedMemory(keep=16)

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, samples={self.num_samples}, features={len(self.feature_names(None))}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    @property
    def workers(self) -> int:
        """Threads that decode chunks; 1 reads chunk runs one after the other (no prefetch)."""
        return self._decoder.workers

    def to_dask(self, name: str):
        """A dask array chunked by shard rows (one task per shard, not per inner chunk). Its shards are
        checked present first (one listing): zarr would read an absent one as zeros."""
        import dask.array as da

        arr = self.array(name)
        self.required_shards(name).check_listed(arr)
        return da.from_zarr(arr, chunks=(self.shard_rows, *arr.shape[1:]))

    def to_xarray(self, name: str | None = None) -> Any:
        """A lazy xarray view: one feature as a DataArray (`extract.store.xarray_view.feature_dataarray`);
        without a name, a DataTree with one node per feature array (noise draws >= 1 included)."""
        if name is None:
            return store_datatree(self, self.to_dask)
        self._check_name(name)
        return feature_dataarray(self, name, self.to_dask(name))

    def read(
        self,
        name: str,
        rows: Any = None,
        *,
        out: np.ndarray | None = None,
        each: BlockStep | None = None,
    ) -> np.ndarray:
        """Rows of one feature as float32: rows is None (all), a slice, a bool mask or indices.

        `out` (float32, C-contiguous, shape (rows, *feature shape)) is filled and returned instead of a
        new array: a probe can reuse one buffer for every batch. Without it the result is the caller's for as
        long as they hold it; its memory is reused by a later read once they drop it (`release_memory`).
        `each(block)` is called on every float32 block of decoded rows, in the decode threads and while the
        block is still in cache, before it lands in the result: an in-place, row-wise step such as
        standardisation or a finiteness check costs no pass of its own. The blocks partition the rows in no
        particular order.
        """
        arr = self.array(name)
        each = each or _unchanged
        if rows is None or (isinstance(rows, slice) and rows.indices(self.num_samples)[2] == 1):
            start, stop, _ = (rows or slice(None)).indices(self.num_samples)
            stop = max(start, stop)
            out = self._output(arr, stop - start, out)
            self._decoder.read_range(arr, start, stop, out, each, self.required_shards(name))
            return out
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.num_samples))
        idx = np.asarray(rows)
        if idx.dtype == bool:
            if idx.shape != (self.num_samples,):
                raise ValueError(f"a row mask must have shape ({self.num_samples},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.num_samples or idx.max() >= self.num_samples):
            raise IndexError(f"row indices out of range for {self.num_samples} samples")
        idx = np.where(idx < 0, idx + self.num_samples, idx)
        out = self._output(arr, idx.size, out)
        if idx.size:
            self._decoder.read_rows(arr, idx, out, each, self.required_shards(name))
        return out

    def release_memory(self) -> None:
        """Give back the memory of results and batches the caller has dropped, kept for reuse by later reads."""
        self._memory.release()

    def _output(self, arr: zarr.Array, n: int, out: np.ndarray | None) -> np.ndarray:
        shape = (n, *arr.shape[1:])
        if out is None:
            return self._memory.take(shape)
        if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        return out

    def iter_batches(self, name: str, batch_size: int, rows: Any = None, *, prefetch: int = 1) -> Iterator[np.ndarray]:
        """float32 batches of `batch_size` rows (the last may be smaller), in the order of `rows`.

        `prefetch` blocks (of ~64 MiB, or `prefetch` batches for scattered rows) are read ahead in a
        background thread while the caller works on the current one; 0 reads on demand. A batch is a view
        into a block; a block is reused only once the caller holds none of its batches, so a batch the caller
        keeps stays valid and unchanged.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._check_name(name)
        if rows is None or isinstance(rows, slice):
            start, stop, step = (rows or slice(None)).indices(self.num_samples)
            if step == 1:
                arr = self.array(name)
                row_bytes = 4 * int(np.prod(arr.shape[1:], dtype=np.int64))
                block = max(batch_size, (BLOCK_BYTES // max(row_bytes, 1)) // batch_size * batch_size)
                pieces = [slice(lo, min(stop, lo + block)) for lo in range(start, stop, block)]
                for data in self._ahead(name, pieces, prefetch):
                    for lo in range(0, len(data), batch_size):
                        yield data[lo : lo + batch_size]
                return
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        yield from self._ahead(name, [idx[lo : lo + batch_size] for lo in range(0, len(idx), batch_size)], prefetch)

    def _ahead(self, name: str, pieces: list[Any], prefetch: int) -> Iterator[np.ndarray]:
        """Read `pieces` (slices or row indices) in order into recycled buffers, `prefetch` of them ahead."""
        lengths = [len(range(*p.indices(self.num_samples))) if isinstance(p, slice) else len(p) for p in pieces]
        shape = self.array(name).shape[1:]
        reserve = max(lengths, default=0) * int(np.prod(shape, dtype=np.int64))
        # The pass's own blocks, freed with it (a probe's statistics pass must not leave them behind).
        blocks = ReusedMemory(keep=prefetch + 3)

        def read(i: int) -> np.ndarray:
            return self.read(name, pieces[i], out=blocks.take((lengths[i], *shape), reserve))

        if prefetch <= 0:
            for i in range(len(pieces)):
                yield read(i)
            return
        # One background thread runs reads in order (each read fans out to the decode pool itself).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diffbank-prefetch") as ahead:
            queue = [ahead.submit(read, i) for i in range(min(len(pieces), prefetch + 1))]
            nxt = len(queue)
            try:
                while queue:
                    data = queue.pop(0).result()
                    if nxt < len(pieces):
                        queue.append(ahead.submit(read, nxt))
                        nxt += 1
                    yield data
            finally:
                for future in queue:
                    future.cancel()


def open_store(
    path_or_url: str | os.PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    consolidated: bool | None = None,
    workers: int | None = None,
) -> FeatureStore:
    """Open a store read-only: a local path or an fsspec URL (memory://, s3://, gs://...).

    A finished store opens from its consolidated metadata (one request lists every array); one that
    is being written or extended, or `consolidated=False`, reads live metadata. Endpoint and credentials
    of remote stores come from fsspec's usual configuration (environment, ~/.aws, or `storage_options`).
    """
    url = os.fspath(path_or_url)
    if is_local(url) and not local_path(url).exists():
        raise FileNotFoundError(f"no store at {url}")
    try:
        root = open_group(url, "r", storage_options, use_consolidated=False if consolidated is False else None)
    except Exception as exc:
        raise StoreError(f"cannot open {url} as a Zarr v3 store: {exc}") from exc
    # A store extended or still being written may carry stale consolidated metadata: read it live.
    if consolidated is None and not root.attrs.get("consolidated", False):
        root = open_group(url, "r", storage_options, use_consolidated=False)
    return FeatureStore(root, url, storage_options, workers=workers)
