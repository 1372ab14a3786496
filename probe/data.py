"""From a feature store to standardised torch batches, splits and label subsets.

`ProbeData` is the one object the probes read. It answers four questions, always the same way for a seed:

- **Which rows?** Splits come from the store (`train` / `val` / `test`); a missing validation split is carved,
  seeded and stratified, out of train (likewise a missing test split); a store without splits is split
  train/val/test the same way. Rows that failed extraction (`store.valid`) or have no label (-1) are left
  out and counted. Label subsets (`"1%"`, `"10%"`, `"5-shot"`) are drawn from train *after* validation is
  carved, so every subset of a seed is judged on the same validation rows.
- **Which scale?** Standardisation statistics come from the (subset) train rows only, in one float64
  pass with dask over shard-sized chunks (so out of core), and are cached per store object. Mode
  `"dim"` (default) standardises every element of the (C, H, W) map: this is what a linear head or a
  logistic regression wants (the paper's linear head has no normalisation of its own). `"channel"` shares
  one mean/std per channel across positions, which keeps the spatial structure token heads see; `"none"`
  passes values through. Dimensions without spread get std 1 instead of a division by ~0.
- **In memory or streamed?** When all used features fit `memory_budget` (default 25% of RAM) they are read
  once as standardised float32 arrays; otherwise batches are streamed shard by shard.
- **In which order?** One function (`epoch_order`) fixes an epoch's order in both modes: shards in a
  seeded random order, grouped into windows of about `shuffle_buffer` bytes (default 1 GiB; the whole split
  when it is smaller), rows shuffled within each window. The window does not depend on the memory budget,
  so both modes yield bit-identical batches and a run is reproducible on any machine.

Bad input fails early with `ProbeDataError` and a message that says what to do.
This module imports `extract.store` only: probing never needs the U-Net.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import torch

StandardizeMode = Literal["dim", "channel", "none"]
STANDARDIZE_MODES: tuple[str, ...] = ("dim", "channel", "none")

# Purposes of the random streams derived from one user seed: independent, and stable when another changes.
_KEY_SPLIT, _KEY_VAL, _KEY_TEST, _KEY_SUBSET, _KEY_ORDER = 11, 12, 13, 14, 15
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SPLITS: tuple[str, ...] = ("train", "val", "test")


class ProbeDataError(ValueError):
    """The store or the request cannot give a sound probe dataset; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------- utilities

def default_memory_budget(fraction: float = 0.25) -> int:
    """`fraction` of physical RAM in bytes (4 GiB when the platform cannot tell)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total * fraction)


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_memory(value: int | float | str | None) -> int:
    """Bytes from `None` (default budget), a number of bytes, or a string like `"2GiB"`, `"500MB"`, `"25%"`."""
    if value is None:
        return default_memory_budget()
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            return default_memory_budget(float(text[:-1]) / 100.0)
        match = _SIZE_RE.match(text)
        if not match:
            raise ProbeDataError(f"memory budget {value!r} is not understood: use bytes, '2GiB', '500MB' or '25%'")
        unit = (match.group(2) or "").lower().rstrip("b")
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 0:
        raise ProbeDataError(f"memory budget must be >= 0 bytes, got {value}")
    return int(value)


def rows_digest(rows: np.ndarray) -> str:
    """Short sha256 of a row index array: enough to tell two splits apart in a results file."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *keys]))


# ------------------------------------------------------------------------------------------------ subsets

