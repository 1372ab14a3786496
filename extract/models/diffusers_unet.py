"""diffusers `UNet2DModel` checkpoints as a model family: local loading, taps with early exit, provenance.

A directory is either a UNet's `save_pretrained` folder (config.json + weights) or a pipeline folder with
`unet/` and `scheduler/`. Nothing is fetched: a hub id or a remote URL is refused with a message that
says how to download it. Weights are read with safetensors, or a `.bin` through the weights-only
unpickler (extract.models.checkpoints).

Taps are the model's own module paths (`conv_in`, `down_blocks.1`, `down_blocks.1.resnets.0`,
`down_blocks.1.attentions.0`, `mid_block`, `up_blocks.2.upsamplers.0`, ...), numbered 1.. in the order
their outputs are complete during the forward (a block's number follows its sub-modules'). A tap's
output is the module's hidden states: the first element when it returns a tuple.

`DiffusersUNet.features` walks UNet2DModel.forward (diffusers 0.3x-0.4x, models/unets/unet_2d.py) step
by step with diffusers' own submodules, and returns as soon as the deepest requested tap is complete:
a top-level tap ends the walk after its block; a tap inside a block ends it from a forward hook.
tests/test_diffusers_unet.py holds every tap equal to a hook on diffusers' own forward.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from extract.models.checkpoints import CheckpointError, read_state_dict, sha256_file
from extract.models.config import BlockInfo

if TYPE_CHECKING:  # diffusers is an optional dependency, imported when a model is built (`_import_diffusers`)
    from diffusers.models.unets.unet_2d import UNet2DModel

FAMILY = "diffusers"
UNET_CLASS = "UNet2DModel"
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
# Children of a block that are taps of their own, in diffusers' attribute names.
SUB_TAPS = ("resnets", "attentions", "downsamplers", "upsamplers")
# google/ddpm-cifar10-32's UNet2DModel layout (its config.json): the reference layout of tests and benchmarks.
DDPM_CIFAR10_LAYOUT: dict[str, Any] = {
    "sample_size": 32,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DiffusersModelError(ValueError):
    """A diffusers model directory that cannot be used as asked."""


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ModuleNotFoundError:
        raise DiffusersModelError(
            "model.family diffusers needs the diffusers package: pip install 'diffbank[diffusers]'"
        ) from None
    return diffusers


# ---------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------


def locate(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """(the UNet's folder, the scheduler's folder or None) of a local diffusers directory; a relative
    path is taken from `base_dir` (default: the working directory)."""
    text = os.fspath(path)
    if "://" in text:
        raise DiffusersModelError(
            f"{text!r} is not a local path: diffusers models are loaded from a local directory only"
        )
    p = Path(text).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    if not p.exists():
        if _HUB_ID.match(text) and not text.startswith((".", "~")):
            raise DiffusersModelError(
                f"{text!r} looks like a Hugging Face hub id, and no such local directory exists; diffbank "
                f"never downloads: fetch it first (e.g. `hf download {text} --local-dir DIR`) and give DIR"
            )
        raise DiffusersModelError(f"diffusers model directory {text!r} does not exist (looked at {p.resolve()})")
    if not p.is_dir():
        raise DiffusersModelError(f"{p} is a file; give the directory that save_pretrained wrote")
    if (p / "unet" / "config.json").is_file():
        scheduler = p / "scheduler" / "scheduler_config.json"
        return p / "unet", scheduler.parent if scheduler.is_file() else None
    if (p / "config.json").is_file():
        return p, None
    raise DiffusersModelError(
        f"{p} holds neither config.json (a UNet saved with save_pretrained) nor unet/config.json (a pipeline)"
    )


def read_unet_config(unet_dir: Path) -> dict[str, Any]:
    config = json.loads((unet_dir / "config.json").read_text())
    kind = config.get("_class_name")
    if kind != UNET_CLASS:
        raise DiffusersModelError(
            f"{unet_dir / 'config.json'} describes a {kind}, not a {UNET_CLASS}; diffbank taps text-free "
            f"UNet2DModel networks only"
        )
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise DiffusersModelError(f"sample_size {size} is not square; diffbank feeds square images")
        config["sample_size"] = int(size[0])
    return config


def weights_file(unet_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    if any(unet_dir.glob("*.index.json")):
        raise DiffusersModelError(f"{unet_dir} holds sharded weights; save the UNet unsharded")
    raise DiffusersModelError(f"{unet_dir} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_scheduler_config(scheduler_dir: Path | None) -> dict[str, Any] | None:
    if scheduler_dir is None:
        return None
    return json.loads((scheduler_dir / "scheduler_config.json").read_text())


def describe(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Provenance of a diffusers directory without loading it: family, configs, weights and their sha256."""
    unet_dir, scheduler_dir = locate(path, base_dir)
    config = read_unet_config(unet_dir)
    weights = weights_file(unet_dir)
    return {
        "family": FAMILY,
        "path": os.fspath(path),
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "diffusers_version": config.get("_diffusers_version"),
        "scheduler": read_scheduler_config(scheduler_dir),
        "checkpoint": str(weights),
        "checkpoint_sha256": sha256_file(weights),
        "init": "checkpoint",
    }


