"""DifFeed's network: which decoder blocks feed back into which encoder blocks, and the module that runs
the frozen U-Net twice with the feedback layers' outputs added in pass 2."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from extract.models.adm import ADMUNet
from probe.heads import AttentionPoolHead, TransformerBlock


def _encoder_size(unet: ADMUNet) -> int:
    return len(unet.input_blocks)


def skip_partner(unet: ADMUNet, block: int) -> int:
    """The encoder block whose output decoder block `block` takes as its skip (38 - b on the 256 models)."""
    number = unet.block_info(block).number
    if number <= _encoder_size(unet) + 1:
        raise ValueError(f"block {number} is not a decoder block (decoder blocks: {_encoder_size(unet) + 2}..)")
    return unet.num_blocks + 1 - number


def default_feedback_blocks(unet: ADMUNet) -> list[int]:
    """One decoder block per resolution level: the one fed by the first ResBlock of each encoder level."""
    cfg = unet.config
    firsts = [2 + level * (cfg.num_res_blocks + 1) for level in range(len(cfg.channel_mult))]
    return sorted(unet.num_blocks + 1 - p for p in firsts)


def default_read_block(unet: ADMUNet) -> int:
    """The paper's block 24 on the 256 models: the second-deepest default feedback block."""
    blocks = default_feedback_blocks(unet)
    return blocks[1] if len(blocks) > 1 else blocks[0]


def _feedback_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


def feedback_parameter_count(unet: ADMUNet, feedback_blocks: Sequence[int] | None = None) -> int:
    """Trainable parameters of the feedback layers alone (about 2.8M for the 256 models' defaults)."""
    blocks = default_feedback_blocks(unet) if feedback_blocks is None else feedback_blocks
    total = 0
    for b in blocks:
        c_in, c_out = unet.block_info(b).channels, unet.block_info(skip_partner(unet, b)).channels
        total += c_in * c_out + 2 * c_out
    return total


# ---------------------------------------------------------------------------------------------- module


class DifFeed(nn.Module):
    """Feedback layers + attention head around a frozen U-Net; `forward(x_t, t)` gives logits.

    The U-Net is held but not registered as a submodule, so `parameters()`, `state_dict()` and checkpoints hold
    only what trains; move it with `.unet.to(device)` (the trainer does). `feedback_blocks=()` gives the plain
    attention head on the read block (one pass, no feedback).
    """

    unet: ADMUNet  # set with object.__setattr__: held, not registered

    def __init__(
        self,
        unet: ADMUNet,
        num_classes: int,
        feedback_blocks: Sequence[int] | None = None,
        read_block: int | None = None,
        tokens: int = 16,
        dim: int = 1024,
        heads: int = 8,
        depth: int = 2,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "unet", unet)  # bypasses nn.Module registration on purpose (see above)
        unet.eval().requires_grad_(False)
        blocks = default_feedback_blocks(unet) if feedback_blocks is None else feedback_blocks
        self.feedback_blocks = sorted({unet.block_info(b).number for b in blocks})
        self.read_block = unet.block_info(default_read_block(unet) if read_block is None else read_block).number
        if tokens < 1:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        self.tokens = int(tokens)
        # The head first: under one seed it starts with the same weights whatever the feedback, so DifFeed and
        # its no-feedback baseline are paired from the first step.
        info = unet.block_info(self.read_block)
        side = min(self.tokens, info.resolution)
        self.head = AttentionPoolHead(
            (info.channels, side, side), num_classes, dim=dim, heads=heads, depth=depth, final_norm=final_norm
        )
        self.partners: dict[int, int] = {}
        layers = {}
        for b in self.feedback_blocks:
            p = skip_partner(unet, b)
            src, dst = unet.block_info(b), unet.block_info(p)
            if src.resolution != dst.resolution:
                raise ValueError(
                    f"feedback block {b} ({src.resolution}x{src.resolution}) and its partner {p} "
                    f"({dst.resolution}x{dst.resolution}) differ in resolution"
                )
            if p >= self.read_block:
                raise ValueError(
                    f"feedback block {b} feeds block {p}, which is not before the read block {self.read_block}"
                )
            self.partners[b] = p
            layers[str(b)] = _feedback_layer(src.channels, dst.channels)
        self.feedback = nn.ModuleDict(layers)

    def train(self, mode: bool = True) -> DifFeed:
        super().train(mode)
        self.unet.eval()  # dropout (LSUN models) stays off whatever the head's mode
        return self

    def additions(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int | str, torch.Tensor]:
        """Pass 1 (no gradient) and the feedback layers: {encoder block: tensor to add in pass 2}."""
        if not self.feedback_blocks:
            return {}
        with torch.no_grad():
            decoded = self.unet.features(x_t, t, self.feedback_blocks)
        return {self.partners[b]: self.feedback[str(b)](decoded[b]) for b in self.feedback_blocks}

    def read(
        self, x_t: torch.Tensor, t: torch.Tensor, additions: Mapping[int | str, torch.Tensor] | None
    ) -> torch.Tensor:
        """Pass 2's read-block map, average-pooled to at most tokens x tokens."""
        if additions:
            h = self.unet.features(x_t, t, [self.read_block], additions=additions)[self.read_block]
        else:
            with torch.no_grad():  # nothing before the head trains: keep no graph
                h = self.unet.features(x_t, t, [self.read_block])[self.read_block]
        if h.shape[-1] > self.tokens or h.shape[-2] > self.tokens:
            h = F.adaptive_avg_pool2d(h, (min(self.tokens, h.shape[-2]), min(self.tokens, h.shape[-1])))
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.read(x_t, t, self.additions(x_t, t)))

    def describe(self) -> dict[str, Any]:
        return {
            "feedback_blocks": self.feedback_blocks,
            "skip_partners": {str(b): p for b, p in self.partners.items()},
            "read_block": self.read_block,
            "tokens": self.tokens,
            "feedback_parameters": sum(p.numel() for p in self.feedback.parameters()),
            "head_parameters": sum(p.numel() for p in self.head.parameters()),
        }


def activation_bytes_per_sample(model: DifFeed, t: int = 150) -> int:
    """Bytes autograd saves for backward, per sample, in one training forward (shapes only, on the meta device).

    The U-Net's weights are not copied: a meta twin of the same configuration runs with meta copies of the
    trainable layers. This is the part of a step's memory that grows with the micro-batch.
    """
    with torch.device("meta"):
        twin_unet = ADMUNet(model.unet.config)
        twin = DifFeed(
            twin_unet,
            model.head.classifier.out_features,
            model.feedback_blocks,
            model.read_block,
            model.tokens,
            dim=model.head.classifier.in_features,
            heads=_heads_of(model),
            depth=len(model.head.encoder.blocks),
        )
    size = model.unet.config.image_size
    x = torch.zeros(1, model.unet.config.in_channels, size, size, device="meta")
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Weights are not activations; a tensor several ops save is stored once (the graph keeps it alive,
        # so its id is unique during the forward).
        if not isinstance(tensor, nn.Parameter):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = twin.train()(x, torch.full((1,), int(t), device="meta"))
    del logits
    return sum(seen.values())


def _heads_of(model: DifFeed) -> int:
    blocks = model.head.encoder.blocks
    return cast(TransformerBlock, blocks[0]).attn.heads if len(blocks) else 1
