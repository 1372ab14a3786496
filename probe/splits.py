"""Which rows a probe trains, selects and reports on: the store's splits, carved hold-outs, label subsets.

Splits come from the store (`train` / `val` / `test`); a missing validation split is carved, seeded and
stratified, out of train (likewise a missing test split); a store without splits is split train/val/test the
same way. Rows that failed extraction (`store.valid`) or have no label (-1) are left out and counted. Label
subsets (`"1%"`, `"10%"`, `"5-shot"`) are drawn from train *after* validation is carved, so every subset of a
seed is judged on the same validation rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from extract.store import FeatureStore
from probe.errors import ProbeDataError

__all__ = [
    "SPLITS",
    "Subset",
    "SplitInfo",
    "stratified_holdout",
    "carve_validation",
    "draw_subset",
    "rows_digest",
    "resolve_splits",
    "check_classes",
    "store_labels",
    "seeded_rng",
    "optional_attr",
    "KEY_SUBSET",
    "KEY_ORDER",
]

# Purposes of the random streams derived from one user seed: independent, and stable when another changes.
_KEY_SPLIT, _KEY_VAL, _KEY_TEST, KEY_SUBSET, KEY_ORDER = 11, 12, 13, 14, 15
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
SPLITS: tuple[str, ...] = ("train", "val", "test")


def rows_digest(rows: np.ndarray) -> str:
    """Short sha256 of a row index array: enough to tell two splits apart in a results file."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def optional_attr(store: Any, attr: str) -> Any:
    """A store attribute that may be absent (None then): stores from other writers need not have it."""
    try:
        return getattr(store, attr)
    except (AttributeError, KeyError):
        return None


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *keys]))


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
        raise ProbeDataError(
            f"subset {text!r} is not understood: use a percentage like '1%' or '10%', or 'K-shot' like '5-shot'"
        )

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.kind == "fraction" else f"{int(self.value)}-shot"


def stratified_holdout(
    rows: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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


def carve_validation(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, validation): the seeded, stratified validation split a probe carves out of train for `seed`.

    The one split rule of the project: the store probes, DifFeed and the benchmarks all carve it here.
    """
    return stratified_holdout(rows, labels, fraction, seeded_rng(seed, _KEY_VAL))


def draw_subset(
    rows: np.ndarray, labels: np.ndarray, subset: Subset, rng: np.random.Generator, class_names: Sequence[str]
) -> np.ndarray:
    """The rows of a seeded, stratified label subset of `rows` (sorted)."""
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rows[labels == cls]
        if subset.kind == "shot":
            k = int(subset.value)
            if len(members) < k:
                raise ProbeDataError(
                    f"subset {subset}: class {class_names[cls]!r} (label {cls}) has only {len(members)} "
                    f"train samples, fewer than k={k}; use a smaller k or a larger store"
                )
            n = k
        else:
            n = max(1, int(round(subset.value * len(members))))
        chosen.append(members[rng.permutation(len(members))[:n]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclass
class SplitInfo:
    """How the splits were made: enough to rebuild them, and to see at a glance what a result rests on."""

    source: dict[str, str] = field(default_factory=dict)  # split -> "store" | "carved from train" | ...
    dropped: dict[str, int] = field(default_factory=dict)  # reasons -> rows left out


def store_labels(store: FeatureStore) -> tuple[np.ndarray, list[str]]:
    labels = optional_attr(store, "labels")
    if labels is None or len(labels) == 0 or not (np.asarray(labels) >= 0).any():
        raise ProbeDataError(
            "the store has no labels (every label is -1 or the labels array is absent): "
            "probes need class labels; re-extract from a labelled source"
        )
    labels = np.asarray(labels, dtype=np.int64)
    names = optional_attr(store, "class_names")
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


def resolve_splits(
    store: FeatureStore,
    labels: np.ndarray,
    class_names: Sequence[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> tuple[dict[str, np.ndarray], SplitInfo, np.ndarray]:
    n = len(labels)
    valid = optional_attr(store, "valid")
    usable = np.asarray(labels >= 0) if valid is None else np.asarray(labels >= 0) & np.asarray(valid, dtype=bool)
    info = SplitInfo()
    given = optional_attr(store, "splits") or {}
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
        train, test = stratified_holdout(
            split_rows["train"], labels[split_rows["train"]], test_fraction, seeded_rng(seed, _KEY_TEST)
        )
        split_rows["train"], split_rows["test"] = train, test
        info.source["test"] = f"carved from train (stratified, {test_fraction:g}, seed {seed})"
    if "val" not in split_rows:
        train, val = carve_validation(split_rows["train"], labels[split_rows["train"]], val_fraction, seed)
        split_rows["train"], split_rows["val"] = train, val
        info.source["val"] = f"carved from train (stratified, {val_fraction:g}, seed {seed})"
    ordered = {s: split_rows[s] for s in SPLITS}
    return ordered, info, ordered["train"].copy()


def _check_disjoint(found: Mapping[str, np.ndarray | None]) -> None:
    named = [(s, r) for s, r in found.items() if r is not None]
    for i, (a, ra) in enumerate(named):
        for b, rb in named[i + 1 :]:
            common = np.intersect1d(ra, rb, assume_unique=True)
            if len(common):
                raise ProbeDataError(
                    f"the store's {a!r} and {b!r} splits share {len(common)} row(s) (first: "
                    f"{int(common[0])}): results would leak between them"
                )


def check_classes(splits: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str]) -> None:
    # Classes are the ones that have labelled rows anywhere; a class-name list longer than that is allowed.
    present = np.unique(np.concatenate([labels[r] for r in splits.values()]))
    for split, rows in splits.items():
        if len(rows) == 0:
            raise ProbeDataError(
                f"the {split!r} split is empty; the store has too few labelled rows to split "
                f"(lower val_fraction/test_fraction or extract more samples)"
            )
        missing = np.setdiff1d(present, labels[rows])
        if len(missing):
            names = ", ".join(f"{class_names[c]!r}" for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ProbeDataError(
                f"the {split!r} split has no samples of {len(missing)} class(es): {names}; "
                f"accuracy there would be undefined. Use a larger store or "
                f"allow_missing_classes=True"
            )
