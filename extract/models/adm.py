"""The ADM U-Net of guided-diffusion ("Diffusion Models Beat GANs on Image Synthesis").

Reads top-down like the figure: timestep embedding -> encoder (input_blocks) -> middle block ->
decoder (output_blocks, fed the encoder's skips last-in-first-out) -> output head.

Module names, state-dict keys and arithmetic match guided-diffusion's `unet.py`, so its released
checkpoints load strictly and give the same activations. What differs on purpose: a typed config
instead of positional flags, no fp16 conversion hacks (use autocast), and `features`, which runs
the network only as far as the deepest requested block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extract.models.config import PRESETS, ADMConfig, BlockInfo, block_table, config_from_flags

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the raw integer timestep, cos half first (as the reference)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, as the reference does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._norm(x)
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, as guided-diffusion does for the layers that close a residual branch:
    a freshly built block then starts as the identity, which is what training from scratch relies on."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # The resampling sits between the norm/activation and the conv, on h and x alike.
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's QKVAttention on (batch*heads, ch, length) tensors: scaled einsums, float32 softmax."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through `scaled_dot_product_attention` (its default scale is 1/sqrt(ch))."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection.

    `legacy_order` reproduces the released checkpoints' qkv layout: split into heads first, each
    head's channels then [q|k|v]. The new order (64x64 model) chunks q, k, v first, then heads.
    """

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, use_new_attention_order: bool):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.legacy_order = not use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        # Reduced precision on a GPU: a fused kernel (flash / memory-efficient) that never writes the
        # (length x length) weights out and accumulates in float32, as the reference's softmax does.
        # Elsewhere the reference's own arithmetic, bit for bit (on a CPU the fused bf16 kernel was slower).
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, heads = qkv.shape[-1], self.num_heads
        ch = c // heads
        if self.legacy_order:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, v = (part.reshape(b * heads, ch, length) for part in qkv.chunk(3, dim=1))
        if self.fused and x.is_cuda and torch.is_autocast_enabled("cuda"):
            a = fused_attention(q, k, v)
        else:
            a = reference_attention(q, k, v)
        a = a.reshape(b, c, length)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the layers that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = cfg = config
        mc, emb_ch = cfg.model_channels, cfg.emb_channels
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def res(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_ch, cfg.dropout, ch_out, cfg.use_scale_shift_norm, **updown)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        # Encoder: a stem conv, then per level num_res_blocks ResBlocks (+attention), then a down block.
        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = res(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, cfg.num_heads), res(ch, ch))

        # Decoder: levels reversed, each ResBlock eats one skip (last in, first out).
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, use_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))
        )

        self.blocks: tuple[BlockInfo, ...] = block_table(cfg)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_flags(cls, **flags: Any) -> ADMUNet:
        """Build from guided-diffusion's flag names, with the defaults of `model_and_diffusion_defaults()`."""
        return cls(config_from_flags(**flags))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ADMUNet:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls.from_flags(**{**PRESETS[name], **overrides})

    # -- block addressing --------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_info(self, block: int | str) -> BlockInfo:
        """Look a block up by the paper's 1-based number or by module name."""
        if isinstance(block, bool):
            raise TypeError(f"block {block!r}: expected an int or a module name")
        if isinstance(block, int):
            if not 1 <= block <= self.num_blocks:
                raise ValueError(f"block {block} out of range: this model has blocks 1..{self.num_blocks}")
            return self.blocks[block - 1]
        if isinstance(block, str):
            for info in self.blocks:
                if info.module == block:
                    return info
            if block.isdigit():
                return self.block_info(int(block))
            raise ValueError(
                f"no block named {block!r}; blocks are 1..{self.num_blocks} or module names such as "
                f"'input_blocks.0', 'middle_block', 'output_blocks.{len(self.output_blocks) - 1}'"
            )
        raise TypeError(f"block {block!r}: expected an int or a module name")

    # -- forward -----------------------------------------------------------------------------

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        if self.config.num_classes is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass y (class labels)")
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this model is unconditional: y must be None")
        return emb

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        last_block: int,
        keep: set[int],
        additions: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks 1..last_block, returning the last output and the outputs of `keep`.

        `additions` maps block numbers to tensors added to that block's output before anything reads it,
        so an encoder block's sum is also what its skip connection carries (DifFeed's feedback).
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, y)
        kept: dict[int, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        h = x
        for n, module, role in self._walk():
            if role == "decoder":
                h = module(torch.cat([h, skips.pop()], dim=1), emb)  # current h first, then the skip
            else:
                h = module(h, emb)
            if additions and n in additions:
                h = h + additions[n]
            if role == "encoder":
                skips.append(h)
            if n in keep:
                kept[n] = h
            if n == last_block:
                break
        return h, kept

    def _walk(self) -> Iterator[tuple[int, nn.Module, str]]:
        """Every block in running order, numbered from 1, with its role: encoder blocks push a skip, decoder blocks pop one."""
        blocks = [
            *(("encoder", m) for m in self.input_blocks),
            ("middle", self.middle_block),
            *(("decoder", m) for m in self.output_blocks),
        ]
        for n, (role, module) in enumerate(blocks, start=1):
            yield n, module, role

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h, _ = self._run(x, t, y, self.num_blocks, set())
        return self.out(h)

    def features(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        blocks: Iterable[int | str],
        y: torch.Tensor | None = None,
        additions: Mapping[int | str, torch.Tensor] | None = None,
    ) -> dict[int | str, torch.Tensor]:
        """Outputs of the requested blocks, keyed as requested; nothing past the deepest one runs.

        `additions` ({block: tensor}) adds each tensor to that block's output in this pass only; the sum is
        what later blocks, skips and the returned features see. Gradients flow through the additions.
        """
        requested = list(blocks)
        if not requested:
            raise ValueError("features() needs at least one block")
        numbers = {b: self.block_info(b).number for b in requested}
        last = max(numbers.values())
        added: dict[int, torch.Tensor] = {}
        for block, tensor in (additions or {}).items():
            info = self.block_info(block)
            if info.number > last:
                # It would be silently ignored: nothing past the deepest requested block runs.
                raise ValueError(f"addition to block {info.number} lies past the deepest requested block {last}")
            if tensor.dim() != 4 or tensor.shape[1] != info.channels:
                raise ValueError(
                    f"addition to block {info.number} must be (N, {info.channels}, H, W), got {tuple(tensor.shape)}"
                )
            if info.number in added:
                raise ValueError(f"two additions name block {info.number}")
            added[info.number] = tensor
        _, kept = self._run(x, t, y, last, set(numbers.values()), added)
        return {b: kept[n] for b, n in numbers.items()}

    # -- accounting --------------------------------------------------------------------------

    def flops_to_block(self, block: int | str | None = None) -> int:
        """Multiply-accumulate count of one image's pass up to `block` (None: the full forward)."""
        last = self.num_blocks if block is None else self.block_info(block).number
        macs = 0
        hooks = []

        def conv_hook(mod: nn.Conv2d, inp: Any, out: torch.Tensor) -> None:
            nonlocal macs
            w = mod.weight
            macs += out[0].numel() * w[0].numel()

        def linear_hook(mod: nn.Linear, inp: Any, out: torch.Tensor) -> None:
            nonlocal macs
            macs += out[0].numel() * mod.in_features

        def attn_hook(mod: AttentionBlock, inp: Any, out: torch.Tensor) -> None:
            nonlocal macs
            c = out.shape[1]
            length = out[0, 0].numel()
            macs += 2 * c * length * length  # q.k and weights.v

        with torch.device("meta"):
            twin = ADMUNet(self.config)  # shapes only: costs no memory, whatever the model's size
        for m in twin.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                hooks.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(linear_hook))
            elif isinstance(m, AttentionBlock):
                hooks.append(m.register_forward_hook(attn_hook))
        try:
            size = self.config.image_size
            x = torch.zeros(1, self.config.in_channels, size, size, device="meta")
            t = torch.zeros(1, dtype=torch.long, device="meta")
            y = torch.zeros(1, dtype=torch.long, device="meta") if self.config.num_classes else None
            with torch.no_grad():
                h, _ = twin._run(x, t, y, last, set())
                if block is None:
                    twin.out(h)
        finally:
            for hk in hooks:
                hk.remove()
        return macs
