"""Sources that are files on disk: a folder tree of images, or a CSV/TSV list of image paths."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from extract.sources.base import IMAGE_EXTENSIONS, SPLIT_DIR_NAMES, ImageSource, SourceError, open_image_file

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
    found: list[str] = []
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

    def _read(self, row: int) -> Any:
        return open_image_file(self.root / str(self._all_ids[row]))


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

    def _read(self, row: int) -> Any:
        p = Path(str(self._all_ids[row])).expanduser()
        return open_image_file(p if p.is_absolute() else self.base / p)


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
