"""An ADM network's configuration, without torch: guided-diffusion's flags, presets and block table.

Everything a spec needs to know about a model before any weights exist lives here: the flag names and
defaults of guided-diffusion's `model_and_diffusion_defaults()`, the released and embedded presets,
the resolved `ADMConfig`, and every tappable block's number, module path, channels and resolution.
Nothing here imports torch, so checking a spec costs no framework start-up.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NUM_CLASSES = 1000  # guided-diffusion's ImageNet label embedding size

# guided-diffusion's `model_and_diffusion_defaults()`, model part, plus the diffusion flags that
# change the network (learn_sigma) or that checkpoints are published with (schedule, steps).
DEFAULT_FLAGS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}
# Flags guided-diffusion's scripts accept that do not change the network; accepted and ignored so a
# command line copied from the model card works.
DIFFUSION_ONLY_FLAGS = {
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
}

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

_RELEASED_COMMON = {
    "diffusion_steps": 1000,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "attention_resolutions": "32,16,8",
    "num_res_blocks": 2,
}
# A 16-pixel, two-level ADM that builds and runs in milliseconds: the test suite's and the benchmarks'
# CPU-mode network (not a released checkpoint's configuration).
TINY_FLAGS: dict[str, Any] = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "8",
    "num_head_channels": 16,
}
PRESETS: dict[str, dict[str, Any]] = {
    "256x256_diffusion_uncond": {
        **_RELEASED_COMMON,
        "image_size": 256,
        "num_channels": 256,
        "num_head_channels": 64,
        "class_cond": False,
    },
    "256x256_diffusion": {
        **_RELEASED_COMMON,
        "image_size": 256,
        "num_channels": 256,
        "num_head_channels": 64,
        "class_cond": True,
    },
    "512x512_diffusion": {
        **_RELEASED_COMMON,
        "image_size": 512,
        "num_channels": 256,
        "num_head_channels": 64,
        "class_cond": True,
    },
    "128x128_diffusion": {
        **_RELEASED_COMMON,
        "image_size": 128,
        "num_channels": 256,
        "num_heads": 4,
        "class_cond": True,
    },
    "64x64_diffusion": {
        **_RELEASED_COMMON,
        "image_size": 64,
        "num_channels": 192,
        "num_res_blocks": 3,
        "num_head_channels": 64,
        "class_cond": True,
        "use_new_attention_order": True,
        "noise_schedule": "cosine",
    },
    **{
        f"lsun_{name}": {
            **_RELEASED_COMMON,
            "image_size": 256,
            "num_channels": 256,
            "num_head_channels": 64,
            "class_cond": False,
            "dropout": 0.1,
        }
        for name in ("bedroom", "cat", "horse")
    },
}


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """The network's shape, resolved from guided-diffusion's flags."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]  # downsample rates (image_size // resolution) that get attention
    channel_mult: tuple[float, ...]
    dropout: float = 0.0
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    @property
    def emb_channels(self) -> int:
        return 4 * self.model_channels

    def to_flags(self) -> dict[str, Any]:
        """guided-diffusion flags that rebuild exactly this network."""
        return {
            "image_size": self.image_size,
            "num_channels": self.model_channels,
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": ",".join(str(self.image_size // d) for d in self.attention_ds),
            "channel_mult": ",".join(_fmt_mult(m) for m in self.channel_mult),
            "num_heads": self.num_heads,
            "num_head_channels": self.num_head_channels,
            "num_heads_upsample": self.num_heads_upsample,
            "use_scale_shift_norm": self.use_scale_shift_norm,
            "resblock_updown": self.resblock_updown,
            "use_new_attention_order": self.use_new_attention_order,
            "learn_sigma": self.out_channels == 2 * self.in_channels,
            "class_cond": self.num_classes is not None,
            "dropout": self.dropout,
        }


def _fmt_mult(m: float) -> str:
    return str(int(m)) if float(m).is_integer() else str(m)


def _parse_ints(value: str | Sequence[int], flag: str) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{flag}={value!r}: expected comma-separated integers") from None
    return tuple(int(v) for v in value)


