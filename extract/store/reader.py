"""Reading a store: cheap to open, reads only what is asked for, never writes.

Feature reads decode inner chunks in a thread pool straight into the caller's float32 output: each
task fetches the bytes of a run of chunks with one (ranged) request, checks their crc32c, decompresses
them into a float16 scratch of its own and casts that into its slice of the output with torch. Remote
stores get several requests in flight at once, so a read from S3 is not bound by latency. Results reuse
the memory of results the caller has dropped, and `iter_batches` that of its own blocks (`extract.store.memory`).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zarr

from extract.features import draw_name
from extract.store.layout import (
    FEATURES,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROGRESS,
    SAMPLES,
    SPLITS,
    FeatureInfo,
    Layout,
    StoreError,
    as_str,
    is_local,
    local_path,
    open_group,
)
from extract.store.memory import ReusedMemory, cast_into, scatter_into
from extract.store.shards import direct_codecs, read_shard_rows_into, shard_index

# Stored bytes one task decodes. A task's working set (compressed payload, float16 scratch, float32 output:
# ~4x this) should stay in the last-level cache: reading a 629 MB float16 feature on one thread took
# 0.18 CPU s with 2 MiB tasks and 0.24 s with 8 MiB (0.20 s at 1 and 4 MiB; 32 MiB L3).
TASK_BYTES = 2 << 20
# Output rows one prefetched block of iter_batches holds (as float32).
BLOCK_BYTES = 64 << 20


def _unchanged(block: np.ndarray) -> None:
    """The `each` of a read that asks for none."""


def default_workers(url: str) -> int:
    """Decode threads: the cores here; for remote stores more, since most of a request's time is waiting."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores) if is_local(url) else max(8, cores)


