"""extract/models/config.py: the block table from the flags equals the built network's."""

from __future__ import annotations

import pytest
import torch

from extract.models.adm import ADMUNet
from extract.models.config import PRESETS, block_table, config_from_flags, resolve_flags

# The byte-identity reference's network (tests/data/reference/spec.yaml), with updown ResBlocks.
TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=16,
    resblock_updown=True,
)


def _embedded() -> dict:
    return resolve_flags("embedded:fmnist32", None)


@pytest.mark.parametrize("flags", [*PRESETS.values(), TINY, _embedded()], ids=[*PRESETS, "tiny", "embedded:fmnist32"])
def test_block_table_equals_the_built_networks_outputs(flags):
    """Names and shapes of the table against what each block of the built network really outputs."""
    with torch.device("meta"):
        model = ADMUNet.from_flags(**flags)
        cfg = model.config
        x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
        table = block_table(config_from_flags(**flags))
        outputs = model.features(x, t, [b.number for b in table], y=y)
    names = dict(model.named_modules())
    for info in table:
        assert info.module in names
        assert tuple(outputs[info.number].shape[1:]) == (info.channels, info.resolution, info.resolution), info


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_head_channels": 24}, "not divisible by num_head_channels=24"),
        ({"num_channels": 48}, "cannot be normalised in 32 groups"),
    ],
)
def test_block_table_refuses_what_the_network_refuses(change, message):
    flags = {**TINY, **change}
    with pytest.raises(ValueError, match=message):
        block_table(config_from_flags(**flags))
    with pytest.raises(ValueError), torch.device("meta"):
        ADMUNet.from_flags(**flags)
