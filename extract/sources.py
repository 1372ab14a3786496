"""Image sources: the rows of a dataset, by index, as uint8 RGB arrays — failures as values.

Every source holds a small, eagerly read catalog (sample ids, labels, split of each row) and reads
pixels only in `load(i)`. Sources pickle cheaply and safely: file handles (HDF5) and decoded
arrays (IDX) are opened lazily in the process that uses them and dropped when pickled, so a
source can be handed to DataLoader workers or dask tasks. A corrupt, truncated or unreadable image
comes back as a `SourceItem` with `error` set; whether that stops a run is the caller's choice.

Kinds (`dataset.kind` in a spec):
- folder: `root/<split>/<class>/.../img` when every top-level folder is a split name (train, val,
  test, ...), else `root/<class>/.../img` as the single split 'all'. Labels index the sorted
  union of class-folder names across splits; images lying directly in a split folder get -1.
- csv: a CSV/TSV list with a header naming `path`, `label` and optionally `split` columns; paths
  are relative to the list file. Integer labels are used as they are; other labels are numbered
  by their sorted unique names. Empty labels are -1; without a split column the split is 'all'.
- hdf5: datasets `images` (N, H, W[, C]) uint8 and `labels` (N,), optional `split` and `ids`
  (strings) and an optional `class_names` attribute.
- idx: Fashion-MNIST's four IDX files (plain or .gz) in one folder (splits train, test).
- digits: scikit-learn's bundled 8x8 digits scaled to uint8 (no files); every fifth image
  (row % 5 == 4) is 'test', the rest 'train'.

`open_source(dataset_spec)` keeps the spec's splits (in the spec's order; default: all, in the
source's order) and its limit (the first n rows of each split); indices 0..N-1 run over what is
kept, split after split. Sample ids are relative paths, or 'split/k' (k-th row of that split).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# Top-level folder names that mark a split layout (root/train/<class>/...).
SPLIT_DIR_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev"})
DIGITS_SPLITS = ("train", "test")
_MAX_REASON = 300


class SourceError(ValueError):
    """A dataset that cannot be opened as a whole (missing path, bad layout, unknown split)."""


@dataclass(frozen=True)
class SourceItem:
    index: int  # row in the opened source (0..N-1)
    sample_id: str
    label: int  # -1 when unlabelled
    split: str
    image: np.ndarray | None  # uint8 (H, W, 3) RGB; None when `error` is set
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or uint8 array (H, W), (H, W, 1|3|4) as uint8 (H, W, 3) RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        # As the reference does: grayscale, palette and alpha images all become plain RGB.
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8).copy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W[, 1|3|4]), got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # PIL's RGBA -> RGB drops alpha too
    return np.ascontiguousarray(arr)


def decode_image_file(path: str | os.PathLike) -> np.ndarray:
    """Fully decode one image file (so truncation shows now, not later) as uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb_array(im)


# ---------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------


