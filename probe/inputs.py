"""The features a probe reads from a store: the store opened, the request checked, the noise draws of each.

Every check here runs before any data is read, and its error says what exists and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from extract.store import FeatureStore, open_store
from probe.errors import ProbeDataError, UnknownFeatureError

__all__ = [
    "StoreLike",
    "as_store",
    "available_features",
    "store_draws",
    "draw_arrays",
    "check_features",
    "fusion_inputs",
]

# What the probe API accepts as a store: an open one, or its path/URL.
StoreLike = FeatureStore | str | os.PathLike[str]


def as_store(store: StoreLike) -> FeatureStore:
    """The store itself, or the store at a path/URL opened read-only."""
    if isinstance(store, (str, os.PathLike)):
        return open_store(str(store))
    return store


def available_features(store: FeatureStore) -> list[str]:
    """Every feature name in the store (all views)."""
    return list(store.feature_names(view=None))


def store_draws(store: FeatureStore, name: str) -> list[str]:
    """The arrays of a feature's noise draws; stores without draws kept apart (or without the method) have one."""
    draw_names = getattr(store, "draw_names", None)
    return [name] if draw_names is None else list(draw_names(name))


def draw_arrays(store: FeatureStore, features: Sequence[str], draws: int | None) -> dict[str, list[str]]:
    """Feature -> the arrays of its first `draws` noise draws (None: all the store keeps); one K for all."""
    per = {n: store_draws(store, n) for n in features}
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


def check_features(store: FeatureStore, features: list[str]) -> None:
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
    unfinished = [a for f in features for a in store_draws(store, f) if is_complete is not None and not is_complete(a)]
    if unfinished:
        # Unwritten shards read as the fill value: probing them would report accuracy on zeros.
        raise ProbeDataError(
            f"feature(s) {', '.join(unfinished)} are not completely extracted; finish (resume) the extraction first"
        )


def fusion_inputs(
    store: FeatureStore, features: Sequence[str]
) -> tuple[dict[tuple[int, int], str], list[int], dict[int, tuple[int, ...]]]:
    """{(t, block): name}, the timesteps, and one shape per block; errors when the grid is not complete."""
    keyed: dict[tuple[int, int], str] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name in features:
        info = store.feature_info(name)
        if info.t is None or info.block is None:
            raise ProbeDataError(f"fusion needs a timestep and a block for every feature; {name!r} has none")
        if (info.t, info.block) in keyed:
            raise ProbeDataError(
                f"fusion: {name!r} and {keyed[(info.t, info.block)]!r} are both t={info.t}, "
                f"block {info.block}; give one pooling per (t, block)"
            )
        keyed[(info.t, info.block)] = name
        shape = tuple(info.shape)
        if shapes.setdefault(info.block, shape) != shape:
            raise ProbeDataError(
                f"fusion shares one tokenizer per block across timesteps, so block {info.block} "
                f"needs one shape; got {shapes[info.block]} and {shape} ({name!r})"
            )
    ts = sorted({t for t, _ in keyed})
    blocks = sorted(shapes)
    missing = [f"t={t}/block {b}" for t in ts for b in blocks if (t, b) not in keyed]
    if missing:
        raise ProbeDataError(f"fusion needs every timestep x block pair; missing: {', '.join(missing)}")
    return keyed, ts, {b: shapes[b] for b in blocks}