def build_unet(config: Mapping[str, Any], device: str | torch.device = "meta") -> UNet2DModel:
    """A UNet2DModel of `config` (on the meta device by default: shapes only, no memory)."""
    diffusers = _import_diffusers()
    with torch.device(device):
        return diffusers.UNet2DModel.from_config(dict(config))


def load_unet(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None
) -> tuple[UNet2DModel, dict[str, Any]]:
    """The UNet of a local diffusers directory in eval mode, float32, and its provenance."""
    record = describe(path, base_dir)
    unet_dir, _ = locate(path, base_dir)
    unet = build_unet(read_unet_config(unet_dir))
    weights = Path(record["checkpoint"])
    try:
        state = read_state_dict(weights)
    except CheckpointError as exc:
        raise DiffusersModelError(str(exc)) from None
    try:
        unet.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    except RuntimeError as exc:
        raise DiffusersModelError(f"{weights} does not match its config.json: {exc}") from None
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:
        raise DiffusersModelError(f"{weights} lacks tensors the model needs: {', '.join(leftover[:5])}")
    return unet.eval().requires_grad_(False), record


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def tap_modules(unet: UNet2DModel) -> dict[str, nn.Module]:
    """Every tap's module by path, in definition order (not yet forward order)."""
    out: dict[str, nn.Module] = {"conv_in": unet.conv_in}
    groups = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        groups.append(("mid_block", unet.mid_block))
    groups += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for path, block in groups:
        out[path] = block
        for kind in SUB_TAPS:
            for j, child in enumerate(getattr(block, kind, None) or ()):
                if child is not None:
                    out[f"{path}.{kind}.{j}"] = child
    return out


def tap_table(unet: UNet2DModel, image_size: int | None = None) -> tuple[BlockInfo, ...]:
    """Every tap numbered in forward order, with its channels and map side at `image_size` (default:
    the model's sample_size), from one pass on the meta device."""
    config = unet.config
    size = int(image_size or config["sample_size"])
    twin = build_unet(config)
    modules = tap_modules(twin)
    done: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, path=path: done.append((path, tuple(_first(out).shape))))
        for path, m in modules.items()
    ]
    try:
        x = torch.zeros(1, config["in_channels"], size, size, device="meta")
        y = torch.zeros(1, dtype=torch.long, device="meta") if twin.class_embedding is not None else None
        with torch.no_grad():
            twin(x, torch.zeros(1, dtype=torch.long, device="meta"), class_labels=y)
    finally:
        for h in hooks:
            h.remove()
    return tuple(BlockInfo(n, path, shape[1], shape[-1]) for n, (path, shape) in enumerate(done, start=1))


class _Stop(Exception):
    """Raised from the deepest tap's hook: nothing after it runs."""


