"""Copy a store between any two fsspec URLs (local, s3://, memory://...), object by object, verified.

Write order is the writer's: every chunk and shard object first, then the progress markers
(`_progress/...`), then the metadata (`zarr.json` files, deepest first, the root's last). A reader finds a
store through its root `zarr.json`, so a copy stopped anywhere before the end leaves no store at the
destination, only objects that a resumed copy (`resume=True`) checks and keeps; and markers never land
before the data they vouch for.

Every object is read back after writing and compared with the source by size and SHA-256; with
`resume`, an object already at the destination with the same size and hash is not written again.
Objects are read whole: a shard is one object of at most a few hundred MB (`TARGET_SHARD_BYTES`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from extract.store.layout import PROGRESS, StoreError
from extract.store.lease import LEASE_KEY, OWN_KEYS

log = logging.getLogger(__name__)

METADATA_KEY = "zarr.json"
# Testing hook: seconds to sleep after each object lands, so a test can kill a copy mid-way.
COPY_DELAY_ENV = "DIFFBANK_DEBUG_COPY_DELAY"
PROGRESS_EVERY_S = 2.0


@dataclasses.dataclass
class CopySummary:
    src: str
    dst: str
    objects: int
    copied: int
    skipped: int  # already at the destination with the same size and hash (resume)
    bytes_copied: int
    bytes_total: int
    seconds: float


@dataclasses.dataclass
class _CopyProgress:
    """A copy's running counts, changed under its lock; `logged` is when progress was last logged."""

    objects: int = 0
    copied: int = 0
    bytes: int = 0
    logged: float = dataclasses.field(default_factory=time.perf_counter)


def copy_order(keys: Sequence[str]) -> list[list[str]]:
    """The keys in three phases: data objects, progress markers, metadata (deepest first, root last)."""
    data, markers, metadata = [], [], []
    for key in keys:
        if key == METADATA_KEY or key.endswith("/" + METADATA_KEY):
            metadata.append(key)
        elif key.startswith(PROGRESS + "/"):
            markers.append(key)
        else:
            data.append(key)
    metadata.sort(key=lambda k: (-k.count("/"), k))
    return [sorted(data), sorted(markers), metadata]


def copy_store(
    src: str,
    dst: str,
    *,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    resume: bool = False,
    workers: int = 4,
) -> CopySummary:
    """Copy the store at `src` to `dst` (see the module docstring for order and checks)."""
    start = time.perf_counter()
    src_fs, src_root = fsspec.core.url_to_fs(src, **(src_options or {}))
    dst_fs, dst_root = fsspec.core.url_to_fs(dst, **(dst_options or {}))
    src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
    sizes = _listing(src_fs, src_root)
    if METADATA_KEY not in sizes:
        raise StoreError(f"no store at {src}: it has no {METADATA_KEY}")
    if LEASE_KEY in sizes:
        raise StoreError(f"{src} is being written (it holds {LEASE_KEY}): copy it once the writer has finished")
    for key in OWN_KEYS:
        sizes.pop(key, None)
    present = _listing(dst_fs, dst_root)
    if present and not resume:
        what = "a store" if METADATA_KEY in present else "a partial copy"
        raise StoreError(f"{dst} already holds {what} ({len(present)} objects): resume the copy or choose another DST")
    if METADATA_KEY in present:
        # The root metadata makes the destination a store: take it away until everything under it matches.
        dst_fs.rm_file(f"{dst_root}/{METADATA_KEY}")
        del present[METADATA_KEY]

    total = sum(sizes.values())
    done = _CopyProgress()
    delay = float(os.environ.get(COPY_DELAY_ENV, "0") or 0)
    lock = threading.Lock()
    local_dst = "file" in _protocols(dst_fs)
    log.info(f"copying {src} -> {dst}: {len(sizes)} objects, {_mb(total)}")

    def one(key: str) -> None:
        data = src_fs.cat_file(f"{src_root}/{key}")
        if len(data) != sizes[key]:
            raise StoreError(f"{src}/{key}: listed as {sizes[key]} bytes, read {len(data)}: is a writer at work?")
        digest = hashlib.sha256(data).hexdigest()
        target = f"{dst_root}/{key}"
        if key in present and present[key] == len(data) and _sha256(dst_fs, target) == digest:
            log.debug(f"{key}: already there")
        else:
            if local_dst:  # object stores have no directories; a local filesystem needs them first
                dst_fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            dst_fs.pipe_file(target, data)
            back = dst_fs.cat_file(target)
            if len(back) != len(data) or hashlib.sha256(back).hexdigest() != digest:
                raise StoreError(f"{dst}/{key}: read back {len(back)} bytes that differ from the source's {len(data)}")
            with lock:
                done.copied += 1
                done.bytes += len(data)
            if delay:
                time.sleep(delay)
        with lock:
            done.objects += 1
            _report(done, len(sizes))

    for phase, keys in zip(("data", "markers", "metadata"), copy_order(list(sizes))):
        log.debug(f"{phase}: {len(keys)} objects")
        if phase == "metadata":  # one by one: the root's must come last
            for key in keys:
                one(key)
        else:
            _each(one, keys, workers)
    summary = CopySummary(
        src=src,
        dst=dst,
        objects=len(sizes),
        copied=done.copied,
        skipped=len(sizes) - done.copied,
        bytes_copied=done.bytes,
        bytes_total=total,
        seconds=time.perf_counter() - start,
    )
    log.info(
        f"copied {summary.copied} of {summary.objects} objects ({_mb(summary.bytes_copied)}), "
        f"{summary.skipped} already there, every one checked by size and SHA-256, in {summary.seconds:.1f} s"
    )
    return summary


def _listing(fs: Any, root: str) -> dict[str, int]:
    """Relative key -> size of every object under `root`, as it is now (not from a listing cache)."""
    fs.invalidate_cache(root)
    found = fs.find(root, detail=True)
    prefix = root + "/"
    return {
        path[len(prefix) :]: int(info["size"])
        for path, info in found.items()
        if path.startswith(prefix) and info.get("type", "file") == "file"
    }


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _sha256(fs: Any, path: str) -> str:
    return hashlib.sha256(fs.cat_file(path)).hexdigest()


def _each(fn: Callable[[str], None], keys: list[str], workers: int) -> None:
    if workers <= 1:
        for key in keys:
            fn(key)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fn, key) for key in keys]:
            future.result()


def _report(done: _CopyProgress, total: int) -> None:
    now = time.perf_counter()
    if now - done.logged >= PROGRESS_EVERY_S or done.objects == total:
        done.logged = now
        log.info(f"  {done.objects}/{total} objects, {_mb(done.bytes)} written")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
