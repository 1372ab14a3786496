"""A run's per-image scores, `out_dir/logits.npz`: what `probe compare` pairs two runs on.

For each scored split (val, test) the file holds `{split}_logits` (N, classes) float32, `{split}_rows` (store
row indices), `{split}_labels` and, when the store names its samples, `{split}_ids` (fixed-width unicode, so
the file loads without pickle); `store_fingerprint` names the store. Runs on one store compare row by row;
runs on stores that hold the same sample ids compare id by id.

A split's logits can be large (1,000 classes x 128,000 ImageNet test rows: 0.5 GB): a probe writes them block by
block to a `ScoreFile` beside the run, scores them block by block, and copies the file into logits.npz, so it
never holds them in memory. The npz is the same either way (stored members, one .npy per array).
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LOGITS_FILE",
    "RESULTS_FILE",
    "SplitScores",
    "ScoreFile",
    "score_file_path",
    "remove_stale_score_files",
    "write_logits",
    "read_logits",
    "ids_digest",
]

LOGITS_FILE = "logits.npz"
RESULTS_FILE = "results.json"  # the run's report, next to its scores


# A run's score files while it evaluates: hidden, one per head (its index) and split, gone once in logits.npz.
_SCORE_FILE = re.compile(r"\.(\d+)\.(\w+)_logits\.npy")


def score_file_path(directory: Path, index: int, split: str) -> Path:
    return Path(directory) / f".{index}.{split}_logits.npy"


def remove_stale_score_files(directory: Path) -> list[Path]:
    """Remove the score files a killed run left in `directory` (a run removes its own, on error too, but not
    when killed); returns what it removed. A run calls this as it starts, before it writes any."""
    stale = [p for p in Path(directory).iterdir() if _SCORE_FILE.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# Rows of scores a ScoreFile hands out at once (of float32: 32 MiB at 1,000 classes).
SCORE_BLOCK_VALUES = 1 << 23


class ScoreFile:
    """(N, classes) float32 scores on disk as a .npy, written and read a block of rows at a time.

    Plain file writes and reads, not a memory map: a mapped file's pages count in the process's resident memory.
    """

    def __init__(self, path: Path, rows: int, classes: int):
        self.path = Path(path)
        self.shape = (int(rows), int(classes))
        self._filled = 0
        self._file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)
        self._data_offset = self._file.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def append(self, block: np.ndarray) -> None:
        """Write the next rows (float32, (n, classes))."""
        if block.ndim != 2 or block.shape[1] != self.shape[1] or self._filled + len(block) > self.shape[0]:
            raise ValueError(f"a block of shape {block.shape} does not continue scores of shape {self.shape}")
        np.ascontiguousarray(block, dtype="<f4").tofile(self._file)
        self._filled += len(block)

    def close(self) -> None:
        """Finish writing; every row must have been written."""
        self._file.close()
        if self._filled != self.shape[0]:
            raise ValueError(f"{self._filled} of {self.shape[0]} rows of scores were written")

    def blocks(self) -> Iterator[np.ndarray]:
        """The scores, in order, a block of rows at a time."""
        rows, classes = self.shape
        step = max(1, SCORE_BLOCK_VALUES // max(1, classes))
        with open(self.path, "rb") as f:
            f.seek(self._data_offset)
            for lo in range(0, rows, step):
                n = min(step, rows - lo)
                yield np.fromfile(f, dtype="<f4", count=n * classes).reshape(n, classes)

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SplitScores:
    """One split's scores as a run saved them: logits (in memory, or a `ScoreFile` while a run writes them),
    store rows, labels and sample ids (None if unnamed)."""

    logits: np.ndarray | ScoreFile
    rows: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray | None

    @property
    def correct(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("these scores carry no labels")
        blocks = self.logits.blocks() if isinstance(self.logits, ScoreFile) else [self.logits]
        return np.concatenate([b.argmax(1) for b in blocks]) == self.labels


def ids_digest(ids: np.ndarray) -> str:
    """Short sha256 of a sequence of sample ids (order matters), for results.json."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_logits(path: Path, scores: Mapping[str, SplitScores], store_fingerprint: str | None) -> dict[str, Any]:
    """Write `scores` ({split: SplitScores}) to `path` (what `np.savez` writes: one stored .npy per array;
    a `ScoreFile`'s logits are copied from disk); returns what results.json records about the file."""
    saved: dict[str, np.ndarray | ScoreFile] = {"store_fingerprint": np.asarray(store_fingerprint or "")}
    record: dict[str, Any] = {"file": path.name, "store_fingerprint": store_fingerprint, "splits": {}}
    for split, s in scores.items():
        logits = s.logits
        saved[f"{split}_logits"] = logits if isinstance(logits, ScoreFile) else np.asarray(logits, dtype=np.float32)
        saved[f"{split}_rows"] = np.asarray(s.rows, dtype=np.int64)
        if s.labels is not None:
            saved[f"{split}_labels"] = np.asarray(s.labels, dtype=np.int64)
        if s.ids is not None:
            saved[f"{split}_ids"] = np.asarray(s.ids, dtype=str)
        record["splits"][split] = {
            "n": int(len(s.rows)),
            "ids_sha256_16": None if s.ids is None else ids_digest(s.ids),
        }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in saved.items():
            if isinstance(value, ScoreFile):
                zf.write(value.path, arcname=f"{key}.npy")
            else:
                with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)
    return record


def read_logits(path: Path) -> tuple[dict[str, SplitScores], str | None]:
    """({split: SplitScores}, store fingerprint or None) from a logits.npz (never unpickles)."""
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        fingerprint = str(f["store_fingerprint"]) if "store_fingerprint" in keys else ""
        out = {}
        for split in sorted(k[: -len("_logits")] for k in keys if k.endswith("_logits")):
            out[split] = SplitScores(
                logits=np.asarray(f[f"{split}_logits"]),
                rows=np.asarray(f[f"{split}_rows"]),
                labels=np.asarray(f[f"{split}_labels"]) if f"{split}_labels" in keys else None,
                ids=np.asarray(f[f"{split}_ids"]) if f"{split}_ids" in keys else None,
            )
    return out, fingerprint or None