@dataclass(frozen=True)
class Subset:
    """A label subset of train: a stratified fraction (`"1%"`) or k labelled samples per class (`"5-shot"`)."""

    kind: Literal["fraction", "shot"]
    value: float

    _RE_PCT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
    _RE_SHOT = re.compile(r"^\s*([0-9]+)\s*-?\s*shots?\s*$", re.IGNORECASE)

    @classmethod
    def parse(cls, text: str | Subset | None) -> Subset | None:
        if text is None or isinstance(text, Subset):
            return text
        if match := cls._RE_PCT.match(str(text)):
            pct = float(match.group(1))
            if not 0 < pct <= 100:
                raise ProbeDataError(f"subset {text!r}: the percentage must be in (0, 100]")
            return cls("fraction", pct / 100.0)
        if match := cls._RE_SHOT.match(str(text)):
            k = int(match.group(1))
            if k < 1:
                raise ProbeDataError(f"subset {text!r}: k must be at least 1")
            return cls("shot", float(k))
        raise ProbeDataError(f"subset {text!r} is not understood: use a percentage like '1%' or '10%', "
                             f"or 'K-shot' like '5-shot'")

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.kind == "fraction" else f"{int(self.value)}-shot"


def stratified_holdout(rows: np.ndarray, labels: np.ndarray, fraction: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (kept, held out) with about `fraction` of every class held out.

    Every class with at least two rows gives at least one to each side, so small classes stay represented.
    Both outputs are sorted (store order), which keeps reads sequential.
    """
    held: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rows[labels == cls]
        members = members[rng.permutation(len(members))]
        n_out = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_out = min(max(n_out, 1), len(members) - 1)
        else:
            n_out = 0
        held.append(members[:n_out])
    out = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    kept = np.setdiff1d(rows, out, assume_unique=True)
    return kept.astype(np.int64), out.astype(np.int64)


def draw_subset(rows: np.ndarray, labels: np.ndarray, subset: Subset, rng: np.random.Generator,
                class_names: Sequence[str]) -> np.ndarray:
    """The rows of a seeded, stratified label subset of `rows` (sorted)."""
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rows[labels == cls]
        if subset.kind == "shot":
            k = int(subset.value)
            if len(members) < k:
                raise ProbeDataError(
                    f"subset {subset}: class {class_names[cls]!r} (label {cls}) has only {len(members)} "
                    f"train samples, fewer than k={k}; use a smaller k or a larger store")
            n = k
        else:
            n = max(1, int(round(subset.value * len(members))))
        chosen.append(members[rng.permutation(len(members))[:n]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# ------------------------------------------------------------------------------------------ epoch order

@dataclass(frozen=True)
class Window:
    """A read unit of the stream: whole chunks (`chunks`, ascending) and the order of their split rows."""

    chunks: tuple[int, ...]
    order: np.ndarray


def epoch_order(rows: np.ndarray, chunk_rows: int, buffer_rows: int, seed: int, epoch: int,
                shuffle: bool) -> list[Window]:
    """The order of one epoch over the (sorted) `rows`, as windows of whole chunks.

    Shuffled: chunks in a random order (seeded by seed and epoch), grouped greedily into windows of at
    least `buffer_rows` split rows, rows permuted within each window. Unshuffled: store order. Both the
    in-memory and the streamed source consume this, which is what makes them yield identical batches.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    chunk_of = rows // chunk_rows
    chunk_ids, starts = np.unique(chunk_of, return_index=True)
    groups = np.split(rows, starts[1:])
    rng = _rng(seed, _KEY_ORDER, epoch)
    sequence = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    windows: list[Window] = []
    pending: list[int] = []
    count = 0
    for g in sequence:
        pending.append(int(g))
        count += len(groups[g])
        if count >= buffer_rows:
            windows.append(_make_window(pending, chunk_ids, groups, rng, shuffle))
            pending, count = [], 0
    if pending:
        windows.append(_make_window(pending, chunk_ids, groups, rng, shuffle))
    return windows


def _make_window(members: list[int], chunk_ids: np.ndarray, groups: list[np.ndarray],
                 rng: np.random.Generator, shuffle: bool) -> Window:
    order = np.concatenate([groups[g] for g in members])
    if shuffle:
        order = order[rng.permutation(len(order))]
    return Window(tuple(sorted(int(chunk_ids[g]) for g in members)), order)


# ------------------------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class FeatureStats:
    """Train-split standardisation statistics of one feature (float32, broadcastable to one sample)."""

    mean: np.ndarray
    std: np.ndarray
    mode: str
    rows_digest: str
    count: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Standardise a float32 batch in place (and return it); identical bits whatever the batch."""
        if self.mode != "none":
            x -= self.mean
            x /= self.std
        return x


def _reduce_axes(ndim: int, mode: str) -> tuple[int, ...]:
    if mode == "channel" and ndim >= 3:
        return (0, *range(2, ndim))
    return (0,)


def compute_stats(name: str, source: da.Array, rows: np.ndarray, mode: str,
                  sample_ids: Sequence[Any] | None = None) -> FeatureStats:
    """Mean/std over `rows` of a dask array (chunked along rows), in float64, checking finiteness.

    One dask pass computes the moments and a per-row finiteness flag together, so a NaN or inf is found
    in the same read that would have used it, and reported with its store row.
    """
    if mode not in STANDARDIZE_MODES:
        raise ProbeDataError(f"standardize={mode!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
    x = source[rows]
    finite = da.isfinite(x).all(axis=tuple(range(1, x.ndim)))
    if mode == "none":
        (ok,) = dask.compute(finite)
        _raise_if_not_finite(name, ok, rows, sample_ids)
        shape = (1,) * (x.ndim - 1)
        return FeatureStats(np.zeros(shape, np.float32), np.ones(shape, np.float32), mode, rows_digest(rows), len(rows))
    axes = _reduce_axes(x.ndim, mode)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    ok, mean, var = dask.compute(finite, mean, var)
    _raise_if_not_finite(name, ok, rows, sample_ids)
    std = np.sqrt(var)
    # A constant dimension carries no information; dividing by ~0 would only amplify rounding noise.
    tiny = std <= 1e-6 * max(float(np.max(std, initial=0.0)), 1e-12)
    std = np.where(tiny, 1.0, std)
    return FeatureStats(mean[0].astype(np.float32), std[0].astype(np.float32), mode, rows_digest(rows), len(rows))


def _raise_if_not_finite(name: str, ok: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    bad = np.flatnonzero(~np.asarray(ok))
    if len(bad) == 0:
        return
    row = int(rows[bad[0]])
    sid = f" (sample id {sample_ids[row]!r})" if sample_ids is not None and len(sample_ids) > row else ""
    raise ProbeDataError(
        f"feature {name!r} has NaN or inf values at store row {row}{sid} and {len(bad) - 1} other row(s) "
        f"of this read; the extraction overflowed (float16 storage saturates above 65504) or failed. "
        f"Mark those rows invalid in the store or re-extract them")


def _check_chunk_finite(name: str, x: np.ndarray, rows: np.ndarray, sample_ids: Sequence[Any] | None) -> None:
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not ok.all():
        _raise_if_not_finite(name, ok, rows, sample_ids)


# Statistics are cached per store object: a second ProbeData on the same store and train rows (e.g. a
# logistic sweep after a linear run in one session) does not read the train split again.
_STATS_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], FeatureStats]] = weakref.WeakKeyDictionary()


def _cached_stats(store: Any) -> dict[tuple[str, str, str], FeatureStats]:
    try:
        return _STATS_CACHE.setdefault(store, {})
    except TypeError:  # an object that cannot be weakly referenced: no cross-object cache
        return {}


# --------------------------------------------------------------------------------------------- streams

class FeatureStream:
    """A `BatchStream`: `(xs: {name: float32 tensor (B, C, H, W)}, y: int64 tensor (B,))` batches of one split.

    Backed either by in-memory standardised arrays or by the store itself (read window by window, the next
    window prefetched in a thread while the current one is consumed). Call `set_epoch` before iterating
    to get that epoch's order; the order depends on (seed, epoch) only.
    """

    def __init__(self, data: ProbeData, split: str, batch_size: int, shuffle: bool, seed: int,
                 buffer_rows: int | None = None, drop_last: bool = False, prefetch: bool = True) -> None:
        if batch_size < 1:
            raise ProbeDataError(f"batch_size must be >= 1, got {batch_size}")
        self._data = data
        self.split = split
        self.rows = data.rows(split)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.prefetch = bool(prefetch)
        self.buffer_rows = int(buffer_rows) if buffer_rows else data.default_buffer_rows()
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples one full iteration yields (a dropped last partial batch is not counted)."""
        n = len(self.rows)
        return n - n % self.batch_size if self.drop_last else n

    @property
    def in_memory(self) -> bool:
        return self._data.in_memory

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def windows(self) -> list[Window]:
        return epoch_order(self.rows, self._data.chunk_rows, self.buffer_rows, self.seed, self.epoch, self.shuffle)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        windows = self.windows()
        if self._data.in_memory:
            yield from self._memory_batches(windows)
        else:
            yield from self._batches(self._store_windows(windows))

    def _memory_batches(self, windows: list[Window]) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # Gather batch by batch from the resident arrays: no second copy of the split per epoch.
        order = np.concatenate([w.order for w in windows]) if windows else np.empty(0, np.int64)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        arrays = self._data.memory_arrays()
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield ({n: torch.from_numpy(a[idx]) for n, a in arrays.items()},
                   torch.from_numpy(self._data.all_labels[idx]))

    def _store_windows(self, windows: list[Window]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        if not self.prefetch or len(windows) <= 1:
            for w in windows:
                yield self._data.read_window(w), self._data.all_labels[w.order]
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-prefetch") as pool:
            pending: Future | None = pool.submit(self._data.read_window, windows[0])
            for i, w in enumerate(windows):
                xs = pending.result()
                pending = pool.submit(self._data.read_window, windows[i + 1]) if i + 1 < len(windows) else None
                yield xs, self._data.all_labels[w.order]

    def _batches(self, source: Iterator[tuple[dict[str, np.ndarray], np.ndarray]]
                 ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        carry: tuple[dict[str, np.ndarray], np.ndarray] | None = None
        bs = self.batch_size
        for xs, y in source:
            if carry is not None:  # a batch spanning two windows
                xs = {n: np.concatenate([carry[0][n], xs[n]]) for n in xs}
                y = np.concatenate([carry[1], y])
            full = len(y) - len(y) % bs
            for start in range(0, full, bs):
                yield ({n: torch.from_numpy(np.ascontiguousarray(a[start:start + bs])) for n, a in xs.items()},
                       torch.from_numpy(np.ascontiguousarray(y[start:start + bs])))
            carry = ({n: a[full:] for n, a in xs.items()}, y[full:]) if full < len(y) else None
        if carry is not None and not self.drop_last:
            yield ({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in carry[0].items()},
                   torch.from_numpy(np.ascontiguousarray(carry[1])))


# ------------------------------------------------------------------------------------------- ProbeData

@dataclass
class SplitInfo:
    """How the splits were made: enough to rebuild them, and to see at a glance what a result rests on."""

    source: dict[str, str] = field(default_factory=dict)  # split -> "store" | "carved from train" | ...
    dropped: dict[str, int] = field(default_factory=dict)  # reasons -> rows left out


class ProbeData:
    """Standardised features, labels and splits of a store for probing. Build it with `from_store`."""

    def __init__(self, store: Any, features: Sequence[str], splits: Mapping[str, np.ndarray],
                 labels: np.ndarray, class_names: Sequence[str], *, seed: int, val_fraction: float,
                 test_fraction: float, subset: Subset | None, standardize: str, memory_budget: int,
                 in_memory: bool | None, info: SplitInfo, full_train_rows: np.ndarray,
                 shuffle_buffer: int) -> None:
        self.store = store
        self.features = list(features)
        self._splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
        self.all_labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.subset = subset
        self.standardize = standardize
        self.memory_budget = int(memory_budget)
        self.shuffle_buffer = int(shuffle_buffer)
        self._info = info
        self._full_train_rows = full_train_rows
        self._sample_ids = _optional(store, "sample_ids")
        self._dask = {name: store.to_dask(name) for name in self.features}
        self.chunk_rows = self._chunk_rows()
        self.feature_shapes: dict[str, tuple[int, ...]] = {n: tuple(int(s) for s in self._dask[n].shape[1:])
                                                            for n in self.features}
        self.in_memory = self.memory_bytes() <= self.memory_budget if in_memory is None else bool(in_memory)
        self._memory: dict[str, np.ndarray] | None = None
        self._stats: dict[str, FeatureStats] = {}

    # ---- construction

    @classmethod
    def from_store(cls, store: Any, features: Sequence[str] | str, *, val_fraction: float = 0.1,
                   test_fraction: float = 0.2, seed: int = 0, subset: str | Subset | None = None,
                   standardize: StandardizeMode = "dim", memory_budget: int | float | str | None = None,
                   in_memory: bool | None = None, allow_missing_classes: bool = False,
                   shuffle_buffer: int | str = "1GiB") -> ProbeData:
        """Resolve features, labels and splits of `store` (a `FeatureStore` or a URL/path).

        `val_fraction` / `test_fraction` apply only to splits the store lacks; `subset` takes a label subset
        of train; `in_memory=None` decides by `memory_budget` (bytes, '2GiB', '25%'; default 25% of RAM).
        `shuffle_buffer` (bytes) sizes the shuffle windows of `stream` in both modes (see `epoch_order`).
        """
        store = _open(store)
        features = [features] if isinstance(features, str) else list(features)
        _check_features(store, features)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < frac < 1:
                raise ProbeDataError(f"{name} must be in (0, 1), got {frac}")
        if standardize not in STANDARDIZE_MODES:
            raise ProbeDataError(f"standardize={standardize!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
        labels, class_names = _labels(store)
        splits, info, full_train = _resolve_splits(store, labels, class_names, seed, val_fraction, test_fraction)
        parsed = Subset.parse(subset)
        if parsed is not None:
            splits["train"] = draw_subset(splits["train"], labels[splits["train"]], parsed,
                                          _rng(seed, _KEY_SUBSET), class_names)
            info.source["train"] += f", label subset {parsed}"
        if not allow_missing_classes:
            _check_classes(splits, labels, class_names)
        return cls(store, features, splits, labels, class_names, seed=seed, val_fraction=val_fraction,
                   test_fraction=test_fraction, subset=parsed, standardize=standardize,
                   memory_budget=parse_memory(memory_budget), in_memory=in_memory, info=info,
                   full_train_rows=full_train, shuffle_buffer=parse_memory(shuffle_buffer))

    # ---- descriptive

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_names(self) -> list[str]:
        return list(self._splits)

    def rows(self, split: str) -> np.ndarray:
        """Store row indices of a split, ascending."""
        if split not in self._splits:
            raise ProbeDataError(f"unknown split {split!r}; splits: {', '.join(self._splits)}")
        return self._splits[split]

    def labels(self, split: str) -> np.ndarray:
        """Labels (int64) of a split's rows, in store order (the order of `arrays(split)`)."""
        return self.all_labels[self.rows(split)]

    def memory_bytes(self) -> int:
        """Bytes of all features as float32 in memory (all rows: the in-memory copy is indexed by store row)."""
        n = int(self._dask[self.features[0]].shape[0]) if self.features else 0
        return sum(n * int(np.prod(s)) * 4 for s in self.feature_shapes.values())

    def row_bytes(self) -> int:
        return sum(int(np.prod(s)) * 4 for s in self.feature_shapes.values())

    def default_buffer_rows(self) -> int:
        """Shuffle window in rows: what `shuffle_buffer` bytes hold, at least one chunk.

        It depends on the features, never on the memory budget or the mode, so a run gives the same batches
        on a machine that streams and on one that holds everything in memory.
        """
        return max(self.chunk_rows, self.shuffle_buffer // max(1, self.row_bytes()))

    def split_definition(self) -> dict[str, Any]:
        """JSON-able description of the splits (sources, seeds, counts per class, row digests)."""
        counts = {s: {"n": int(len(r)), "rows_sha256_16": rows_digest(r),
                      "per_class": np.bincount(self.all_labels[r], minlength=self.num_classes).tolist()}
                  for s, r in self._splits.items()}
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "subset": None if self.subset is None else str(self.subset),
            "train_rows_before_subset": int(len(self._full_train_rows)),
            "source": dict(self._info.source),
            "dropped_rows": dict(self._info.dropped),
            "splits": counts,
            "standardize": self.standardize,
            "statistics_from": "train" + ("" if self.subset is None else f" ({self.subset} subset)"),
            "shuffle": {"chunk_rows": self.chunk_rows, "buffer_rows": self.default_buffer_rows(),
                        "rule": "seeded chunk order, rows shuffled within windows of buffer_rows"},
        }

    def split_rows(self) -> dict[str, np.ndarray]:
        """The row indices of every split (to save next to a result, e.g. with `np.savez`)."""
        return {k: v.copy() for k, v in self._splits.items()}

    # ---- statistics

    def stats(self, name: str) -> FeatureStats:
        """Train statistics of a feature: computed once (out of core, from the store), then cached."""
        self._check_name(name)
        return self._stats_from(name, self._dask[name])

    def _stats_from(self, name: str, source: da.Array) -> FeatureStats:
        if name not in self._stats:
            train = self.rows("train")
            key = (name, self.standardize, rows_digest(train))
            cache = _cached_stats(self.store)
            if key not in cache:
                cache[key] = compute_stats(name, source, train, self.standardize, self._sample_ids)
            self._stats[name] = cache[key]
        return self._stats[name]

    # ---- data access

    def stream(self, split: str, batch_size: int, shuffle: bool = True, seed: int | None = None,
               buffer_rows: int | None = None, drop_last: bool = False) -> FeatureStream:
        """A `BatchStream` over `split` (seed defaults to the data's seed)."""
        self.rows(split)
        return FeatureStream(self, split, batch_size, shuffle, self.seed if seed is None else seed,
                             buffer_rows=buffer_rows, drop_last=drop_last)

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """Standardised float32 arrays (N, C, H, W) of a split in store order (loads them when streaming)."""
        rows = self.rows(split)
        if self.in_memory:
            return {n: a[rows] for n, a in self.memory_arrays().items()}
        out: dict[str, np.ndarray] = {}
        for w in epoch_order(rows, self.chunk_rows, len(rows), 0, 0, shuffle=False):
            for n, a in self.read_window(w).items():
                out.setdefault(n, []).append(a)  # type: ignore[arg-type]
        return {n: np.concatenate(parts) for n, parts in out.items()}  # type: ignore[arg-type]

    def tensors(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        xs = self.arrays(split)
        return {n: torch.from_numpy(a) for n, a in xs.items()}, torch.from_numpy(self.labels(split))

    def memory_arrays(self) -> dict[str, np.ndarray]:
        """The standardised in-memory copy, indexed by store row (read on first use)."""
        if not self.in_memory:
            raise ProbeDataError("this ProbeData streams from the store (features exceed the memory budget); "
                                 "use stream() or arrays()")
        if self._memory is None:
            self._memory = self._load_all()
        return self._memory

    def _load_all(self) -> dict[str, np.ndarray]:
        used = np.unique(np.concatenate(list(self._splits.values())))
        out: dict[str, np.ndarray] = {}
        for name in self.features:
            raw = np.asarray(self.store.read(name), dtype=np.float32)
            # The raw copy wrapped with the store's own chunks gives the same reduction tree as the
            # streamed pass (bit-identical statistics) without reading the store twice.
            stats = self._stats_from(name, da.from_array(raw, chunks=self._dask[name].chunks))
            for start in range(0, len(used), self.chunk_rows):
                rows = used[start:start + self.chunk_rows]
                _check_chunk_finite(name, raw[rows], rows, self._sample_ids)
            # Standardise chunk by chunk in place: a second full-size copy could exceed the budget.
            for start in range(0, len(raw), self.chunk_rows):
                stats.apply(raw[start:start + self.chunk_rows])
            out[name] = raw
        return out

    def read_window(self, window: Window) -> dict[str, np.ndarray]:
        """Read a window's chunks from the store, check, standardise, and order them as `window.order`."""
        out: dict[str, np.ndarray] = {}
        n_total = self._dask[self.features[0]].shape[0]
        spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, n_total)) for c in window.chunks]
        for name in self.features:
            stats = self.stats(name)
            parts, rows_parts = [], []
            for start, stop in spans:
                chunk = _read_range(self.store, name, start, stop)
                wanted = window.order[(window.order >= start) & (window.order < stop)]
                wanted = np.sort(wanted)
                x = chunk[wanted - start]
                _check_chunk_finite(name, x, wanted, self._sample_ids)
                parts.append(x)
                rows_parts.append(wanted)
            rows = np.concatenate(rows_parts)
            x = np.concatenate(parts)
            stats.apply(x)
            # Rows were read in store order; put them in the window's (shuffled) order.
            position = np.searchsorted(rows, window.order)
            out[name] = x[position]
        return out

    # ---- internals

    def _check_name(self, name: str) -> None:
        if name not in self._dask:
            raise ProbeDataError(f"feature {name!r} is not part of this ProbeData; features: {', '.join(self.features)}")

    def _chunk_rows(self) -> int:
        shard = _optional(self.store, "shard_rows")
        if shard:
            return int(shard)
        first = self._dask[self.features[0]]
        return int(first.chunks[0][0]) if first.chunks[0] else 1


# ------------------------------------------------------------------------------------- store helpers

def _open(store: Any) -> Any:
    if isinstance(store, (str, os.PathLike)):
        from extract.store import open_store

        return open_store(str(store))
    return store


def _optional(store: Any, attr: str) -> Any:
    try:
        return getattr(store, attr)
    except (AttributeError, KeyError):
        return None


def available_features(store: Any) -> list[str]:
    """Every feature name in the store (all views)."""
    return list(store.feature_names(view=None))


def _check_features(store: Any, features: list[str]) -> None:
    if not features:
        raise ProbeDataError("no features requested; features in the store: " + ", ".join(available_features(store)))
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise ProbeDataError(f"features requested twice: {', '.join(dupes)}")
    known = available_features(store)
    missing = [f for f in features if f not in known]
    if missing:
        listing = ", ".join(known) if known else "(none)"
        raise ProbeDataError(f"feature(s) {', '.join(map(repr, missing))} not in the store; features that exist: {listing}")
    is_complete = getattr(store, "is_complete", None)
    unfinished = [f for f in features if is_complete is not None and not is_complete(f)]
    if unfinished:
        # Unwritten shards read as the fill value: probing them would report accuracy on zeros.
        raise ProbeDataError(f"feature(s) {', '.join(unfinished)} are not completely extracted; finish (resume) "
                             f"the extraction first")


def _labels(store: Any) -> tuple[np.ndarray, list[str]]:
    labels = _optional(store, "labels")
    if labels is None or len(labels) == 0 or not (np.asarray(labels) >= 0).any():
        raise ProbeDataError("the store has no labels (every label is -1 or the labels array is absent): "
                             "probes need class labels; re-extract from a labelled source")
    labels = np.asarray(labels, dtype=np.int64)
    names = _optional(store, "class_names")
    n_classes = int(labels.max()) + 1
    if names:
        names = [str(c) for c in names]
        if len(names) < n_classes:
            raise ProbeDataError(f"the store lists {len(names)} class names but labels go up to {n_classes - 1}")
    else:
        names = [str(c) for c in range(n_classes)]
    return labels, names


def _store_split(splits: Mapping[str, Any], canonical: str) -> np.ndarray | None:
    for alias in _SPLIT_ALIASES[canonical]:
        if alias in splits and splits[alias] is not None:
            return np.unique(np.asarray(splits[alias], dtype=np.int64))
    return None


def _resolve_splits(store: Any, labels: np.ndarray, class_names: Sequence[str], seed: int, val_fraction: float,
                    test_fraction: float) -> tuple[dict[str, np.ndarray], SplitInfo, np.ndarray]:
    n = len(labels)
    valid = _optional(store, "valid")
    usable = np.asarray(labels >= 0) if valid is None else np.asarray(labels >= 0) & np.asarray(valid, dtype=bool)
    info = SplitInfo()
    given = _optional(store, "splits") or {}
    found = {s: _store_split(given, s) for s in SPLITS}
    for s, rows in found.items():
        if rows is not None and len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ProbeDataError(f"the store's {s!r} split refers to rows outside [0, {n})")
    _check_disjoint(found)
    split_rows: dict[str, np.ndarray] = {}
    for s, rows in found.items():
        if rows is None:
            continue
        keep = rows[usable[rows]]
        if len(keep) < len(rows):
            info.dropped[s] = int(len(rows) - len(keep))
        split_rows[s] = keep
        info.source[s] = "store"
    if "train" not in split_rows:
        taken = np.concatenate([v for v in split_rows.values()]) if split_rows else np.empty(0, np.int64)
        split_rows["train"] = np.setdiff1d(np.flatnonzero(usable), taken).astype(np.int64)
        info.source["train"] = "rows outside the store's splits" if split_rows else "all labelled rows"
        info.dropped.setdefault("unlabelled_or_invalid", int(n - usable.sum()))
    if len(split_rows["train"]) == 0:
        raise ProbeDataError("the train split is empty (after leaving out unlabelled and failed rows)")
    if "test" not in split_rows:
        train, test = stratified_holdout(split_rows["train"], labels[split_rows["train"]], test_fraction,
                                         _rng(seed, _KEY_TEST))
        split_rows["train"], split_rows["test"] = train, test
        info.source["test"] = f"carved from train (stratified, {test_fraction:g}, seed {seed})"
    if "val" not in split_rows:
        train, val = stratified_holdout(split_rows["train"], labels[split_rows["train"]], val_fraction,
                                        _rng(seed, _KEY_VAL))
        split_rows["train"], split_rows["val"] = train, val
        info.source["val"] = f"carved from train (stratified, {val_fraction:g}, seed {seed})"
    ordered = {s: split_rows[s] for s in SPLITS}
    return ordered, info, ordered["train"].copy()


def _check_disjoint(found: Mapping[str, np.ndarray | None]) -> None:
    named = [(s, r) for s, r in found.items() if r is not None]
    for i, (a, ra) in enumerate(named):
        for b, rb in named[i + 1:]:
            common = np.intersect1d(ra, rb, assume_unique=True)
            if len(common):
                raise ProbeDataError(f"the store's {a!r} and {b!r} splits share {len(common)} row(s) (first: "
                                     f"{int(common[0])}): results would leak between them")


def _check_classes(splits: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str]) -> None:
    # Classes are the ones that have labelled rows anywhere; a class-name list longer than that is allowed.
    present = np.unique(np.concatenate([labels[r] for r in splits.values()]))
    for split, rows in splits.items():
        if len(rows) == 0:
            raise ProbeDataError(f"the {split!r} split is empty; the store has too few labelled rows to split "
                                 f"(lower val_fraction/test_fraction or extract more samples)")
        missing = np.setdiff1d(present, labels[rows])
        if len(missing):
            names = ", ".join(f"{class_names[c]!r}" for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ProbeDataError(f"the {split!r} split has no samples of {len(missing)} class(es): {names}; "
                                 f"accuracy there would be undefined. Use a larger store or "
                                 f"allow_missing_classes=True")


def _read_range(store: Any, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a feature as float32 (one contiguous read: a shard or a part of one)."""
    return np.asarray(store.read(name, slice(start, stop)), dtype=np.float32)


def check_min_samples(n_available: int, k: int, what: str) -> None:
    """Raise when a method needs k samples but only n are there (e.g. kNN's k against the train split)."""
    if n_available < k:
        raise ProbeDataError(f"{what} needs at least {k} samples but only {n_available} are available; "
                             f"use a smaller k or a larger split")
