"""Spatial pooling of block feature maps before they are stored.

Two kinds, named as in the feature names (`avg{p}`, `tok{s}`):

- ``avg``: adaptive average pooling to exactly p x p. p may not exceed the map (we never upsample:
  a "pooled" map larger than its source would store interpolated values that look like features).
  When the map's side is divisible by p this is the exact mean of each (H/p) x (W/p) block.
- ``tok``: token mode for attention heads: average-pool to *at most* s x s. A map already no larger
  than s keeps its resolution, so a 8x8 block pooled with s=16 stays 8x8 (64 tokens).

Pooling acts on each sample independently, so its result never depends on the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

POOL_KINDS = ("avg", "tok")
_POOL_RE = re.compile(r"^(avg|tok)([1-9][0-9]*)$")


def parse_pool(pool: str) -> tuple[str, int]:
    """`"avg2"` -> `("avg", 2)`; `"tok16"` -> `("tok", 16)`. Raises ValueError on anything else."""
    match = _POOL_RE.match(str(pool))
    if not match:
        raise ValueError(f"pooling {pool!r} is not understood: use avg<p> (e.g. avg2) or tok<s> (e.g. tok16)")
    return match.group(1), int(match.group(2))


def format_pool(kind: str, size: int) -> str:
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pooling kind {kind!r}; kinds: {', '.join(POOL_KINDS)}")
    if int(size) < 1:
        raise ValueError(f"pooling size must be positive, got {size}")
    return f"{kind}{int(size)}"


def pooled_hw(kind: str, size: int, height: int, width: int | None = None) -> tuple[int, int]:
    """Output (h, w) of pooling a height x width map; raises ValueError when avg asks to upsample."""
    width = height if width is None else width
    if size < 1:
        raise ValueError(f"pooling size must be positive, got {size}")
    if kind == "avg":
        if size > height or size > width:
            raise ValueError(f"avg{size} asks for a {size}x{size} map from a {height}x{width} one: "
                             f"average pooling cannot enlarge a map (largest allowed: avg{min(height, width)})")
        return size, size
    if kind == "tok":
        return min(size, height), min(size, width)
    raise ValueError(f"unknown pooling kind {kind!r}; kinds: {', '.join(POOL_KINDS)}")


def pool_shape(pool: str, channels: int, resolution: int) -> tuple[int, int, int]:
    """Per-sample stored shape (C, h, w) of a block with `channels` x `resolution`^2 pooled by `pool`."""
    kind, size = parse_pool(pool)
    return (int(channels), *pooled_hw(kind, size, int(resolution)))


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


def pool_many(x: torch.Tensor, pools: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every requested pooling of one map; identical requests share one computation."""
    out: dict[str, torch.Tensor] = {}
    for name in pools:
        if name not in out:
            out[name] = pool(x, name)
    return out


def _check_map(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a (batch, channels, height, width) map, got shape {tuple(x.shape)}")
