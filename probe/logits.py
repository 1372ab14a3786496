"""A run's per-image scores, `out_dir/logits.npz`: what `probe compare` pairs two runs on.

For each scored split (val, test) the file holds `{split}_logits` (N, classes) float32, `{split}_rows` (store
row indices), `{split}_labels` and, when the store names its samples, `{split}_ids` (fixed-width unicode, so
the file loads without pickle); `store_fingerprint` names the store. Runs on one store compare row by row;
runs on stores that hold the same sample ids compare id by id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LOGITS_FILE", "RESULTS_FILE", "SplitScores", "write_logits", "read_logits", "ids_digest"]

LOGITS_FILE = "logits.npz"
RESULTS_FILE = "results.json"  # the run's report, next to its scores


@dataclass(frozen=True)
class SplitScores:
    """One split's scores as a run saved them: logits, store rows, labels and sample ids (None if unnamed)."""

    logits: np.ndarray
    rows: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray | None

    @property
    def correct(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("these scores carry no labels")
        return np.asarray(self.logits.argmax(1) == self.labels)


def ids_digest(ids: np.ndarray) -> str:
    """Short sha256 of a sequence of sample ids (order matters), for results.json."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def write_logits(path: Path, scores: Mapping[str, SplitScores], store_fingerprint: str | None) -> dict[str, Any]:
    """Write `scores` ({split: SplitScores}) to `path`; returns what results.json records about the file."""
    saved: dict[str, np.ndarray] = {"store_fingerprint": np.asarray(store_fingerprint or "")}
    record: dict[str, Any] = {"file": path.name, "store_fingerprint": store_fingerprint, "splits": {}}
    for split, s in scores.items():
        saved[f"{split}_logits"] = np.asarray(s.logits, dtype=np.float32)
        saved[f"{split}_rows"] = np.asarray(s.rows, dtype=np.int64)
        if s.labels is not None:
            saved[f"{split}_labels"] = np.asarray(s.labels, dtype=np.int64)
        if s.ids is not None:
            saved[f"{split}_ids"] = np.asarray(s.ids, dtype=str)
        record["splits"][split] = {
            "n": int(len(s.rows)),
            "ids_sha256_16": None if s.ids is None else ids_digest(s.ids),
        }
    np.savez(path, **saved)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle flag
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
