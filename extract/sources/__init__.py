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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extract.idx import FASHION_MNIST_FILES, find_idx_file
from extract.sources.arrays import DigitsSource, HDF5Source, IDXSource
from extract.sources.base import (
    ImageSource,
    SourceError,
    SourceItem,
    decode_image_file,
    open_image_file,
    to_rgb,
    to_rgb_array,
)
from extract.sources.files import CSVSource, FolderSource, folder_split_dirs

__all__ = [
    "CSVSource",
    "DigitsSource",
    "FolderSource",
    "HDF5Source",
    "IDXSource",
    "ImageSource",
    "SourceError",
    "SourceItem",
    "check_dataset",
    "decode_image_file",
    "open_image_file",
    "to_rgb",
    "folder_split_dirs",
    "open_source",
    "to_rgb_array",
]
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
        source = FolderSource(_required(full_path, kind))
    elif kind == "csv":
        source = CSVSource(_required(full_path, kind))
    elif kind == "hdf5":
        source = HDF5Source(_required(full_path, kind))
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


def _required(path: Path | None, kind: str) -> Path:
    if path is None:
        raise SourceError(f"a {kind} dataset needs a path")
    return path


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