class ImageSource:
    """Rows of a dataset: a catalog (ids, labels, splits) plus pixels on demand.

    Subclasses fill the catalog of *all* rows and implement `_read(row) -> uint8 array`;
    `select(splits, limit)` narrows that to the rows a store holds.
    """

    kind = "abstract"

    def __init__(
        self,
        ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        row_splits: Sequence[str],
        class_names: Sequence[str],
    ):
        self._all_ids = np.asarray(list(ids), dtype=object)
        self._all_labels = np.asarray(labels, dtype=np.int64)
        self._all_splits = np.asarray(list(row_splits), dtype=object)
        if not len(self._all_ids) == len(self._all_labels) == len(self._all_splits):
            raise SourceError(
                f"{len(self._all_ids)} ids, {len(self._all_labels)} labels and "
                f"{len(self._all_splits)} split names: they must match"
            )
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.select(None, None)

    # -- selection ---------------------------------------------------------------------------

    @property
    def available_splits(self) -> tuple[str, ...]:
        """Split names in order of first appearance."""
        seen: dict[str, None] = {}
        for s in self._all_splits:
            seen.setdefault(s, None)
        return tuple(seen)

    def select(self, splits: Sequence[str] | None = None, limit: int | Mapping[str, int] | None = None) -> ImageSource:
        """Keep `splits` (in that order; None = all) and at most `limit` first rows of each; returns self."""
        available = self.available_splits
        wanted = tuple(splits) if splits is not None else available
        missing = [s for s in wanted if s not in available]
        if missing:
            raise SourceError(
                f"{self.describe()}: no split(s) {', '.join(map(repr, missing))}; "
                f"it has {', '.join(map(repr, available)) or 'no rows'}"
            )
        rows, ranges, start = [], {}, 0
        for split in wanted:
            idx = np.flatnonzero(self._all_splits == split)
            cap = limit if isinstance(limit, int) or limit is None else limit.get(split)
            if cap is not None:
                idx = idx[:cap]
            rows.append(idx)
            ranges[split] = np.arange(start, start + len(idx), dtype=np.int64)
            start += len(idx)
        self._rows = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        self.splits: dict[str, np.ndarray] = ranges
        return self

    # -- catalog of the kept rows ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def sample_ids(self) -> list[str]:
        return [str(s) for s in self._all_ids[self._rows]]

    @property
    def labels(self) -> np.ndarray:
        return self._all_labels[self._rows]

    @property
    def split_of_rows(self) -> np.ndarray:
        return self._all_splits[self._rows]

    def manifest_hash(self) -> str:
        """sha256 over (id, label, split) of every kept row, in order: the dataset's identity."""
        h = hashlib.sha256()
        for sid, label, split in zip(
            self._all_ids[self._rows], self._all_labels[self._rows], self._all_splits[self._rows]
        ):
            h.update(f"{sid}\t{int(label)}\t{split}\n".encode())
        return h.hexdigest()

    def describe(self) -> str:
        return self.kind

    # -- pixels ------------------------------------------------------------------------------

    def _read(self, row: int) -> np.ndarray:
        raise NotImplementedError

    def load(self, i: int) -> SourceItem:
        """Row i; an unreadable image gives an item with `error` set instead of raising."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a source of {len(self)} rows")
        i = int(i) % len(self)
        row = int(self._rows[i])
        sid, label, split = str(self._all_ids[row]), int(self._all_labels[row]), str(self._all_splits[row])
        try:
            image = to_rgb_array(self._read(row))
        except Exception as exc:  # any decoding failure is data, recorded by the caller
            return SourceItem(i, sid, label, split, None, _reason(exc))
        return SourceItem(i, sid, label, split, image)

    __getitem__ = load

    def __iter__(self) -> Iterable[SourceItem]:
        return (self.load(i) for i in range(len(self)))


# ---------------------------------------------------------------------------------------------
# Class-folder trees
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def folder_split_dirs(root: str | os.PathLike) -> dict[str, Path]:
    """Split name -> folder: the top-level folders if all are split names, else {'all': root}."""
    root = Path(root)
    top = _subdirs(root)
    if top and all(name.lower() in SPLIT_DIR_NAMES for name in top):
        return {name: root / name for name in top}
    return {"all": root}


def _walk_images(folder: Path) -> list[str]:
    """Image files under `folder`, as sorted relative posix paths (deterministic across machines)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        found.extend((rel / f).as_posix() for f in filenames if _is_image(f))
    return sorted(found)


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"folder dataset {self.root} is not a directory")
        split_dirs = folder_split_dirs(self.root)
        classes = sorted({c for d in split_dirs.values() for c in _subdirs(d)})
        index = {c: i for i, c in enumerate(classes)}
        ids, labels, splits = [], [], []
        for split, folder in split_dirs.items():
            prefix = "" if split == "all" else f"{split}/"
            for rel in _walk_images(folder):
                first = rel.split("/", 1)[0]
                ids.append(prefix + rel)
                labels.append(index[first] if "/" in rel else -1)
                splits.append(split)
        super().__init__(ids, labels, splits, classes)

    def describe(self) -> str:
        return f"folder dataset {self.root}"

    def _read(self, row: int) -> np.ndarray:
        return decode_image_file(self.root / str(self._all_ids[row]))


# ---------------------------------------------------------------------------------------------
# CSV / TSV lists
# ---------------------------------------------------------------------------------------------


def _read_list_header(path: Path) -> tuple[str, list[str]]:
    """(delimiter, column names) of a CSV/TSV list file."""
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    return delimiter, [c.strip() for c in next(csv.reader(io.StringIO(first), delimiter=delimiter), [])]


class CSVSource(ImageSource):
    kind = "csv"

    def __init__(self, list_file: str | os.PathLike):
        self.list_file = Path(list_file)
        self.base = self.list_file.parent
        try:
            delimiter, columns = _read_list_header(self.list_file)
            with open(self.list_file, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter=delimiter))
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read list file {self.list_file}: {exc}") from None
        for needed in ("path", "label"):
            if needed not in columns:
                raise SourceError(
                    f"list file {self.list_file} has columns {columns}; it needs 'path' and 'label' "
                    f"(and optionally 'split') in a header line"
                )
        paths = [(r.get("path") or "").strip() for r in rows]
        for n, p in enumerate(paths):
            if not p:
                raise SourceError(f"list file {self.list_file}, data line {n + 1}: empty path")
        raw_labels = [(r.get("label") or "").strip() for r in rows]
        splits = [(r.get("split") or "").strip() or "all" for r in rows] if "split" in columns else ["all"] * len(rows)
        labels, class_names = _number_labels(raw_labels)
        super().__init__(paths, labels, splits, class_names)

    def describe(self) -> str:
        return f"list file {self.list_file}"

    def _read(self, row: int) -> np.ndarray:
        p = Path(str(self._all_ids[row])).expanduser()
        return decode_image_file(p if p.is_absolute() else self.base / p)


