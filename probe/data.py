"""From a feature store to standardised torch batches, splits and label subsets.

`ProbeData` is the one object the probes read. It answers four questions, always the same way for a seed:

- **Which rows?** `probe.splits`: the store's splits, carved stratified hold-outs, label subsets.
- **Which scale?** `probe.stats`: statistics from the (subset) train rows only, cached per store object.
- **In memory or streamed?** When all used features fit `memory_budget` (default 25% of RAM) they are read
  once as standardised float32 arrays; otherwise batches are streamed window by window.
- **In which order?** `probe.stream.epoch_order`, the same in both modes.
- **Which noise draw?** A store that keeps K noise draws apart (`noise: {combine: separate}`) is augmentation:
  training epoch e reads draw e mod K (of the first `draws`, default all K; `draws=1` is draw 0 alone, i.e. a
  one-draw store); validation and test read draw 0, or with `eval_draws="mean"` every draw, the heads' logits
  averaged over them (`probe.evaluation`). Statistics come from draw 0's train rows, so every draw is
  standardised alike and `draws=1` and `draws=K` runs see the same scale.

Memory. Peak RSS of a probe stays within `memory_budget` plus a constant:

- the data: in memory, all rows of the features as float32 (<= budget, or it streams); streamed, the window
  being consumed, the one being read ahead and the previous one while its last batch is referenced, each
  under 1.25 x budget / 4 (the shuffle window is the smaller of `shuffle_buffer` and a quarter of the budget,
  and its unit a shard or, when a shard is larger than a sixteenth of the budget, a run of inner chunks of at
  most a quarter window). A window's memory is the reader's: once no batch of it is held, the next window
  reuses it (fresh pages cost more than decoding), and the reader gives free memory back before it
  allocates more, so at most those three windows are ever resident;
- the statistics pass: 3 blocks of `probe.stats.STATS_BLOCK_BYTES` (16 MiB) float32 plus one float64 copy
  of one (~80 MiB), freed before training;
- the reader: ~16 MiB per decode thread (8 MiB of decode scratch, up to 8 MiB of the bytes read from a local
  store; `open_store(workers=...)`, default the cores here);
- the model and heads (parameters, gradients, optimiser state: a 27-head linear sweep on 4,096-d features is
  ~1 MB), one batch and its activations;
- the Python/torch/zarr baseline (485-515 MB peak RSS measured for `diffbank probe linear/sweep` on Linux).

Process-wide malloc settings are left alone: a streamed probe once set glibc's mmap threshold to 1 MiB so
freed windows went back to the OS, which made every batch-sized allocation fresh pages (an in-memory epoch
5x slower in the same process); windows now reuse their memory through the reader, and without the setting
the peak stayed within the bound (linear 578 against 543 MiB, sweep 563 against 545, bound 659 / 692).

Bad input fails early with `ProbeDataError` and a message that says what to do.
This module imports `extract.store` only: probing never needs the U-Net.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from probe.budget import default_memory_budget, parse_memory
from probe.errors import ProbeDataError, UnknownFeatureError
from probe.recipe import STANDARDIZE_MODES
from probe.splits import (
    KEY_SUBSET,
    SPLITS,
    SplitInfo,
    Subset,
    check_classes,
    draw_subset,
    optional_attr,
    resolve_splits,
    rows_digest,
    seeded_rng,
    store_labels,
    stratified_holdout,
)
from probe.stats import FeatureStats, cached_stats, check_chunk_finite, compute_stats, stats_block_rows
from probe.stream import FeatureStream, Window, epoch_order

__all__ = [
    "ProbeData",
    "ProbeDataError",
    "Subset",
    "SPLITS",
    "FeatureStream",
    "FeatureStats",
    "Window",
    "epoch_order",
    "compute_stats",
    "stratified_holdout",
    "parse_memory",
    "default_memory_budget",
    "rows_digest",
    "available_features",
    "check_min_samples",
]

StandardizeMode = Literal["dim", "channel", "none"]
EVAL_DRAWS = ("first", "mean")


class ProbeData:
    """Standardised features, labels and splits of a store for probing. Build it with `from_store`."""

    def __init__(
        self,
        store: Any,
        features: Sequence[str],
        splits: Mapping[str, np.ndarray],
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        seed: int,
        val_fraction: float,
        test_fraction: float,
        subset: Subset | None,
        standardize: str,
        memory_budget: int,
        in_memory: bool | None,
        info: SplitInfo,
        full_train_rows: np.ndarray,
        shuffle_buffer: int,
        draws: int | None = None,
        eval_draws: str = "first",
    ) -> None:
        self.store = store
        self.features = list(features)
        self._draw_arrays = _draw_arrays(store, self.features, draws)
        self.store_draws = len(_store_draws(store, self.features[0])) if self.features else 1
        self.draws = len(next(iter(self._draw_arrays.values()))) if self._draw_arrays else 1
        self.eval_draws = eval_draws
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
        self._sample_ids = optional_attr(store, "sample_ids")
        self.num_rows = int(store.num_samples)
        self.feature_shapes: dict[str, tuple[int, ...]] = {
            n: tuple(int(s) for s in store.feature_info(n).shape) for n in self.features
        }
        self.chunk_rows = self._chunk_rows()
        self.in_memory = self.memory_bytes() <= self.memory_budget if in_memory is None else bool(in_memory)
        self._memory: dict[str, np.ndarray] | None = None
        self._stats: dict[str, FeatureStats] = {}

    # ---- construction

    @classmethod
    def from_store(
        cls,
        store: Any,
        features: Sequence[str] | str,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        subset: str | Subset | None = None,
        standardize: StandardizeMode = "dim",
        memory_budget: int | float | str | None = None,
        in_memory: bool | None = None,
        allow_missing_classes: bool = False,
        shuffle_buffer: int | str = "1GiB",
        draws: int | None = None,
        eval_draws: str = "first",
    ) -> ProbeData:
        """Resolve features, labels and splits of `store` (a `FeatureStore` or a URL/path).

        `val_fraction` / `test_fraction` apply only to splits the store lacks; `subset` takes a label subset
        of train; `in_memory=None` decides by `memory_budget` (bytes, '2GiB', '25%'; default 25% of RAM).
        `shuffle_buffer` (bytes) sizes the shuffle windows of `stream` in both modes (see `epoch_order`).
        `draws` (default: all the store keeps) and `eval_draws` ("first" | "mean"): see the module docstring.
        """
        store = _open(store)
        features = [features] if isinstance(features, str) else list(features)
        _check_features(store, features)
        if eval_draws not in EVAL_DRAWS:
            raise ProbeDataError(f"eval_draws={eval_draws!r}: choose one of {', '.join(EVAL_DRAWS)}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < frac < 1:
                raise ProbeDataError(f"{name} must be in (0, 1), got {frac}")
        if standardize not in STANDARDIZE_MODES:
            raise ProbeDataError(f"standardize={standardize!r}: choose one of {', '.join(STANDARDIZE_MODES)}")
        labels, class_names = store_labels(store)
        splits, info, full_train = resolve_splits(store, labels, class_names, seed, val_fraction, test_fraction)
        parsed = Subset.parse(subset)
        if parsed is not None:
            splits["train"] = draw_subset(
                splits["train"], labels[splits["train"]], parsed, seeded_rng(seed, KEY_SUBSET), class_names
            )
            info.source["train"] += f", label subset {parsed}"
        if not allow_missing_classes:
            check_classes(splits, labels, class_names)
        return cls(
            store,
            features,
            splits,
            labels,
            class_names,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            subset=parsed,
            standardize=standardize,
            memory_budget=parse_memory(memory_budget),
            in_memory=in_memory,
            info=info,
            full_train_rows=full_train,
            shuffle_buffer=parse_memory(shuffle_buffer),
            draws=draws,
            eval_draws=eval_draws,
        )

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
        """Bytes of all features (every used noise draw) as float32 in memory (all rows: the in-memory copy is
        indexed by store row)."""
        return self.draws * sum(self.num_rows * int(np.prod(s)) * 4 for s in self.feature_shapes.values())

    def row_bytes(self) -> int:
        """Bytes of one row of one draw of every feature: what a training window holds per row. It does not
        depend on `draws`, so runs on one draw and on K draws shuffle alike."""
        return sum(int(np.prod(s)) * 4 for s in self.feature_shapes.values())

    def draw_arrays(self, name: str) -> list[str]:
        """The store arrays of feature `name`'s used noise draws, draw 0 first."""
        self._check_name(name)
        return list(self._draw_arrays[name])

    def train_draw(self, epoch: int) -> int:
        """The noise draw training epoch `epoch` reads: e mod K."""
        return int(epoch) % self.draws

    def draw_definition(self, epochs: int | None = None) -> dict[str, Any]:
        """JSON-able description of how the noise draws are used (for results.json)."""
        out: dict[str, Any] = {
            "store_draws": self.store_draws,
            "train_draws": self.draws,
            "train": "draw 0 only" if self.draws == 1 else f"draw e mod {self.draws} in epoch e",
            "eval": "draw 0"
            if self.eval_draws == "first" or self.draws == 1
            else f"logits averaged over draws 0..{self.draws - 1}",
            "eval_draws": self.eval_draws,
            "statistics_from": "draw 0",
        }
        if epochs is not None:
            out["rotation"] = [self.train_draw(e) for e in range(int(epochs))]
        return out

    def window_bytes(self) -> int:
        """Bytes of one shuffle window: `shuffle_buffer`, at most a quarter of the memory budget.

        A streamed epoch holds up to three windows at once (the one being consumed, the one read ahead, and
        the previous one while its last batch is still referenced), each under 1.25 quarters (a window
        overshoots by less than one unit, see `_chunk_rows`), so the data stays within the budget.
        """
        return min(self.shuffle_buffer, self.memory_budget // 4)

    def default_buffer_rows(self) -> int:
        """Shuffle window in rows: what `window_bytes()` hold, at least one chunk.

        It depends on the features, `shuffle_buffer` and the memory budget, never on the mode, so a run gives
        the same batches on a machine that streams and on one that holds everything in memory (and the same
        as before budgets sized windows whenever the budget is at least 4 x `shuffle_buffer` and a shard at most
        a sixteenth of it).
        """
        return max(self.chunk_rows, self.window_bytes() // max(1, self.row_bytes()))

    def split_definition(self) -> dict[str, Any]:
        """JSON-able description of the splits (sources, seeds, counts per class, row digests)."""
        counts = {
            s: {
                "n": int(len(r)),
                "rows_sha256_16": rows_digest(r),
                "per_class": np.bincount(self.all_labels[r], minlength=self.num_classes).tolist(),
            }
            for s, r in self._splits.items()
        }
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
            "shuffle": {
                "chunk_rows": self.chunk_rows,
                "buffer_rows": self.default_buffer_rows(),
                "rule": "seeded chunk order, rows shuffled within windows of buffer_rows",
            },
        }

    def split_rows(self) -> dict[str, np.ndarray]:
        """The row indices of every split (to save next to a result, e.g. with `np.savez`)."""
        return {k: v.copy() for k, v in self._splits.items()}

    # ---- statistics

    def stats(self, name: str) -> FeatureStats:
        """Train statistics of a feature: computed once (out of core, from the store), then cached."""
        self._check_name(name)
        return self._stats_from(name, None)

    def _stats_block_rows(self, name: str) -> int:
        return stats_block_rows(int(np.prod(self.feature_shapes[name])) * 4, len(self.rows("train")))

    def _stats_from(self, name: str, raw: np.ndarray | None, finite: bool = False) -> FeatureStats:
        """Statistics of the train rows: streamed from the store, or from `raw` (all rows, in memory).

        Both sources give the same blocks (sorted train rows, `_stats_block_rows` at a time), hence the same bits.
        The pass checks each block for NaN/inf unless `raw` was found `finite` while it was decoded.
        """
        if name not in self._stats:
            train = self.rows("train")
            key = (name, self.standardize, rows_digest(train))
            cache = cached_stats(self.store)
            if key not in cache:
                block = self._stats_block_rows(name)
                if raw is None:
                    blocks = self.store.iter_batches(name, block, rows=np.sort(train), prefetch=1)
                else:
                    blocks = (raw[train[i : i + block]] for i in range(0, len(train), block))
                cache[key] = compute_stats(name, blocks, np.sort(train), self.standardize, self._sample_ids, not finite)
            self._stats[name] = cache[key]
        return self._stats[name]

    # ---- data access

    def stream(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        buffer_rows: int | None = None,
        drop_last: bool = False,
        draws: str | None = None,
    ) -> FeatureStream:
        """A `BatchStream` over `split` (seed defaults to the data's seed).

        `draws`: "rotate" (epoch e reads draw e mod K), "first" (draw 0) or "mean" (every draw, for logits
        averaged over them); default "rotate" for the train split and `eval_draws` for the others.
        """
        self.rows(split)
        return FeatureStream(
            self,
            split,
            batch_size,
            shuffle,
            self.seed if seed is None else seed,
            buffer_rows=buffer_rows,
            drop_last=drop_last,
            draws=draws or ("rotate" if split == "train" else self.eval_draws),
        )

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """Standardised float32 arrays (N, C, H, W) of a split in store order (loads them when streaming);
        noise draw 0 where the store keeps several."""
        rows = self.rows(split)
        if self.in_memory:
            arrays = self.memory_arrays()
            return {n: arrays[n][rows] for n in self.features}
        out: dict[str, np.ndarray] = {}
        for w in epoch_order(rows, self.chunk_rows, len(rows), 0, 0, shuffle=False):
            for n, a in self.read_window(w).items():
                out.setdefault(n, []).append(a)  # type: ignore[arg-type]
        return {n: np.concatenate(parts) for n, parts in out.items()}  # type: ignore[arg-type]

    def tensors(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        xs = self.arrays(split)
        return {n: torch.from_numpy(a) for n, a in xs.items()}, torch.from_numpy(self.labels(split))

    def memory_arrays(self) -> dict[str, np.ndarray]:
        """The standardised in-memory copy, indexed by store row (read on first use), keyed by store array:
        the feature's name for draw 0, `draw_arrays(name)` for the others."""
        if not self.in_memory:
            raise ProbeDataError(
                "this ProbeData streams from the store (features exceed the memory budget); use stream() or arrays()"
            )
        if self._memory is None:
            self._memory = self._load_all()
        return self._memory

    def _load_all(self) -> dict[str, np.ndarray]:
        used = np.unique(np.concatenate(list(self._splits.values())))
        out: dict[str, np.ndarray] = {}
        for name in self.features:
            for array in self._draw_arrays[name]:  # draw 0 first: its statistics standardise every draw
                # NaN/inf are looked for while the blocks are decoded, in cache (a store's own record of them is
                # not trusted: stores come from other teams); only if some turn up are the used rows checked one
                # by one, to name the first bad one.
                not_finite: list[bool] = []
                shape = (self.num_rows, *self.feature_shapes[name])
                flag = functools.partial(_flag_not_finite, not_finite)
                raw = self.store.read(array, out=np.empty(shape, np.float32), each=flag)
                # The statistics from the raw copy use the streamed pass's blocks (bit-identical statistics)
                # without reading the store twice.
                stats = self._stats_from(name, raw, finite=not not_finite)
                if not_finite:
                    for start in range(0, len(used), self.chunk_rows):
                        rows = used[start : start + self.chunk_rows]
                        check_chunk_finite(array, raw[rows], rows, self._sample_ids)
                # Standardise chunk by chunk in place: a second full-size copy could exceed the budget.
                for start in range(0, len(raw), self.chunk_rows):
                    stats.apply(raw[start : start + self.chunk_rows])
                out[array] = raw
        return out

    def read_window(self, window: Window, arrays: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Read a window's rows from the store in `window.order`, check and standardise them (float32).

        `arrays` maps each key of the result to the store array to read (a feature, or one of its noise draws:
        `draw_arrays`); default every feature under its own name. The reader decodes each touched chunk once and
        scatters its rows straight into one new buffer per array: the window's only copy.
        """
        out: dict[str, np.ndarray] = {}
        for key, array in (arrays or {n: n for n in self.features}).items():
            stats = self.stats(self._feature_of[array])
            not_finite: list[bool] = []

            def check_and_standardise(block: np.ndarray, stats: FeatureStats = stats, flag: list = not_finite) -> None:
                _flag_not_finite(flag, block)
                stats.apply(block)

            # Checked and standardised block by block in the decode threads, while each block is in cache. The
            # window's memory is the reader's: reused by a later window once no batch of it is held.
            x = self.store.read(array, window.order, each=check_and_standardise)
            if not_finite:  # read the raw rows again to name the first bad one
                check_rows_finite(array, self.store.read(array, window.order), window.order, self._sample_ids)
            out[key] = x
        return out

    # ---- internals

    @functools.cached_property
    def _feature_of(self) -> dict[str, str]:
        """Store array -> the feature it is a draw of."""
        return {a: n for n, arrays in self._draw_arrays.items() for a in arrays}

    def _check_name(self, name: str) -> None:
        if name not in self.feature_shapes:
            raise ProbeDataError(
                f"feature {name!r} is not part of this ProbeData; features: {', '.join(self.features)}"
            )

    def _chunk_rows(self) -> int:
        """The unit of `epoch_order`: a shard, or a run of inner chunks when a shard is large for the budget.

        Whole shards (the order of every earlier run) whenever a shard's float32 rows fit a sixteenth of the
        memory budget; under a smaller budget the largest multiple of the inner chunk that fits a quarter of
        `window_bytes()` (at least one inner chunk), so a window (< buffer rows + one unit) stays near its
        share of the budget.
        """
        shard = optional_attr(self.store, "shard_rows")
        if shard:
            shard = int(shard)
            if shard * self.row_bytes() <= self.memory_budget // 16:
                return shard
            limit = self.window_bytes() // 4
            array = getattr(self.store, "array", None)
            inner = int(array(self.features[0]).chunks[0]) if array is not None else shard
            inner = max(1, min(inner, shard))
            return max(inner, limit // max(1, self.row_bytes()) // inner * inner)
        first = self.store.to_dask(self.features[0])
        return int(first.chunks[0][0]) if first.chunks[0] else 1


# ------------------------------------------------------------------------------------- store helpers


def _open(store: Any) -> Any:
    if isinstance(store, (str, os.PathLike)):
        from extract.store import open_store

        return open_store(str(store))
    return store


def available_features(store: Any) -> list[str]:
    """Every feature name in the store (all views)."""
    return list(store.feature_names(view=None))


def _store_draws(store: Any, name: str) -> list[str]:
    """The arrays of a feature's noise draws; stores without draws kept apart (or without the method) have one."""
    draw_names = getattr(store, "draw_names", None)
    return [name] if draw_names is None else list(draw_names(name))


def _draw_arrays(store: Any, features: Sequence[str], draws: int | None) -> dict[str, list[str]]:
    """Feature -> the arrays of its first `draws` noise draws (None: all the store keeps); one K for all."""
    per = {n: _store_draws(store, n) for n in features}
    counts = {n: len(a) for n, a in per.items()}
    if len(set(counts.values())) > 1:
        raise ProbeDataError(f"the features keep different numbers of noise draws ({counts}); probe them apart")
    have = next(iter(counts.values()), 1)
    if draws is None:
        return per
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ProbeDataError(f"draws={draws!r}: expected a positive number of noise draws")
    if draws > have:
        raise ProbeDataError(
            f"draws={draws}, but the store keeps {have} noise draw{'s' if have > 1 else ''} per feature; "
            "extract with noise: {draws: K, combine: separate} for more"
        )
    return {n: a[:draws] for n, a in per.items()}


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
        raise UnknownFeatureError(
            f"feature(s) {', '.join(map(repr, missing))} not in the store; features that exist: {listing}"
        )
    is_complete = getattr(store, "is_complete", None)
    unfinished = [a for f in features for a in _store_draws(store, f) if is_complete is not None and not is_complete(a)]
    if unfinished:
        # Unwritten shards read as the fill value: probing them would report accuracy on zeros.
        raise ProbeDataError(
            f"feature(s) {', '.join(unfinished)} are not completely extracted; finish (resume) the extraction first"
        )


def _flag_not_finite(flags: list[bool], block: np.ndarray) -> None:
    """Note (for the caller, after a parallel read) that `block` holds NaN or inf."""
    if not np.isfinite(block).all():
        flags.append(True)


def check_rows_finite(name: str, x: np.ndarray, rows: np.ndarray, sample_ids: Any) -> None:
    """Raise naming the lowest store row of `rows` (any order) whose values in `x` are not all finite."""
    ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not ok.all():
        order = np.argsort(rows, kind="stable")
        check_chunk_finite(name, x[order], rows[order], sample_ids)


def check_min_samples(n_available: int, k: int, what: str) -> None:
    """Raise when a method needs k samples but only n are there (e.g. kNN's k against the train split)."""
    if n_available < k:
        raise ProbeDataError(
            f"{what} needs at least {k} samples but only {n_available} are available; use a smaller k or a larger split"
        )
