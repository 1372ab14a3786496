"""Probe heads trained on frozen, cached U-Net features.

Three heads, as the paper describes them (docs: /work/shared/PAPER.md):

- `LinearHead`: flatten the pooled map channel-major, optionally BatchNorm1d without affine, one Linear.
  `LinearGroup` computes H such heads on one feature as one matmul (sweeps train and evaluate them so).
- `AttentionPoolHead`: LayerNorm over (C, H, W) + Conv1x1 C -> dim turns a block map into H*W tokens; a
  zero-initialised CLS token is prepended; `depth` pre-norm ViT blocks (MLP x4, GELU, no qkv bias, no
  dropout) run without any positional embedding (the paper's head); a Linear reads the CLS output.
  `positions="learned"` adds a learned absolute embedding per token place (ViT's, truncated normal, std 0.02):
  a U-Net map carries no absolute position of its own beyond its borders, and without one the head is blind
  to where in the image a token lies, which a linear map over the whole block map is not.
- `DifFormerHead`: one tokenizer per block (shared across timesteps) and ONE transformer shared across
  timesteps; for each timestep the tokens of all blocks are concatenated behind one CLS token; the per-t CLS
  outputs are concatenated and classified by Linear(n_t * dim -> classes).

Final norm: the paper's public code (ssl_diff/attention_head.py) goes straight from the extracted CLS token to
the Dense layer, with no final LayerNorm, so `final_norm=False` is the default here; `final_norm=True` adds the
LayerNorm that timm-style pre-norm ViTs put before their head. Initialisation is PyTorch's default for every
layer (as in the public code); use `seeded_init(seed)` to build a head reproducibly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from probe.options import POSITIONS

__all__ = [
    "PRESETS",
    "HeadSizes",
    "LinearHead",
    "BlockTokenizer",
    "TransformerBlock",
    "ClsTransformer",
    "AttentionPoolHead",
    "DifFormerHead",
    "LinearGroup",
    "seeded_init",
    "resolve_preset",
]

class HeadSizes(TypedDict, total=False):
    """A transformer head's sizes, as keyword arguments of the heads below."""

    dim: int
    heads: int
    depth: int


# Transformer sizes: "paper" is the published configuration; the others keep CPU runs and tests affordable.
PRESETS: dict[str, dict[str, int]] = {
    "paper": dict(dim=1024, heads=8, depth=2),
    "small": dict(dim=128, heads=4, depth=2),
    "tiny": dict(dim=64, heads=4, depth=1),
}


def resolve_preset(
    preset: str | None, dim: int | None = None, heads: int | None = None, depth: int | None = None
) -> HeadSizes:
    """Merge a named preset with explicit overrides (an explicit value always wins)."""
    if preset is None:
        base: dict[str, int] = {}
    elif preset in PRESETS:
        base = dict(PRESETS[preset])
    else:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))} or None, got {preset!r}")
    for name, value in (("dim", dim), ("heads", heads), ("depth", depth)):
        if value is not None:
            base[name] = value
    missing = [n for n in ("dim", "heads", "depth") if n not in base]
    if missing:
        raise ValueError(f"without a preset, {', '.join(missing)} must be given")
    _check_transformer_sizes(base["dim"], base["heads"], base["depth"])
    return HeadSizes(dim=base["dim"], heads=base["heads"], depth=base["depth"])


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules inside this block to get the same initial weights for the same seed.

    The global CPU RNG is forked, so the caller's random stream is left exactly as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _as_shape(in_shape: int | Sequence[int], name: str = "in_shape") -> tuple[int, ...]:
    shape = (int(in_shape),) if isinstance(in_shape, (int,)) else tuple(int(s) for s in in_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{name} must be a positive int or a tuple of positive ints, got {in_shape!r}")
    return shape


def _map_shape(in_shape: int | Sequence[int], name: str = "in_shape") -> tuple[int, int, int]:
    """A block map's (C, H, W); a flat (C,) feature is one 1x1 token."""
    shape = _as_shape(in_shape, name)
    if len(shape) == 1:
        return (shape[0], 1, 1)
    if len(shape) != 3:
        raise ValueError(f"{name} must be (C, H, W) or (C,), got {tuple(shape)}")
    return shape


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_transformer_sizes(dim: int, heads: int, depth: int) -> None:
    _check_positive("dim", dim)
    _check_positive("heads", heads)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))}, got {positions!r}")


