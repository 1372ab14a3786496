"""The U-Net's tappable blocks, computed from its configuration without building a module.

Validation needs every block's number, module name, channels and resolution (and to know whether the
flags describe a network at all) before any weights exist; this walks the same encoder / middle /
decoder recipe as `ADMUNet.__init__` on plain integers. tests/test_blocks.py holds it equal to
`ADMUNet(config).blocks` for every preset.
"""

from __future__ import annotations

from extract.models.adm import ADMConfig, BlockInfo

GROUPS = 32  # GroupNorm32: every normalised width must split into 32 groups


def block_table(config: ADMConfig) -> tuple[BlockInfo, ...]:
    """`BlockInfo(number, module, channels, resolution)` of every block, at the config's image size.

    Raises ValueError for a configuration that `ADMUNet` would refuse to build.
    """
    cfg, mc = config, config.model_channels

    def norm(ch: int) -> None:
        if ch % GROUPS:
            raise ValueError(f"{ch} channels cannot be normalised in {GROUPS} groups (GroupNorm32)")

    def res(ch_in: int, ch_out: int) -> None:
        norm(ch_in)
        norm(ch_out)

    def attn(ch: int) -> None:
        if cfg.num_head_channels != -1 and ch % cfg.num_head_channels:
            raise ValueError(f"{ch} channels are not divisible by num_head_channels={cfg.num_head_channels}")
        norm(ch)

    ch = int(cfg.channel_mult[0] * mc)
    names = ["input_blocks.0"]
    shapes = [(ch, cfg.image_size)]
    skip_chans, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            res(ch, int(mult * mc))
            ch = int(mult * mc)
            if ds in cfg.attention_ds:
                attn(ch)
            skip_chans.append(ch)
            names.append(f"input_blocks.{len(names)}")
            shapes.append((ch, cfg.image_size // ds))
        if level != len(cfg.channel_mult) - 1:
            res(ch, ch)
            skip_chans.append(ch)
            ds *= 2
            names.append(f"input_blocks.{len(names)}")
            shapes.append((ch, cfg.image_size // ds))

    res(ch, ch)
    attn(ch)
    names.append("middle_block")
    shapes.append((ch, cfg.image_size // ds))

    outputs = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            res(ch + skip_chans.pop(), int(mc * mult))
            ch = int(mc * mult)
            if ds in cfg.attention_ds:
                attn(ch)
            if level and i == cfg.num_res_blocks:
                res(ch, ch)
                ds //= 2
            names.append(f"output_blocks.{outputs}")
            outputs += 1
            shapes.append((ch, cfg.image_size // ds))
    norm(ch)  # the output head's normalisation

    return tuple(BlockInfo(n + 1, name, c, r) for n, (name, (c, r)) in enumerate(zip(names, shapes)))
