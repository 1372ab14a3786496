"""Sources whose pixels are arrays: an HDF5 bank, Fashion-MNIST's IDX files, scikit-learn's digits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extract.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_FILES, IDXError, find_idx_file, read_idx
from extract.sources.base import ImageSource, SourceError

# ---------------------------------------------------------------------------------------------
# HDF5 image banks
# ---------------------------------------------------------------------------------------------


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class HDF5Source(ImageSource):
    kind = "hdf5"

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        self._h5: Any = None
        self._pid: int | None = None
        try:
            with h5py.File(self.path, "r") as f:
                images = f.get("images")
                if not isinstance(images, h5py.Dataset) or images.ndim not in (3, 4) or images.dtype != np.uint8:
                    raise SourceError(f"HDF5 bank {self.path} needs a dataset 'images' of uint8 (N, H, W[, C])")
                n = images.shape[0]
                labels = np.asarray(f["labels"][()], dtype=np.int64) if "labels" in f else np.full(n, -1, np.int64)
                splits = _strings(f["split"][()]) if "split" in f else ["all"] * n
                class_names = (
                    [str(c) for c in _strings(np.asarray(f.attrs["class_names"]))]
                    if "class_names" in f.attrs
                    else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
                )
                if "ids" in f:
                    ids = _strings(f["ids"][()])
                else:
                    counter: dict[str, int] = {}
                    ids = []
                    for s in splits:
                        ids.append(f"{s}/{counter.get(s, 0)}")
                        counter[s] = counter.get(s, 0) + 1
        except OSError as exc:
            raise SourceError(f"cannot open HDF5 bank {self.path}: {exc}") from None
        for what, values in (("labels", labels), ("split", splits), ("ids", ids)):
            if len(values) != n:
                raise SourceError(f"HDF5 bank {self.path}: {len(values)} {what} for {n} images")
        super().__init__(ids, labels, splits, class_names)

    def describe(self) -> str:
        return f"HDF5 bank {self.path}"

    def _file(self) -> Any:
        # h5py handles survive neither pickling nor fork: open once per process, on first use.
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def _read(self, row: int) -> np.ndarray:
        return np.asarray(self._file()["images"][row])

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None
        return state


# ---------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST layout)
# ---------------------------------------------------------------------------------------------


class IDXSource(ImageSource):
    kind = "idx"

    def __init__(self, directory: str | os.PathLike | None = None, splits: Sequence[str] | None = None):

        self.directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
        wanted = tuple(splits) if splits is not None else tuple(FASHION_MNIST_FILES)
        unknown = [s for s in wanted if s not in FASHION_MNIST_FILES]
        if unknown:
            raise SourceError(f"IDX dataset has splits {', '.join(FASHION_MNIST_FILES)}, not {', '.join(unknown)}")
        self._image_files: dict[str, Path] = {}
        self._arrays: dict[str, Any] = {}
        ids: list[str] = []
        labels: list[int] = []
        row_splits: list[str] = []
        self._offset: dict[str, int] = {}
        for split in wanted:
            img_stem, lbl_stem = FASHION_MNIST_FILES[split]
            try:
                self._image_files[split] = find_idx_file(self.directory, img_stem)
                split_labels = read_idx(find_idx_file(self.directory, lbl_stem)).astype(np.int64)
            except (FileNotFoundError, IDXError) as exc:
                raise SourceError(str(exc)) from None
            self._offset[split] = len(ids)
            ids.extend(f"{split}/{k}" for k in range(len(split_labels)))
            labels.extend(split_labels.tolist())
            row_splits.extend([split] * len(split_labels))
        super().__init__(ids, labels, row_splits, FASHION_MNIST_CLASSES)

    def describe(self) -> str:
        return f"IDX dataset {self.directory}"

    def _images(self, split: str) -> np.ndarray:
        # Decoded once per process; a broken file is remembered so every row reports it cheaply.
        if split not in self._arrays:
            try:
                arr = read_idx(self._image_files[split])
                if arr.ndim != 3 or arr.dtype != np.uint8:
                    raise ValueError(
                        f"{self._image_files[split]}: expected uint8 (N, H, W), got {arr.dtype} {arr.shape}"
                    )
                self._arrays[split] = arr
            except Exception as exc:
                self._arrays[split] = exc
        got = self._arrays[split]
        if isinstance(got, Exception):
            raise got
        return got

    def _read(self, row: int) -> np.ndarray:
        split = str(self._all_splits[row])
        return self._images(split)[row - self._offset[split]]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # 47 MB of pixels is not worth shipping to every worker
        return state


# ---------------------------------------------------------------------------------------------
# scikit-learn's digits (no files)
# ---------------------------------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float (1797, 8, 8) in 0..16, targets): scikit-learn's bundled digits.

    Read straight from the CSV scikit-learn ships: `sklearn.datasets.load_digits` gives the same
    arrays but importing it costs seconds (scipy), several times over in a worker pool.
    """
    import importlib.util

    found = importlib.util.find_spec("sklearn")
    if found is not None and found.origin is not None:
        path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


class DigitsSource(ImageSource):
    kind = "digits"

    def __init__(self) -> None:
        images, target = _load_digits()
        # 0..16 intensities -> 0..255, rounded: a real (tiny) uint8 image dataset.
        self._images = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        n = len(self._images)
        row_splits = ["test" if i % 5 == 4 else "train" for i in range(n)]
        counter = {"train": 0, "test": 0}
        ids = []
        for s in row_splits:
            ids.append(f"{s}/{counter[s]}")
            counter[s] += 1
        super().__init__(ids, target.astype(np.int64), row_splits, [str(i) for i in range(10)])

    def describe(self) -> str:
        return "digits dataset (scikit-learn)"

    def _read(self, row: int) -> np.ndarray:
        return self._images[row]
