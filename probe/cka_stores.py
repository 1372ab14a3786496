"""CKA between every pair of a store's features (or against another store's, on shared sample ids),
within a memory budget: rows are read in shuffled windows that fit it and fed to `MinibatchCKA` in
minibatches; a JSON record and a heat map.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from extract.store import open_store
from probe.budget import parse_memory
from probe.cka import MIN_BATCH, MinibatchCKA
from probe.errors import ProbeDataError

ESTIMATOR = (
    "linear CKA from the minibatch-averaged unbiased HSIC (Nguyen, Raghu & Kornblith 2021); "
    "minibatches drawn from a seeded shuffle of the rows"
)


@dataclasses.dataclass
class CKAResult:
    row_features: list[str]
    col_features: list[str]
    cka: np.ndarray  # (rows, cols)
    store: str
    other: str | None
    split: str | None
    rows: int  # rows used (whole minibatches)
    batch_size: int
    batches: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        matrix = [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in self.cka]
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "cka"}
        return {**out, "estimator": ESTIMATOR, "cka": matrix}

    def save(self, out_dir: str | os.PathLike) -> tuple[Path, Path | None]:
        """cka.json, and cka.png where matplotlib is installed."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = out / "cka.json"
        record.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        try:
            import matplotlib  # noqa: F401  (the plots extra)
        except ModuleNotFoundError:
            return record, None
        return record, plot_cka(self, out / "cka.png")


def plot_cka(result: CKAResult, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows, cols = len(result.row_features), len(result.col_features)
    side = max(4.0, 0.28 * max(rows, cols) + 2.5)
    fig, ax = plt.subplots(figsize=(side * max(cols, 1) / max(rows, cols, 1) + 1.5, side))
    image = ax.imshow(result.cka, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(cols), result.col_features, rotation=90, fontsize=6)
    ax.set_yticks(range(rows), result.row_features, fontsize=6)
    if result.other:
        ax.set_xlabel(result.other, fontsize=8)
    where = f"split {result.split}" if result.split else "every valid row"
    ax.set_title(
        f"linear CKA, {where}: {result.rows} rows, {result.batches} minibatches of {result.batch_size}", fontsize=8
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def _open(store: Any) -> Any:
    return open_store(os.fspath(store)) if isinstance(store, (str, os.PathLike)) else store


def _rows(store: Any, split: str | None) -> np.ndarray:
    if split is None:
        return np.flatnonzero(store.valid).astype(np.int64)
    splits = store.splits
    if split not in splits:
        raise ProbeDataError(f"{store.url} has no split {split!r}; splits: {', '.join(splits) or 'none'}")
    return splits[split]


def _shared(store: Any, rows: np.ndarray, other: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `store` and of `other` that hold the same sample ids, in `store`'s order."""
    ids = store.sample_ids[rows]
    other_rows = np.flatnonzero(other.valid)
    other_ids = other.sample_ids[other_rows]
    if len(set(other_ids)) != len(other_ids):
        raise ProbeDataError(f"{other.url} holds repeated sample ids: rows cannot be matched by id")
    where = dict(zip(other_ids.tolist(), other_rows.tolist()))
    keep = np.array([i in where for i in ids.tolist()], dtype=bool)
    return rows[keep], np.array([where[i] for i in ids[keep].tolist()], dtype=np.int64)


def _features(store: Any, names: Sequence[str] | None) -> list[str]:
    available = store.feature_names("center")
    if not names:
        return available
    unknown = [n for n in names if n not in store.feature_names(None)]
    if unknown:
        raise ProbeDataError(f"{store.url} has no feature {unknown[0]!r}; features: {', '.join(available)}")
    return list(names)


def _row_bytes(store: Any, names: Sequence[str]) -> int:
    return sum(4 * math.prod(store.feature_info(n).shape) for n in names)


def plan(n_rows: int, features: int, row_bytes: int, batch_size: int, budget: int) -> tuple[int, int]:
    """(minibatch rows, window rows) within `budget` bytes: half for the minibatch's U-centred Gram
    matrices (features x n² float64, plus two n² scratch), half for a window of float32 rows."""
    per_gram = 8 * (features + 2)
    n = min(batch_size, n_rows, int(math.isqrt(max(budget // 2 // per_gram, 0))))
    if n < MIN_BATCH:
        raise ProbeDataError(
            f"the memory budget of {budget} bytes does not fit a minibatch of {MIN_BATCH} rows for "
            f"{features} features ({per_gram * MIN_BATCH**2 * 2} bytes); raise --memory-budget"
        )
    window = (budget // 2 // max(row_bytes, 1)) // n * n
    if window < n:
        raise ProbeDataError(
            f"the memory budget of {budget} bytes does not hold {n} rows of every feature "
            f"({n * row_bytes} bytes); raise --memory-budget or name fewer --feature"
        )
    return n, min(window, n_rows // n * n)


def _read(store: Any, names: Sequence[str], rows: np.ndarray) -> list[np.ndarray]:
    """Each feature at `rows` (any order), flattened, read in row order and put back in the asked order."""
    order = np.argsort(rows, kind="stable")
    out = []
    for name in names:
        data = store.read(name, rows[order])
        back = np.empty_like(data)
        back[order] = data
        out.append(back.reshape(len(rows), -1))
    return out


def store_cka(
    store: Any,
    other: Any = None,
    *,
    split: str | None = None,
    features: Sequence[str] | None = None,
    other_features: Sequence[str] | None = None,
    batch_size: int = 512,
    memory_budget: int | float | str | None = None,
    seed: int = 0,
) -> CKAResult:
    """Linear CKA between every pair of `store`'s features (center view), or between its features and
    `other`'s on the rows they share by sample id. Only whole minibatches are used."""
    store, other_store = _open(store), _open(other) if other is not None else None
    names = _features(store, features)
    rows = _rows(store, split)
    if other_store is not None:
        other_names = _features(other_store, other_features)
        rows, other_rows = _shared(store, rows, other_store)
    else:
        other_names, other_rows = names, rows
    if len(rows) < MIN_BATCH:
        raise ProbeDataError(f"CKA needs at least {MIN_BATCH} rows; {len(rows)} are selected")
    count = len(names) + (len(other_names) if other_store is not None else 0)
    row_bytes = _row_bytes(store, names) + (_row_bytes(other_store, other_names) if other_store is not None else 0)
    n, window = plan(len(rows), count, row_bytes, int(batch_size), parse_memory(memory_budget))
    order = np.random.default_rng(seed).permutation(len(rows))[: len(rows) // n * n]
    acc = MinibatchCKA()
    for start in range(0, len(order), window):
        chosen = order[start : start + window]
        a = _read(store, names, rows[chosen])
        b = _read(other_store, other_names, other_rows[chosen]) if other_store is not None else None
        for lo in range(0, len(chosen), n):
            acc.update([x[lo : lo + n] for x in a], None if b is None else [x[lo : lo + n] for x in b])
    return CKAResult(
        names,
        other_names,
        acc.cka_,
        store.url,
        None if other_store is None else other_store.url,
        split,
        acc.rows_seen_,
        n,
        acc.batches_,
        seed,
    )
