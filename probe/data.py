"""From a feature store to standardised torch batches, splits and label subsets.

`ProbeData` is the one object the probes read. It answers four questions, always the same way for a seed:

- **Which rows?** `probe.splits`: the store's splits, carved stratified hold-outs, label subsets.
- **Which scale?** `probe.stats`: statistics from the (subset) train rows only, cached per store object.
- **In memory or streamed?** When all used features fit `memory_budget` (default 25% of RAM) they are read
  once as standardised float32 arrays; otherwise batches are streamed window by window.
- **In which order?** `probe.order.epoch_order`, the same in both modes (streams: `probe.stream.FeatureStream`).
- **Which noise draw?** A store that keeps K noise draws apart (`noise: {combine: separate}`) is augmentation:
  training epoch e reads draw e mod K (of the first `draws`, default all K; `draws=1` is draw 0 alone, i.e. a
  one-draw store); validation and test read draw 0, or with `eval_draws="mean"` every draw, the heads' logits
  averaged over them (`probe.evaluation`). Statistics come from draw 0's train rows, so every draw is
  standardised alike and `draws=1` and `draws=K` runs see the same scale.

Memory: `probe.sizing` (what a probe holds at once, and the bound on its peak). Reading: `probe.reading`
(checked and standardised in the decode threads; `probe.finite` names a row that holds NaN/inf).

Bad input fails early with `ProbeDataError` and a message that says what to do.
This module imports `extract.store` only: probing never needs the U-Net.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch

from extract.store import FeatureStore
from probe import sizing
from probe.budget import parse_memory
from probe.errors import ProbeDataError
from probe.finite import check_chunk_finite
from probe.inputs import StoreLike, as_store, check_features, draw_arrays, store_draws
from probe.order import OrderUnits, Window, epoch_order
from probe.reading import read_rows, read_whole
from probe.recipe import STANDARDIZE_MODES
from probe.splits import (
    KEY_SUBSET,
    SplitInfo,
    Subset,
    check_classes,
    draw_subset,
    optional_attr,
    resolve_splits,
    rows_digest,
    seeded_rng,
    store_labels,
)
from probe.stats import FeatureStats, cached_stats, compute_stats, stats_block_rows

__all__ = ["ProbeData", "EVAL_DRAWS"]

EVAL_DRAWS = ("first", "mean")


class ProbeData:
    """Standardised features, labels and splits of a store for probing. Build it with `from_store`."""

    def __init__(
        self,
        store: FeatureStore,
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
        order_units: OrderUnits | None = None,
    ) -> None:
        self.store = store
        self.features = list(features)
        self._draw_arrays = draw_arrays(store, self.features, draws)
        self.store_draws = len(store_draws(store, self.features[0])) if self.features else 1
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
        self._order_units = order_units
        if order_units is not None:
            self.chunk_rows = int(order_units.chunk_rows)
        elif self.features:
            self.chunk_rows = sizing.chunk_rows(
                store, self.features[0], self.row_bytes(), self.memory_budget, self.window_bytes()
            )
        else:
            self.chunk_rows = 1
        self.in_memory = self.memory_bytes() <= self.memory_budget if in_memory is None else bool(in_memory)
        self._memory: dict[str, np.ndarray] | None = None
        self._stats: dict[str, FeatureStats] = {}

    # ---- construction

    @classmethod
    def from_store(
        cls,
        store: StoreLike,
        features: Sequence[str] | str,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        subset: str | Subset | None = None,
        standardize: str = "dim",
        memory_budget: int | float | str | None = None,
        in_memory: bool | None = None,
        allow_missing_classes: bool = False,
        shuffle_buffer: int | str = "1GiB",
        draws: int | None = None,
        eval_draws: str = "first",
        order_units: OrderUnits | None = None,
    ) -> ProbeData:
        """Resolve features, labels and splits of `store` (a `FeatureStore` or a URL/path).

        `val_fraction` / `test_fraction` apply only to splits the store lacks; `subset` takes a label subset
        of train; `in_memory=None` decides by `memory_budget` (bytes, '2GiB', '25%'; default 25% of RAM).
        `shuffle_buffer` (bytes) sizes the shuffle windows of its `FeatureStream`s in both modes (see `epoch_order`).
        `draws` (default: all the store keeps) and `eval_draws` ("first" | "mean"): see the module docstring.
        `order_units` fixes the unit and window of the epoch order (default: sized from these features).
        """
        store = as_store(store)
        features = [features] if isinstance(features, str) else list(features)
        check_features(store, features)
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
            order_units=order_units,
        )

    def load(self) -> None:
        """Read what training needs before its first epoch: the in-memory copy, or the statistics of every
        feature (streamed); both check every value read for NaN/inf."""
        if self.in_memory:
            self.memory_arrays()
        else:
            for name in self.features:
                self.stats(name)

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
        return self.draws * self.num_rows * self.row_bytes()

    def row_bytes(self) -> int:
        """Bytes of one row of one draw of every feature: what a training window holds per row. It does not
        depend on `draws`, so runs on one draw and on K draws shuffle alike."""
        return sizing.row_bytes(self.feature_shapes.values())

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
            "train": "draw 0 only" if self.draws == 1 else f"draw (e - 1) mod {self.draws} in epoch e (epochs counted from 1)",
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
        """Bytes of one shuffle window (`probe.sizing.window_bytes`)."""
        return sizing.window_bytes(self.shuffle_buffer, self.memory_budget)

    def default_buffer_rows(self) -> int:
        """Shuffle window in rows (`probe.sizing.buffer_rows`): the same in memory and streamed."""
        if self._order_units is not None:
            return int(self._order_units.buffer_rows)
        return sizing.buffer_rows(self.chunk_rows, self.window_bytes(), self.row_bytes())

    def order_units(self) -> OrderUnits:
        """The unit and window of this data's epoch order (to give a part of the features the same order)."""
        return OrderUnits(self.chunk_rows, self.default_buffer_rows())

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

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """Standardised float32 arrays (N, C, H, W) of a split in store order (loads them when streaming);
        noise draw 0 where the store keeps several."""
        rows = self.rows(split)
        if self.in_memory:
            arrays = self.memory_arrays()
            return {n: arrays[n][rows] for n in self.features}
        out: dict[str, list[np.ndarray]] = {}
        for w in epoch_order(rows, self.chunk_rows, len(rows), 0, 0, shuffle=False):
            for n, a in self.read_window(w).items():
                out.setdefault(n, []).append(a)
        return {n: np.concatenate(parts) for n, parts in out.items()}

    def tensors(self, split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        xs = self.arrays(split)
        return {n: torch.from_numpy(a) for n, a in xs.items()}, torch.from_numpy(self.labels(split))

    def memory_arrays(self) -> dict[str, np.ndarray]:
        """The standardised in-memory copy, indexed by store row (read on first use), keyed by store array:
        the feature's name for draw 0, `draw_arrays(name)` for the others."""
        if not self.in_memory:
            raise ProbeDataError(
                "this ProbeData streams from the store (features exceed the memory budget); use a FeatureStream or arrays()"
            )
        if self._memory is None:
            self._memory = self._load_all()
        return self._memory

    def _load_all(self) -> dict[str, np.ndarray]:
        used = np.unique(np.concatenate(list(self._splits.values())))
        out: dict[str, np.ndarray] = {}
        for name in self.features:
            for array in self._draw_arrays[name]:  # draw 0 first: its statistics standardise every draw
                raw, finite = read_whole(self.store, array, (self.num_rows, *self.feature_shapes[name]))
                # The statistics from the raw copy use the streamed pass's blocks (bit-identical statistics)
                # without reading the store twice.
                stats = self._stats_from(name, raw, finite=finite)
                if not finite:  # only the used rows matter; name the first bad one
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
        `draw_arrays`); default every feature under its own name (`probe.reading.read_rows`).
        """
        sources = arrays or {n: n for n in self.features}
        # The statistics pass (run before a feature's first window) checked every train row of the feature's own
        # array for NaN/inf, and every read checks each chunk's crc32c: train rows need no second check there.
        known_finite = set(self.features) if self._is_train[window.order].all() else set()
        return read_rows(
            self.store,
            window.order,
            sources,
            lambda a: self.stats(self._feature_of[a]),
            self._sample_ids,
            known_finite,
        )

    # ---- internals

    @cached_property
    def _is_train(self) -> np.ndarray:
        """Store row -> whether it is a train row."""
        mask = np.zeros(self.num_rows, dtype=bool)
        mask[self.rows("train")] = True
        return mask

    @cached_property
    def _feature_of(self) -> dict[str, str]:
        """Store array -> the feature it is a draw of."""
        return {a: n for n, arrays in self._draw_arrays.items() for a in arrays}

    def _check_name(self, name: str) -> None:
        if name not in self.feature_shapes:
            raise ProbeDataError(
                f"feature {name!r} is not part of this ProbeData; features: {', '.join(self.features)}"
            )