def _check_head_sizes(num_classes: int, dim: int, heads: int, depth: int) -> None:
    """The checks every transformer head makes before building anything."""
    _check_positive("num_classes", num_classes)
    _check_transformer_sizes(dim, heads, depth)


class LinearHead(nn.Module):
    """Linear classifier on a flattened (channel-major) pooled feature.

    `batchnorm=True` adds BatchNorm1d(affine=False) before the Linear: a parameter-free standardisation whose
    running statistics are learned on the training batches (the MAE / DINO linear-probe trick). The paper's linear
    head has no normalisation, hence the default.
    """

    def __init__(self, in_shape: int | Sequence[int], num_classes: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.in_shape = _as_shape(in_shape)
        _check_positive("num_classes", num_classes)
        in_features = math.prod(self.in_shape)
        self.norm: nn.Module = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.linear.in_features:
            raise ValueError(f"LinearHead expects inputs of shape (N, {self.in_shape}), got {tuple(x.shape)}")
        # flatten(1) on a contiguous (N, C, H, W) map is channel-major: c*H*W + h*W + w, as the paper flattens.
        return self.linear(self.norm(x.flatten(1)))


class BlockTokenizer(nn.Module):
    """LayerNorm over the whole (C, H, W) map, then Conv1x1 C -> dim: (N, C, H, W) -> (N, H*W, dim); with
    `positions="learned"`, plus a learned embedding per token place."""

    def __init__(self, in_shape: int | Sequence[int], dim: int, positions: str = "none") -> None:
        super().__init__()
        self.in_shape = _map_shape(in_shape)
        _check_positive("dim", dim)
        _check_positions(positions)
        self.norm = nn.LayerNorm(self.in_shape)
        self.proj = nn.Conv2d(self.in_shape[0], dim, kernel_size=1)
        self.pos: nn.Parameter | None = None
        if positions == "learned":
            # Drawn after the layers above, so heads without positions keep the initial weights they always had.
            self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.num_tokens, dim), std=0.02))

    @property
    def num_tokens(self) -> int:
        return self.in_shape[1] * self.in_shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"tokenizer expects (N, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        tokens = self.proj(self.norm(x)).flatten(2).transpose(1, 2)
        return tokens if self.pos is None else tokens + self.pos


class _Attention(nn.Module):
    """Multi-head self-attention as in timm's ViT: qkv without bias, output projection with bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(head_dim), as the reference
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)); MLP dim -> 4 dim -> dim with GELU; no dropout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsTransformer(nn.Module):
    """Prepends a zero-initialised CLS token to (N, L, dim) tokens, runs the blocks, returns the CLS output."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float = 4.0, final_norm: bool = False) -> None:
        super().__init__()
        _check_transformer_sizes(dim, heads, depth)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm: nn.Module = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        # Only the CLS row is read, so the final norm (if any) is applied to that row alone.
        return self.norm(x[:, 0])