class DiffusersUNet(nn.Module):
    """A UNet2DModel with numbered taps and `features(x_t, t, blocks, y)`, as `ADMUNet` has."""

    family = FAMILY

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet
        self.blocks: tuple[BlockInfo, ...] = tap_table(unet)
        self._modules_by_path = tap_modules(unet)
        # Block paths in walk order, with each top-level tap's ordinal.
        self._top = ["conv_in", *(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))]
        if unet.mid_block is not None:
            self._top.append("mid_block")
        self._top += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, base_dir: str | os.PathLike | None = None
    ) -> tuple[DiffusersUNet, dict[str, Any]]:
        unet, record = load_unet(path, base_dir)
        return cls(unet), record

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def is_class_conditional(self) -> bool:
        return self.unet.class_embedding is not None

    def block_info(self, block: int | str) -> BlockInfo:
        """A tap by its 1-based ordinal (an int or a digit string) or its module path."""
        if isinstance(block, bool) or not isinstance(block, (int, str)):
            raise TypeError(f"tap {block!r}: expected an ordinal or a module path")
        if isinstance(block, str) and not block.isdigit():
            for info in self.blocks:
                if info.module == block:
                    return info
            raise ValueError(
                f"no tap named {block!r}; taps are 1..{self.num_blocks} or module paths such as "
                f"'{self.blocks[0].module}', 'mid_block', '{self.blocks[-1].module}'"
            )
        number = int(block)
        if not 1 <= number <= self.num_blocks:
            raise ValueError(f"tap {number} out of range: this model has taps 1..{self.num_blocks}")
        return self.blocks[number - 1]

    # -- forward -----------------------------------------------------------------------------

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """UNet2DModel.forward's step 1 (time and class embedding), as diffusers computes it."""
        unet = self.unet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            if y is None:
                raise ValueError("this model is class-conditional (num_class_embeds): pass y (class labels)")
            labels = unet.time_proj(y) if unet.config["class_embed_type"] == "timestep" else y
            emb = emb + unet.class_embedding(labels).to(dtype=unet.dtype)
        elif y is not None:
            raise ValueError("this model is unconditional: y must be None")
        return emb

    def _walk(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, last: int, keep: set[int]
    ) -> dict[int, torch.Tensor]:
        unet = self.unet
        kept: dict[int, torch.Tensor] = {}
        number = {info.module: info.number for info in self.blocks}
        if unet.config["center_input_sample"]:
            x = 2 * x - 1.0
        emb = self.embed(x, t, y)

        def done(path: str, h: torch.Tensor) -> bool:
            if number[path] in keep:
                kept[number[path]] = h
            return number[path] == last

        skip_sample: torch.Tensor | None = x
        sample = unet.conv_in(x)
        if done("conv_in", sample):
            return kept
        res_samples: tuple[torch.Tensor, ...] = (sample,)
        for i, block in enumerate(unet.down_blocks):
            with self._inner_taps(f"down_blocks.{i}", last, keep, kept):
                if hasattr(block, "skip_conv"):
                    sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
                else:
                    sample, res = block(hidden_states=sample, temb=emb)
            res_samples += res
            if done(f"down_blocks.{i}", sample):
                return kept
        if unet.mid_block is not None:
            with self._inner_taps("mid_block", last, keep, kept):
                sample = unet.mid_block(sample, emb)
            if done("mid_block", sample):
                return kept
        skip_sample = None
        for i, block in enumerate(unet.up_blocks):
            width = len(cast(nn.ModuleList, block.resnets))  # a ModuleList in every diffusers up block
            res = res_samples[-width:]
            res_samples = res_samples[:-width]
            with self._inner_taps(f"up_blocks.{i}", last, keep, kept):
                if hasattr(block, "skip_conv"):
                    sample, skip_sample = block(sample, res, emb, skip_sample)
                else:
                    sample = block(sample, res, emb)
            if done(f"up_blocks.{i}", sample):
                return kept
        return kept

    def _inner_taps(self, block: str, last: int, keep: set[int], kept: dict[int, torch.Tensor]) -> _InnerTaps:
        wanted = {
            info.number: self._modules_by_path[info.module]
            for info in self.blocks
            if info.module.startswith(block + ".") and (info.number in keep or info.number == last)
        }
        return _InnerTaps(wanted, last, keep, kept)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' own forward: the model's output (the noise prediction of a DDPM model)."""
        return self.unet(x, t, class_labels=y).sample

    def features(
        self, x: torch.Tensor, t: torch.Tensor, blocks: Iterable[int | str], y: torch.Tensor | None = None
    ) -> dict[int | str, torch.Tensor]:
        """Outputs of the requested taps, keyed as requested; nothing past the deepest one runs."""
        requested = list(blocks)
        if not requested:
            raise ValueError("features() needs at least one tap")
        numbers = {b: self.block_info(b).number for b in requested}
        last = max(numbers.values())
        try:
            kept = self._walk(x, t, y, last, set(numbers.values()))
        except _Stop as stop:
            kept = stop.args[0]
        return {b: kept[n] for b, n in numbers.items()}


class _InnerTaps:
    """Forward hooks on the taps inside one block for the duration of its call; the deepest raises _Stop."""

    def __init__(self, wanted: dict[int, nn.Module], last: int, keep: set[int], kept: dict[int, torch.Tensor]):
        self.wanted, self.last, self.keep, self.kept = wanted, last, keep, kept
        self.hooks: list[Any] = []

    def __enter__(self) -> _InnerTaps:
        for number, module in self.wanted.items():
            self.hooks.append(module.register_forward_hook(self._hook(number)))
        return self

    def _hook(self, number: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if number in self.keep:
                self.kept[number] = _first(output)
            if number == self.last:
                raise _Stop(self.kept)

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