class FeatureStore:
    """A store opened read-only. Cheap to create; reads only what is asked for."""

    def __init__(
        self,
        root: zarr.Group,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        workers: int | None = None,
    ):
        self._root = root
        self.url = url
        self.storage_options = storage_options
        # Threads that decode chunks; 1 reads chunk runs one after the other (no prefetch).
        self.workers = int(workers or default_workers(url))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._scratch = threading.local()
        # Memory of read()'s results (a probe's windows: a few per feature), reused once the caller drops them.
        self._memory = ReusedMemory(keep=16)
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(
                f"{url} is a Zarr hierarchy but not a diffbank feature store "
                f"(root attribute format={self.attrs.get('format')!r})"
            )
        version = int(self.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{url} has store format {version}; this diffbank reads up to {FORMAT_VERSION}: upgrade diffbank"
            )
        self.spec: dict[str, Any] = dict(self.attrs.get("spec") or {})
        self.fingerprint: str = str(self.attrs.get("fingerprint"))
        self.num_samples: int = int(self.attrs["num_samples"])
        self.shard_rows: int = int(self.attrs["shard_rows"])
        self._features = root[FEATURES]
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (
            f"FeatureStore({self.url!r}, samples={self.num_samples}, features={len(self.feature_names(None))}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    # -- features --------------------------------------------------------------------------

    def feature_names(self, view: str | None = "center") -> list[str]:
        """Feature names, sorted by (t, block, pool); view=None lists every view.

        A feature whose noise draws are stored apart is listed once, by its draw-0 name; `draw_names`
        gives the arrays of all its draws.
        """
        names = [n for n in self._all_names() if self.feature_info(n).draw == 0]
        if view is None:
            return names
        return [n for n in names if self.feature_info(n).view == view]

    def array_names(self) -> list[str]:
        """Every feature array, noise draws >= 1 included (what verify, info and export walk)."""
        return list(self._all_names())

    def draw_names(self, name: str) -> list[str]:
        """The arrays of feature `name`'s noise draws, draw 0 first: [name] unless the store keeps K > 1
        draws apart (spec `noise: {combine: separate}`)."""
        info = self.feature_info(name)
        if info.draw != 0:
            raise KeyError(f"{name!r} is draw {info.draw} of a feature; name the feature by its draw-0 array")
        if info.draws <= 1:
            return [name]
        return [draw_name(name, d) for d in range(info.draws)]

    def _check_name(self, name: str) -> None:
        if name not in self._all_names():
            known = ", ".join(self._all_names()) or "none"
            raise KeyError(f"no feature {name!r} in {self.url}; features: {known}")

    def _all_names(self) -> list[str]:
        if "names" not in self._cache:
            self._cache["names"] = list(self.attrs.get("features") or sorted(self._features.array_keys()))
        return self._cache["names"]

    def arrays_on_disk(self) -> list[str]:
        """Feature arrays present in the hierarchy (live listing when opened without consolidation)."""
        return sorted(self._features.array_keys())

    def array(self, name: str) -> zarr.Array:
        self._check_name(name)
        return self._features[name]

    def feature_info(self, name: str) -> FeatureInfo:
        key = ("info", name)
        if key not in self._cache:
            arr = self.array(name)
            self._cache[key] = FeatureInfo.from_attrs(name, dict(arr.attrs), arr.shape[1:])
        return self._cache[key]

    def to_dask(self, name: str):
        """A dask array chunked by shard rows (one task per shard, not per inner chunk)."""
        import dask.array as da

        arr = self.array(name)
        return da.from_zarr(arr, chunks=(self.shard_rows, *arr.shape[1:]))

    def read(
        self,
        name: str,
        rows: Any = None,
        *,
        out: np.ndarray | None = None,
        each: Callable[[np.ndarray], None] | None = None,
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
            self._read_range(name, arr, start, stop, out, each)
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
            self._read_rows(name, arr, idx, out, each)
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

    def _codecs(self, name: str, arr: zarr.Array) -> Any:
        key = ("codecs", name)
        if key not in self._cache:
            self._cache[key] = direct_codecs(arr)
        return self._cache[key]

    def _index(self, name: str, arr: zarr.Array, codecs: Any, shard: int) -> np.ndarray | None:
        key = ("index", name, shard)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        index = shard_index(arr, codecs, shard)
        with self._lock:
            self._cache[key] = index
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

    def _run(self, tasks: list[Any]) -> None:
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

    def _task_rows(self, arr: zarr.Array, codecs: Any) -> int:
        row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        chunk = codecs.chunk_rows
        return max(chunk, (TASK_BYTES // max(row_bytes, 1)) // chunk * chunk)

    def _read_range(self, name: str, arr: zarr.Array, start: int, stop: int, out: np.ndarray, each: Callable) -> None:
        codecs = self._codecs(name, arr)
        if codecs is None:  # a layout the fast path does not decode itself: zarr does, then one cast
            if stop > start:
                cast_into(out, np.asarray(arr[start:stop]))
                each(out)
            return
        step = self._task_rows(arr, codecs)
        shard_rows = int(arr.shards[0])
        tasks = []
        lo = start
        while lo < stop:
            # tasks end on chunk boundaries and never cross a shard
            shard_end = (lo // shard_rows + 1) * shard_rows
            hi = min(stop, shard_end, (lo // codecs.chunk_rows) * codecs.chunk_rows + step)
            tasks.append(self._range_task(name, arr, codecs, lo, hi, out[lo - start : hi - start], each))
            lo = hi
        self._run(tasks)

    def _range_task(
        self, name: str, arr: zarr.Array, codecs: Any, lo: int, hi: int, dst: np.ndarray, each: Callable
    ) -> Any:
        def task() -> None:
            index = self._index(name, arr, codecs, lo // int(arr.shards[0]))
            if arr.dtype == np.float32:
                read_shard_rows_into(arr, codecs, index, lo, hi, dst)
            else:
                scratch = self._scratch_for("stored", dst.shape, arr.dtype)
                read_shard_rows_into(arr, codecs, index, lo, hi, scratch)
                cast_into(dst, scratch)
            each(dst)

        return task

    def _read_rows(self, name: str, arr: zarr.Array, idx: np.ndarray, out: np.ndarray, each: Callable) -> None:
        codecs = self._codecs(name, arr)
        if codecs is None:
            uniq, inverse = np.unique(idx, return_inverse=True)
            cast_into(out, np.asarray(arr.oindex[(uniq,) + (slice(None),) * (arr.ndim - 1)])[inverse])
            each(out)
            return
        # Decode each run of touched chunks once (a run never crosses a shard), then gather its rows.
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        chunk_of = sorted_idx // codecs.chunk_rows
        shard_chunks = int(arr.shards[0]) // codecs.chunk_rows
        task_chunks = max(1, self._task_rows(arr, codecs) // codecs.chunk_rows)
        breaks = np.flatnonzero(
            (np.diff(chunk_of) > 1) | (np.diff(chunk_of // shard_chunks) != 0) | (np.diff(chunk_of // task_chunks) != 0)
        )
        bounds = np.concatenate([[0], breaks + 1, [len(sorted_idx)]])
        tasks = [
            self._gather_task(name, arr, codecs, sorted_idx[a:b], order[a:b], out, each)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        self._run(tasks)

    def _gather_task(
        self,
        name: str,
        arr: zarr.Array,
        codecs: Any,
        rows: np.ndarray,
        positions: np.ndarray,
        out: np.ndarray,
        each: Callable,
    ) -> Any:
        def task() -> None:
            lo = int(rows[0]) // codecs.chunk_rows * codecs.chunk_rows
            hi = min(arr.shape[0], (int(rows[-1]) // codecs.chunk_rows + 1) * codecs.chunk_rows)
            index = self._index(name, arr, codecs, lo // int(arr.shards[0]))
            scratch = self._scratch_for("stored", (hi - lo, *arr.shape[1:]), arr.dtype)
            read_shard_rows_into(arr, codecs, index, lo, hi, scratch)
            # A shuffled window reads whole chunk runs: its rows of a run are then a slice, not a gather.
            if int(rows[-1]) - int(rows[0]) == len(rows) - 1:
                picked = scratch[int(rows[0]) - lo : int(rows[-1]) - lo + 1]
            else:
                picked = scratch[rows - lo]
            if int(positions[-1]) - int(positions[0]) == len(positions) - 1 and np.all(np.diff(positions) == 1):
                dst = out[positions[0] : positions[-1] + 1]
                cast_into(dst, picked)
                each(dst)
                return
            rows_f32 = self._scratch_for("float32", picked.shape, np.float32)
            cast_into(rows_f32, picked)
            each(rows_f32)
            scatter_into(out, positions, rows_f32)

        return task

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

    def to_xarray(self, name: str | None = None) -> Any:
        """A lazy xarray view: one feature as a DataArray with dims (sample, channel, y, x), coordinates
        label, id, split and valid and the feature's attributes; without a name, a DataTree with one node
        per feature array (noise draws >= 1 included). The same in every store format: the stored dimension
        names (the feature's own from format 3, which plain `xarray.open_datatree` needs) are not used here."""
        import xarray as xr

        if name is None:
            return xr.DataTree.from_dict(
                {f"/{n}": xr.Dataset({n: self.to_xarray(n)}, attrs={"feature": n}) for n in self.array_names()}
                | {"/": xr.Dataset(attrs={"fingerprint": self.fingerprint, "url": self.url})}
            )
        self._check_name(name)
        data = self.to_dask(name)
        dims = ("sample", "channel", "y", "x") if data.ndim == 4 else ("sample", "channel")[: data.ndim]
        info = self.feature_info(name)
        attrs = {k: v for k, v in info.to_attrs().items() if v is not None}
        attrs["stats"] = str(info.stats) if info.stats else ""
        attrs["pool"] = attrs.get("pool") or ""
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()}
        attrs["shape"] = list(info.shape)
        coords = {
            "label": ("sample", self.labels),
            "id": ("sample", self.sample_ids),
            "split": ("sample", self._split_names()),
            "valid": ("sample", self.valid),
        }
        return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=attrs)

    def _split_names(self) -> np.ndarray:
        """Per sample, the splits it belongs to ('+'-joined where splits overlap; '' for none)."""
        names = np.full(self.num_samples, "", dtype=object)
        group = self._root[SPLITS]
        for split in sorted(group.array_keys()):
            mask = np.asarray(group[split][:], dtype=bool)
            names[mask] = np.where(names[mask] == "", split, names[mask] + "+" + split)
        return names.astype(str)

    # -- samples ---------------------------------------------------------------------------

    def _sample_array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.asarray(self._root[SAMPLES][key][:])
        return self._cache[key]

    @property
    def labels(self) -> np.ndarray:
        return self._sample_array("label").astype(np.int64, copy=False)

    @property
    def class_names(self) -> list[str] | None:
        names = self.attrs.get("class_names")
        return list(names) if names is not None else None

    @property
    def sample_ids(self) -> np.ndarray:
        return as_str(self._sample_array("id"))

    @property
    def valid(self) -> np.ndarray:
        return self._sample_array("valid").astype(bool, copy=False)

    @property
    def splits(self) -> dict[str, np.ndarray]:
        """Row indices of each split, valid rows only."""
        if "splits" not in self._cache:
            group = self._root[SPLITS]
            valid = self.valid
            self._cache["splits"] = {
                name: np.flatnonzero(np.asarray(group[name][:], dtype=bool) & valid).astype(np.int64)
                for name in sorted(group.array_keys())
            }
        return dict(self._cache["splits"])

    @property
    def failures(self) -> list[dict[str, Any]]:
        errors = as_str(self._sample_array("error"))
        ids = self.sample_ids
        return [{"index": int(i), "id": str(ids[i]), "reason": str(errors[i])} for i in np.flatnonzero(errors != "")]

    # -- progress --------------------------------------------------------------------------

    @property
    def num_units(self) -> int:
        return Layout(self.num_samples, self.shard_rows, {}).num_units

    def _markers(self) -> tuple[list[str], np.ndarray]:
        done = self._root[PROGRESS]["done"]
        return list(done.attrs["features"]), np.asarray(done[:])

    def is_complete(self, name: str | None = None) -> bool:
        """Every unit of `name` (None: of every feature) is marked done."""
        columns, done = self._markers()
        if name is None:
            return bool(done.all())
        self._check_name(name)
        return bool(done[:, columns.index(name)].all())

    def unit_status(self) -> dict[str, np.ndarray]:
        """Per feature, a bool vector over units: done or not."""
        columns, done = self._markers()
        return {name: done[:, i].astype(bool) for i, name in enumerate(columns)}

    def nbytes_stored(self) -> int | None:
        """Bytes on disk (local stores only; None elsewhere)."""
        if not is_local(self.url):
            return None
        root = local_path(self.url)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


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