class AttentionPoolHead(nn.Module):
    """The paper's attention head on one block map (N, C, H, W) (pool it to at most 16x16 before caching).

    A flat (N, C) input is accepted as a single 1x1 token. Defaults are the paper's (dim 1024, 8 heads, depth 2);
    `PRESETS["small"]` / `PRESETS["tiny"]` are CPU-sized alternatives: `AttentionPoolHead(s, k, **PRESETS["tiny"])`.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        num_classes: int,
        dim: int = 1024,
        heads: int = 8,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        final_norm: bool = False,
        positions: str = "none",
    ) -> None:
        super().__init__()
        _check_head_sizes(num_classes, dim, heads, depth)
        self.tokenizer = BlockTokenizer(in_shape, dim, positions)
        self.encoder = ClsTransformer(dim, heads, depth, mlp_ratio, final_norm)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.tokenizer(x)))


def _block_key(block: Hashable) -> str:
    # ModuleDict keys must be strings without dots; blocks are ints (24) or names ("out").
    return f"b{block}".replace(".", "_")


class DifFormerHead(nn.Module):
    """Fusion across blocks and timesteps (DifFormer).

    `block_shapes` maps each block (an int such as 24, or any hashable name) to its cached map shape (C, H, W);
    `timesteps` lists the noise steps. `forward` takes `{(t, block): (N, C_b, H_b, W_b)}` with every pair of
    `timesteps` x `block_shapes` present (extra keys are an error, so a mis-wired input cannot pass silently).

    Per timestep t, the tokens of all blocks (in `block_shapes` order) are concatenated behind one CLS token and
    the shared transformer runs; the n_t runs are batched into one call (stacked on the batch axis), which is the
    same computation because the transformer treats samples independently. The CLS outputs are concatenated in
    `timesteps` order and classified by Linear(n_t * dim -> num_classes).
    """

    def __init__(
        self,
        block_shapes: Mapping[Any, Sequence[int]],  # keyed by block (number or name)
        timesteps: Sequence[int],
        num_classes: int,
        dim: int = 1024,
        heads: int = 8,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        final_norm: bool = False,
        positions: str = "none",
    ) -> None:
        super().__init__()
        if not block_shapes:
            raise ValueError("block_shapes must name at least one block")
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"timesteps must be a non-empty list of distinct ints, got {list(timesteps)!r}")
        _check_head_sizes(num_classes, dim, heads, depth)
        self.blocks = list(block_shapes)
        keys = [_block_key(b) for b in self.blocks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"block names collide after normalisation: {self.blocks!r}")
        self.tokenizers = nn.ModuleDict({k: BlockTokenizer(block_shapes[b], dim, positions) for k, b in zip(keys, self.blocks)})
        self.encoder = ClsTransformer(dim, heads, depth, mlp_ratio, final_norm)
        self.classifier = nn.Linear(len(self.timesteps) * dim, num_classes)
        self.dim = dim

    @property
    def input_keys(self) -> list[tuple[int, Hashable]]:
        return [(t, b) for t in self.timesteps for b in self.blocks]

    def forward(self, inputs: Mapping[tuple[int, Hashable], torch.Tensor]) -> torch.Tensor:
        expected = set(self.input_keys)
        got = set(inputs)
        if got != expected:
            raise ValueError(
                f"DifFormerHead inputs: missing {sorted(map(str, expected - got))}, unexpected {sorted(map(str, got - expected))}"
            )
        n_t = len(self.timesteps)
        tokens = []
        for block in self.blocks:
            # The tokenizer is shared across t: run it once on all timesteps stacked along the batch axis.
            stacked = torch.cat([inputs[(t, block)] for t in self.timesteps], dim=0)
            tokens.append(self.tokenizers[_block_key(block)](stacked))
        cls = self.encoder(torch.cat(tokens, dim=1))  # (n_t * N, dim), rows grouped by t
        n = cls.shape[0] // n_t
        return self.classifier(cls.reshape(n_t, n, self.dim).transpose(0, 1).reshape(n, n_t * self.dim))


class LinearGroup:
    """H `LinearHead`s on one feature as one (H*K, D) matmul; gradients flow back to each head's own weights."""

    def __init__(self, heads: Sequence[LinearHead], spec: str) -> None:
        self.spec = spec
        self.heads = list(heads)
        self.num_heads = len(self.heads)
        self.classes = self.heads[0].linear.out_features
        self.in_features = self.heads[0].linear.in_features
        self.in_shape = self.heads[0].in_shape
        self.weights: list[torch.Tensor] = [h.linear.weight for h in self.heads]
        self.biases: list[torch.Tensor] = [h.linear.bias for h in self.heads]
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def frozen(self) -> LinearGroup:
        """Concatenate the weights once, for evaluation (weights fixed, no gradient)."""
        self._fixed = (torch.cat(self.biases).detach(), torch.cat(self.weights).detach().t())
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"LinearHead expects inputs of shape (N, {self.in_shape}), got {tuple(x.shape)}")
        bias, weight_t = (
            self._fixed if self._fixed is not None else (torch.cat(self.biases), torch.cat(self.weights).t())
        )
        return torch.addmm(bias, x.flatten(1), weight_t)

    def per_head_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, H*K) logits -> (B, H) cross-entropy of every sample under every head."""
        n, h = int(y.shape[0]), self.num_heads
        targets = y.unsqueeze(1).expand(n, h).reshape(-1)
        return F.cross_entropy(logits.reshape(n * h, self.classes), targets, reduction="none").view(n, h)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(H,) number of samples each head classifies correctly."""
        n = int(y.shape[0])
        return (logits.view(n, self.num_heads, self.classes).argmax(2) == y.unsqueeze(1)).sum(0)