def config_from_flags(**flags: Any) -> ADMConfig:
    """Resolve guided-diffusion's flags (its names and defaults) into an `ADMConfig`."""
    unknown = sorted(set(flags) - set(DEFAULT_FLAGS) - DIFFUSION_ONLY_FLAGS)
    if unknown:
        raise TypeError(f"unknown ADM flag(s): {', '.join(unknown)}; known flags: {', '.join(sorted(DEFAULT_FLAGS))}")
    f = {**DEFAULT_FLAGS, **{k: v for k, v in flags.items() if k in DEFAULT_FLAGS}}
    if f["use_fp16"]:
        raise ValueError("use_fp16 is not supported: run in float32 and pass an autocast dtype instead")
    image_size = int(f["image_size"])
    mult = f["channel_mult"]
    if mult in ("", None, ()):
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size={image_size}; pass channel_mult, e.g. '1,2,2'")
        channel_mult: tuple[float, ...] = DEFAULT_CHANNEL_MULT[image_size]
    elif isinstance(mult, str):
        try:
            channel_mult = tuple(float(m) if "." in m else int(m) for m in mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult={mult!r}: expected comma-separated numbers") from None
    else:
        channel_mult = tuple(mult)
    resolutions = _parse_ints(f["attention_resolutions"], "attention_resolutions")
    for r in resolutions:
        if r <= 0 or image_size % r:
            raise ValueError(f"attention_resolutions entry {r} does not divide image_size={image_size}")
    in_channels = 3
    return ADMConfig(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=int(f["num_channels"]),
        out_channels=2 * in_channels if f["learn_sigma"] else in_channels,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_ds=tuple(image_size // r for r in resolutions),
        channel_mult=channel_mult,
        dropout=float(f["dropout"]),
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
    )


# ---------------------------------------------------------------------------------------------
# Embedded models: flags and weights shipped inside the package
# ---------------------------------------------------------------------------------------------

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_PREFIX = "embedded:"


def embedded_models() -> list[str]:
    """Names of the models shipped inside the package (weights + card)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def embedded_card(name: str) -> dict[str, Any]:
    """The JSON card of an embedded model: its flags, schedule and training record."""
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no embedded model {name!r}; embedded models: {', '.join(embedded_models()) or 'none'}"
        )
    return json.loads(path.read_text())


def embedded_checkpoint(name: str) -> Path:
    embedded_card(name)  # a clear error for an unknown name
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"embedded model {name!r} has a card but no weights at {path}")
    return path


def resolve_flags(preset: str | None = None, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """guided-diffusion flags of a preset (released checkpoint or embedded model) with overrides."""
    flags = dict(flags or {})
    if preset is None:
        base: dict[str, Any] = {}
    elif preset in PRESETS:
        base = dict(PRESETS[preset])
    elif preset.startswith(EMBEDDED_PREFIX) or preset in embedded_models():
        base = dict(embedded_card(preset.removeprefix(EMBEDDED_PREFIX))["flags"])
    else:
        raise KeyError(
            f"unknown model preset {preset!r}; presets: "
            f"{', '.join(sorted(PRESETS) + [EMBEDDED_PREFIX + n for n in embedded_models()])}"
        )
    resolved = {**base, **flags}
    config_from_flags(**resolved)  # validates names and values now, before any work
    return resolved


# ---------------------------------------------------------------------------------------------
# Blocks: what each tappable block outputs, computed without building a module
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """One tappable block of a network, whatever its family.

    `number` is the 1-based position in the network's walk (the paper's numbering), `module` the dotted
    path of the block's module inside the network, `channels` and `resolution` the shape of its output
    (channels, resolution, resolution) at the configured image size.
    """

    number: int
    module: str
    channels: int
    resolution: int


GROUPS = 32  # GroupNorm32: every normalised width must split into 32 groups


def block_table(config: ADMConfig) -> tuple[BlockInfo, ...]:
    """`BlockInfo(number, module, channels, resolution)` of every block, at the config's image size.

    Walks the same encoder / middle / decoder recipe as `ADMUNet.__init__` on plain integers (the test
    suite holds the two equal for every preset). Raises ValueError for a configuration that `ADMUNet`
    would refuse to build.
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
