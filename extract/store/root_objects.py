"""The few non-Zarr objects diffbank keeps at a store's root (the writer lease, the creation marker),
on a local path or an fsspec filesystem.

Exclusive creation is O_EXCL on local paths and mode "xb" on fsspec filesystems that support it
(memory, local; s3fs with conditional writes). Where a filesystem has no exclusive create, the object
is written after an existence check and read back: a best effort with a small race window.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from extract.store.layout import is_local, local_path


class RootObjects:
    """The few non-Zarr objects diffbank keeps at a store's root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.created_root = False  # this process made the store's folder (removed again if left empty)
        self.local = is_local(url)
        if self.local:
            self.root = local_path(url)
            self.fs: Any = None  # an fsspec filesystem (untyped) for remote stores
        else:
            from fsspec.core import url_to_fs

            self.fs, path = url_to_fs(url, **(storage_options or {}))
            self.root = path.rstrip("/")

    def _path(self, key: str) -> Any:
        return self.root / key if self.local else f"{self.root}/{key}"

    def read(self, key: str) -> bytes | None:
        try:
            if self.local:
                return self._path(key).read_bytes()
            return self.fs.cat_file(self._path(key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file() if self.local else bool(self.fs.exists(self._path(key)))

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False when it does."""
        if self.local:
            if not self.root.exists():
                self.root.mkdir(parents=True)
                self.created_root = True
            try:
                fd = os.open(self._path(key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        path = self._path(key)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            pass  # no exclusive create here: check, write, read back (best effort, see the module doc)
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return self.read(key) == data

    def replace(self, key: str, data: bytes) -> None:
        if self.local:
            tmp = self._path(f"{key}.{uuid.uuid4().hex}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, self._path(key))
        else:
            self.fs.pipe_file(self._path(key), data)

    def delete(self, key: str) -> None:
        try:
            if self.local:
                self._path(key).unlink()
            else:
                self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def names(self) -> list[str]:
        """Top-level entries of the store (empty when it does not exist)."""
        if self.local:
            return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def wipe(self, keep: frozenset[str] = frozenset()) -> None:
        """Delete everything in the store except `keep` (an interrupted creation's leftovers)."""
        import shutil

        for name in self.names():
            if name in keep:
                continue
            if self.local:
                p = self.root / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            else:
                self.fs.rm(self._path(name), recursive=True)

    def remove_partials(self) -> None:
        """Zarr's half-written temporary files left by a killed writer (local stores only)."""
        if self.local and self.root.is_dir():
            for p in self.root.rglob("*.partial"):
                p.unlink(missing_ok=True)
