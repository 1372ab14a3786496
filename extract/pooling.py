"""Spatial pooling of block feature maps before they are stored.

The kinds and their output shapes are the feature-name rule of `extract.features` (`avg{p}`: exactly
p x p, never enlarging; `tok{s}`: at most s x s). When a map's side is divisible by p, avg is the exact
mean of each (H/p) x (W/p) block. Pooling acts on each sample independently, so its result never
depends on the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from extract.features import POOL_KINDS, parse_pool, pooled_hw


def avg_pool(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, p, p) by adaptive average pooling; p must not exceed H or W."""
    _check_map(x)
    pooled_hw("avg", p, x.shape[-2], x.shape[-1])
    if x.shape[-2] == p and x.shape[-1] == p:
        return x  # identity: skip the kernel so the bytes are exactly the block's output
    return F.adaptive_avg_pool2d(x, (p, p))


def token_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, min(s, H), min(s, W)): pool to at most s x s tokens."""
    _check_map(x)
    h, w = pooled_hw("tok", s, x.shape[-2], x.shape[-1])
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.adaptive_avg_pool2d(x, (h, w))


def pool(x: torch.Tensor, spec: str | tuple[str, int]) -> torch.Tensor:
    """Pool by a name (`"avg2"`) or a (kind, size) pair."""
    kind, size = parse_pool(spec) if isinstance(spec, str) else (spec[0], int(spec[1]))
    if kind == "avg":
        return avg_pool(x, size)
    if kind == "tok":
        return token_pool(x, size)
    raise ValueError(f"unknown pooling kind {kind!r}; kinds: {', '.join(POOL_KINDS)}")


def _check_map(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (batch, channels, height, width) map, got shape {tuple(x.shape)}")
