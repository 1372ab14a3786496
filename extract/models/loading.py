"""One entry for every model family: a spec's `model:` section to (network, provenance record).

Every network returned has `features(x_t, t, blocks=[...], y=None) -> {block: tensor}`, numbered blocks
(`.blocks`, `block_info`), and runs nothing past the deepest requested block.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from extract.models.adm import ADMUNet
from extract.models.checkpoints import sha256_file
from extract.models.registry import EMBEDDED_PREFIX, build_model, resolve_checkpoint, resolve_flags

if TYPE_CHECKING:  # the module is imported where a diffusers model is built (below)
    from extract.models.diffusers_unet import DiffusersUNet

FAMILIES = ("adm", "diffusers")


def _family(section: Mapping[str, Any]) -> str:
    family = section.get("family") or "adm"
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _checkpoint(section: Mapping[str, Any], base_dir: str | os.PathLike | None) -> Path | None:
    """An ADM checkpoint as a filesystem path: embedded names resolved, relative paths from base_dir."""
    text = section.get("checkpoint")
    if text is None:
        return None
    if str(text).startswith(EMBEDDED_PREFIX):
        return resolve_checkpoint(text)
    p = Path(text).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def load_model(
    section: Mapping[str, Any], base_dir: str | os.PathLike | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network in eval mode (float32, CPU) and its provenance record.

    `section` is a spec's model section: `{family: diffusers, path: DIR}`, or ADM's preset / flags /
    checkpoint / init_seed (family adm, the default). Relative paths are taken from `base_dir`.
    """
    if _family(section) == "diffusers":
        from extract.models.diffusers_unet import DiffusersUNet

        return DiffusersUNet.from_pretrained(section["path"], base_dir)
    path = _checkpoint(section, base_dir)
    return build_model(
        section.get("preset"),
        dict(section.get("flags") or {}),
        None if path is None else str(path),
        int(section.get("init_seed") or 0),
    )


def describe_model(section: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """`load_model`'s provenance record without building the network (weights are hashed, not loaded)."""
    if _family(section) == "diffusers":
        from extract.models.diffusers_unet import describe

        return describe(section["path"], base_dir)
    path = _checkpoint(section, base_dir)
    return {
        "preset": section.get("preset"),
        "flags": dict(section.get("flags") or {}),
        "checkpoint": section.get("checkpoint"),
        "checkpoint_sha256": sha256_file(path) if path is not None else None,
        "init": "checkpoint" if path is not None else f"random(seed={int(section.get('init_seed') or 0)})",
    }


def meta_network(
    section: Mapping[str, Any], base_dir: str | os.PathLike | None = None
) -> tuple[ADMUNet | DiffusersUNet, int]:
    """The section's network on the meta device (shapes only: no weights read, no memory) and its native
    image size."""
    if _family(section) == "diffusers":
        from extract.models.diffusers_unet import DiffusersUNet, build_unet, locate, read_unet_config

        config = read_unet_config(locate(section["path"], base_dir)[0])
        return DiffusersUNet(build_unet(config)), int(config["sample_size"])
    flags = resolve_flags(section.get("preset"), dict(section.get("flags") or {}))
    with torch.device("meta"):
        network = ADMUNet.from_flags(**flags)
    return network, network.config.image_size


def section_for(name: str, base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A model section from one word: a diffusers directory, else an ADM preset or 'embedded:<name>'."""
    p = Path(name).expanduser()
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    if p.is_dir() or "/" in name or os.sep in name:
        return {"family": "diffusers", "path": name}
    return {"preset": name}
