"""Which features a probe command reads when the user names none: the paper's, or the nearest the store has."""

from __future__ import annotations

import math
from collections.abc import Sequence

from extract.store import FeatureInfo, FeatureStore
from probe.errors import ProbeDataError

__all__ = ["default_features", "why_default", "PAPER_LINEAR_FEATURE", "PAPER_ATTENTION_FEATURE"]

PAPER_LINEAR_FEATURE = "t090_b24_avg2"
PAPER_ATTENTION_FEATURE = "t090_b24_tok16"
PAPER_FUSION_BLOCKS = (19, 24, 30)
PAPER_FUSION_TIMESTEPS = (90, 150, 300)
PAPER_T, PAPER_BLOCK = 90, 24


def _center_infos(store: FeatureStore) -> list[FeatureInfo]:
    return [store.feature_info(n) for n in store.feature_names(view="center")]


def _distance(info: FeatureInfo) -> tuple[float, float]:
    t = abs(info.t - PAPER_T) if info.t is not None else math.inf
    b = abs(info.block - PAPER_BLOCK) if info.block is not None else math.inf
    return (t, b)


def _pool_rank(info: FeatureInfo, prefer: str) -> tuple[int, float]:
    kind, size = info.pool_kind, info.pool_size or 0
    if prefer == "avg":  # the linear head: avg2 first, then the nearest avg size, then tokens
        return (0, abs(size - 2)) if kind == "avg" else (1, -size)
    return (0, -size) if kind == "tok" else (1, -size)  # attention: the most tokens


def default_features(store: FeatureStore, command: str) -> list[str]:
    """The paper's feature(s) for `command` when the store has them, else the nearest available ones.

    linear/logistic/knn: t090_b24_avg2, else the avg-pooled feature nearest to t=90, block 24 (avg2 first).
    attention: t090_b24_tok16, else the token feature nearest to it. fusion: blocks {19, 24, 30} x t
    {90, 150, 300} in token mode, else the complete (t x block) grid of one pooling nearest to those (at most
    3 x 3). sweep: every centre-view feature that has a timestep and a block.
    """
    infos = _center_infos(store)
    if not infos:
        raise ProbeDataError("the store has no centre-view features")
    if command == "sweep":
        chosen = [i.name for i in infos if i.t is not None and i.block is not None]
        return chosen or [i.name for i in infos]
    if command == "fusion":
        return _default_fusion(infos)
    paper = PAPER_ATTENTION_FEATURE if command == "attention" else PAPER_LINEAR_FEATURE
    if any(i.name == paper for i in infos):
        return [paper]
    prefer = "tok" if command == "attention" else "avg"
    return [min(infos, key=lambda i: (_pool_rank(i, prefer), _distance(i), i.name)).name]


def why_default(store: FeatureStore, command: str, chosen: Sequence[str]) -> str:
    """Why `default_features(store, command)` chose `chosen`, as one line for the log: the paper's feature, or
    that the store lacks it and which nearest one stands in."""
    names = list(chosen)
    if command == "sweep":
        return f"every centre-view feature with a timestep and a block ({len(names)})"
    if command == "fusion":
        grid = f"blocks {', '.join(map(str, PAPER_FUSION_BLOCKS))} x t {', '.join(map(str, PAPER_FUSION_TIMESTEPS))}"
        infos = [store.feature_info(n) for n in names]
        if {i.t for i in infos} == set(PAPER_FUSION_TIMESTEPS) and {i.block for i in infos} == set(PAPER_FUSION_BLOCKS):
            return f"{', '.join(names)} (the paper's {grid})"
        return f"the paper's {grid} is not all in the store; nearest complete grid: {', '.join(names)}"
    paper_name = PAPER_ATTENTION_FEATURE if command == "attention" else PAPER_LINEAR_FEATURE
    if names == [paper_name]:
        return f"{paper_name} (the paper's choice)"
    return f"{paper_name} not in store; nearest: {', '.join(names)}"


def _default_fusion(infos: Sequence[FeatureInfo]) -> list[str]:
    by_pool: dict[str, dict[tuple[int, int], str]] = {}
    for i in infos:
        if i.t is not None and i.block is not None and i.pool_kind is not None:
            by_pool.setdefault(f"{i.pool_kind}{i.pool_size}", {})[(i.t, i.block)] = i.name
    if not by_pool:
        raise ProbeDataError("fusion needs features with a timestep and a block; this store has none")
    pools = sorted(by_pool, key=lambda p: (0 if p == "tok16" else 1 if p.startswith("tok") else 2, -int(p[3:]), p))
    for pool in pools:
        grid = by_pool[pool]
        ts = sorted({t for t, _ in grid}, key=lambda t: (min(abs(t - p) for p in PAPER_FUSION_TIMESTEPS), t))
        for n_t in range(min(3, len(ts)), 0, -1):
            chosen_t = sorted(ts[:n_t])
            blocks = sorted(b for b in {b for _, b in grid} if all((t, b) in grid for t in chosen_t))
            blocks = sorted(sorted(blocks, key=lambda b: (min(abs(b - p) for p in PAPER_FUSION_BLOCKS), b))[:3])
            if blocks:
                return [grid[(t, b)] for t in chosen_t for b in blocks]
    raise ProbeDataError("no complete timestep x block grid of features for fusion")
