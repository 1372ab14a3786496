"""What reaching each tap costs: FLOPs of one image's pass up to a tap against the full forward.

Counted by torch's FlopCounterMode on the meta device (shapes only: no weights, no memory), through the
network's own `features`, so the count is what early exit really runs: nothing past the tap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from extract.models.loading import meta_network

if TYPE_CHECKING:  # the network types only; `meta_network` builds them
    from extract.models.adm import ADMUNet
    from extract.models.diffusers_unet import DiffusersUNet


@dataclasses.dataclass(frozen=True)
class TapCost:
    number: int
    module: str
    channels: int
    resolution: int  # map side at the image size asked for
    flops: int  # one image's pass up to and including this tap
    share: float  # flops / the full forward's

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _counted(run: Any) -> tuple[int, Any]:
    """FLOPs of `run()` and its result."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        result = run()
    return int(counter.get_total_flops()), result


def _class_conditional(network: nn.Module) -> bool:
    own = getattr(network, "is_class_conditional", None)  # DiffusersUNet; ADMUNet says it in its config
    return bool(own) if own is not None else getattr(network.config, "num_classes", None) is not None


def tap_costs(network: ADMUNet | DiffusersUNet, image_size: int) -> list[TapCost]:
    """Every tap of `network` (a meta-device or real network with `.blocks` and `features`) with the FLOPs
    of one image's pass up to it, at `image_size`."""
    device = next(network.parameters()).device
    x = torch.zeros(1, network.config.in_channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if _class_conditional(network) else None
    full, _ = _counted(lambda: network(x, t, y))
    out = []
    for info in network.blocks:
        flops, h = _counted(lambda n=info.number: network.features(x, t, [n], y=y)[n])
        out.append(TapCost(info.number, info.module, int(h.shape[1]), int(h.shape[-1]), flops, flops / full))
    return out


def model_tap_costs(
    section: Mapping[str, Any], image_size: int | None = None, base_dir: str | os.PathLike | None = None
) -> tuple[list[TapCost], int]:
    """`tap_costs` of a spec's model section (nothing loaded) and the image size used (default: the model's)."""
    network, native = meta_network(section, base_dir)
    size = int(image_size or native)
    return tap_costs(network, size), size