def _number_labels(raw: list[str]) -> tuple[list[int], list[str]]:
    """Integer labels as they are; named labels numbered by sorted unique name; '' -> -1."""
    present = [r for r in raw if r]
    try:
        ints = [int(r) for r in present]
    except ValueError:
        names = sorted(set(present))
        index = {n: i for i, n in enumerate(names)}
        return [index[r] if r else -1 for r in raw], names
    top = max(ints, default=-1)
    return [int(r) if r else -1 for r in raw], [str(i) for i in range(top + 1)]


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
        from extract.idx import (
            FASHION_MNIST_CLASSES,
            FASHION_MNIST_DIR,
            FASHION_MNIST_FILES,
            IDXError,
            find_idx_file,
            read_idx,
        )

        self.directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
        wanted = tuple(splits) if splits is not None else tuple(FASHION_MNIST_FILES)
        unknown = [s for s in wanted if s not in FASHION_MNIST_FILES]
        if unknown:
            raise SourceError(f"IDX dataset has splits {', '.join(FASHION_MNIST_FILES)}, not {', '.join(unknown)}")
        self._image_files: dict[str, Path] = {}
        self._arrays: dict[str, Any] = {}
        ids, labels, row_splits = [], [], []
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
            from extract.idx import read_idx

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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def open_source(dataset: Any, base_dir: str | os.PathLike | None = None) -> ImageSource:
    """The source a spec's `dataset` section describes (a `DatasetSpec` or its dict), splits and limit applied."""
    if isinstance(dataset, Mapping):
        kind, path = dataset["kind"], dataset.get("path")
        splits, limit = dataset.get("splits"), dataset.get("limit")
        full_path = _full_path(path, base_dir)
    else:
        kind, path, splits, limit = dataset.kind, dataset.path, dataset.splits, dataset.limit
        full_path = dataset.resolved_path() if base_dir is None else _full_path(path, base_dir)
    source: ImageSource
    if kind == "folder":
        source = FolderSource(full_path)
    elif kind == "csv":
        source = CSVSource(full_path)
    elif kind == "hdf5":
        source = HDF5Source(full_path)
    elif kind == "idx":
        source = IDXSource(full_path, splits)
    elif kind == "digits":
        source = DigitsSource()
    else:
        raise SourceError(f"unknown dataset kind {kind!r}")
    return source.select(splits, limit)


def _full_path(path: str | None, base_dir: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def check_dataset(kind: str, path: Path | None, splits: Sequence[str] | None) -> list[str]:
    """Cheap problems with a dataset's files, without decoding images or walking a whole tree."""
    if kind == "digits":
        return []
    if path is None:
        return [f"a {kind} dataset needs a path"]
    if not path.exists():
        return [f"{path} does not exist"]
    if kind in ("folder", "idx"):
        if not path.is_dir():
            return [f"{path} is not a directory (a {kind} dataset is a folder)"]
        if not os.access(path, os.R_OK | os.X_OK):
            return [f"{path} is not readable"]
    elif not path.is_file():
        return [f"{path} is not a file (a {kind} dataset is one {'list file' if kind == 'csv' else 'HDF5 file'})"]
    elif not os.access(path, os.R_OK):
        return [f"{path} is not readable"]
    try:
        if kind == "folder":
            have = tuple(folder_split_dirs(path))
            return [f"{path} has no split {s!r} (it has {', '.join(have)})" for s in splits or () if s not in have]
        if kind == "idx":
            from extract.idx import FASHION_MNIST_FILES, find_idx_file

            problems = []
            for split in splits or FASHION_MNIST_FILES:
                for stem in FASHION_MNIST_FILES.get(split, ()):
                    try:
                        find_idx_file(path, stem)
                    except FileNotFoundError as exc:
                        problems.append(str(exc))
            return problems
        # A list file or an HDF5 bank: reading the catalog is cheap and catches bad layouts now.
        source = CSVSource(path) if kind == "csv" else HDF5Source(path)
        source.select(splits, None)
    except (SourceError, OSError) as exc:
        return [str(exc)]
    return []
