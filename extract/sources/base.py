"""Image sources as values: one row by index, as uint8 RGB, or the reason it failed."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# Top-level folder names that mark a split layout (root/train/<class>/...).
SPLIT_DIR_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev"})
DIGITS_SPLITS = ("train", "test")
_MAX_REASON = 300
# Integer grayscale modes wider than 8 bits ("I" is how Pillow opens 16-bit PNG and TIFF grayscale).
_WIDE_GRAY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


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


def to_rgb(image: Any) -> Any:
    """A PIL image as an RGB PIL image (wide grayscale: a uint8 array); arrays as `to_rgb_array`.

    Pixels stay in PIL for the preprocessing that follows, so nothing goes PIL -> numpy -> PIL.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        return to_rgb_array(image)
    if image.mode in _WIDE_GRAY:
        # PIL's convert() clips 16-bit values at 255 (a 16-bit photo turns white): scale instead,
        # keeping the high byte as Pillow itself does for 16-bit RGB(A) files.
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return np.ascontiguousarray(np.repeat(wide.astype(np.uint8)[:, :, None], 3, axis=2))
    # As the reference does (guided-diffusion's convert("RGB")): grayscale, palette, CMYK and alpha
    # images become plain RGB, alpha dropped and transparent palette entries shown as their colour.
    if image.mode != "RGB":
        with warnings.catch_warnings():  # "palette images with transparency ... RGBA": known, as the reference
            warnings.simplefilter("ignore", UserWarning)
            image = image.convert("RGB")
    return image


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or uint8 array (H, W), (H, W, 1|3|4) as uint8 (H, W, 3) RGB."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.uint8).copy()
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


def open_image_file(path: str | os.PathLike) -> Any:
    """Fully decode one image file (so truncation shows now, not later) as an RGB PIL image."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def decode_image_file(path: str | os.PathLike) -> np.ndarray:
    """Fully decode one image file as uint8 (H, W, 3) RGB."""
    return to_rgb_array(open_image_file(path))


# ---------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------


class ImageSource:
    """Rows of a dataset: a catalog (ids, labels, splits) plus pixels on demand.

    Subclasses fill the catalog of *all* rows and implement `_read(row)` (a uint8 array or PIL image);
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

    def _read(self, row: int) -> Any:
        """Row `row` of the whole catalog as decoded: a uint8 array or a loaded PIL image."""
        raise NotImplementedError

    def load(self, i: int) -> SourceItem:
        """Row i as uint8 (H, W, 3); an unreadable image gives an item with `error` set instead of raising."""
        return self._load(i, to_rgb_array)

    def load_rgb(self, i: int) -> SourceItem:
        """Row i as decoded, made RGB: a PIL image (files) or a uint8 array (array sources).

        For preprocessing that resizes in PIL anyway: it saves the PIL -> numpy -> PIL round trip.
        """
        return self._load(i, to_rgb)

    def _load(self, i: int, convert: Any) -> SourceItem:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a source of {len(self)} rows")
        i = int(i) % len(self)
        row = int(self._rows[i])
        sid, label, split = str(self._all_ids[row]), int(self._all_labels[row]), str(self._all_splits[row])
        try:
            image = convert(self._read(row))
        except Exception as exc:  # any decoding failure is data, recorded by the caller
            return SourceItem(i, sid, label, split, None, _reason(exc))
        return SourceItem(i, sid, label, split, image)

    __getitem__ = load

    def __iter__(self) -> Iterable[SourceItem]:
        return (self.load(i) for i in range(len(self)))
