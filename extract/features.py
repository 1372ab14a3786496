"""Feature names and pooled shapes: the project's one copy of the rule.

One store array per (timestep, block, pooling, view), named ``t{t:03d}_b{block:02d}_{pool}`` plus
``_flip`` for the horizontally flipped view, e.g. ``t090_b24_avg2`` or ``t150_b19_tok16_flip``.
A store that keeps K noise draws apart (``noise: {combine: separate}``) holds one array per draw: draw 0
under the plain name (so it is the array a one-draw store holds) and draw d >= 1 under the name plus
``_d{d}``, e.g. ``t150_b15_tok8_d3``.

Pooling is ``avg{p}`` (average-pooled to exactly p x p; p may not exceed the map, since a "pooled"
map larger than its source would store interpolated values) or ``tok{s}`` (token mode for attention
heads: average-pooled to at most s x s, so an 8x8 map stays 8x8 under tok16).

The spec, the pooling code, the pipeline and the store all name and size features through this
module, so a name read back from a store always means what the spec meant when it was written.
"""

from __future__ import annotations

import re
from typing import NamedTuple

POOL_KINDS = ("avg", "tok")
VIEWS = ("center", "flip")

_POOL_RE = re.compile(r"^(avg|tok)([1-9][0-9]*)$")
_NAME_RE = re.compile(r"^t(\d{3,})_b(\d{2,})_(avg|tok)(\d+)(_flip)?(?:_d(\d+))?$")


def parse_pool(pool: str) -> tuple[str, int]:
    """`"avg2"` -> `("avg", 2)`; `"tok16"` -> `("tok", 16)`. Raises ValueError on anything else."""
    match = _POOL_RE.match(str(pool))
    if not match:
        raise ValueError(f"pooling {pool!r} is not understood: use avg<p> (e.g. avg2) or tok<s> (e.g. tok16)")
    return match.group(1), int(match.group(2))


def pool_label(kind: str, size: int) -> str:
    """`("avg", 2)` -> `"avg2"`."""
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pooling kind {kind!r}; kinds: {', '.join(POOL_KINDS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"pooling size {size!r}: expected a positive integer")
    return f"{kind}{size}"


def pooled_hw(kind: str, size: int, height: int, width: int | None = None) -> tuple[int, int]:
    """Output (h, w) of pooling a height x width map; raises ValueError when avg asks to upsample."""
    width = height if width is None else width
    if size < 1:
        raise ValueError(f"pooling size must be positive, got {size}")
    if kind == "avg":
        if size > height or size > width:
            raise ValueError(
                f"avg{size} asks for a {size}x{size} map from a {height}x{width} one: "
                f"average pooling cannot enlarge a map (largest allowed: avg{min(height, width)})"
            )
        return size, size
    if kind == "tok":
        return min(size, height), min(size, width)
    raise ValueError(f"unknown pooling kind {kind!r}; kinds: {', '.join(POOL_KINDS)}")


class FeatureKey(NamedTuple):
    """The parts of a feature name, in `feature_name`'s argument order."""

    t: int
    block: int
    pool: str  # 'avg2', 'tok16'
    view: str = "center"
    draw: int = 0  # noise draw of a `combine: separate` store; 0 for every other store

    @classmethod
    def parse(cls, name: str) -> FeatureKey:
        return parse_feature_name(name)

    @property
    def name(self) -> str:
        return feature_name(*self)

    @property
    def pool_kind(self) -> str:
        return parse_pool(self.pool)[0]

    @property
    def pool_size(self) -> int:
        return parse_pool(self.pool)[1]

    def shape(self, channels: int, height: int, width: int | None = None) -> tuple[int, int, int]:
        """Per-sample stored shape (C, h, w) of a block's channels x height x width map under this pooling."""
        return (int(channels), *pooled_hw(self.pool_kind, self.pool_size, int(height), width))


def feature_name(t: int, block: int, pool: str | tuple[str, int], view: str = "center", draw: int = 0) -> str:
    """`t{t:03d}_b{block:02d}_{pool}` plus `_flip` for the flipped view and `_d{draw}` for noise draw
    draw >= 1 of a separate-draws store, e.g. 't090_b24_avg2', 't150_b15_tok8_flip_d2'."""
    kind, size = parse_pool(pool) if isinstance(pool, str) else pool
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: expected one of {', '.join(VIEWS)}")
    for label, value in (("t", t), ("block", block), ("draw", draw)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} {value!r}: expected a non-negative integer")
    suffix = ("_flip" if view == "flip" else "") + (f"_d{draw}" if draw else "")
    return f"t{t:03d}_b{block:02d}_{pool_label(kind, size)}{suffix}"


def draw_name(name: str, draw: int) -> str:
    """The array holding noise draw `draw` of feature `name` (draw 0: `name` itself), e.g.
    ('t150_b15_tok8', 2) -> 't150_b15_tok8_d2'."""
    return parse_feature_name(name)._replace(draw=int(draw)).name


def parse_feature_name(name: str) -> FeatureKey:
    """Reverse `feature_name`: `feature_name(*parse_feature_name(n)) == n`."""
    m = _NAME_RE.fullmatch(name)
    if not m or m.group(4).startswith("0"):
        raise ValueError(
            f"{name!r} is not a feature name (expected e.g. 't090_b24_avg2', 't150_b19_tok16_flip' or 't150_b15_tok8_d1')"
        )
    t, block, kind, size, flip, draw = m.groups()
    key = FeatureKey(int(t), int(block), f"{kind}{int(size)}", "flip" if flip else "center", int(draw or 0))
    if feature_name(*key) != name:  # e.g. 't0090_b24_avg2': not the canonical spelling
        raise ValueError(f"{name!r} is not in canonical form; expected {feature_name(*key)!r}")
    return key
