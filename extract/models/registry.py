"""From a spec's model section to a ready network: presets, embedded weights, checkpoints, provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from extract.models.adm import PRESETS, ADMUNet, config_from_flags
from extract.models.checkpoints import load_checkpoint

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


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path | None:
    if checkpoint is None:
        return None
    text = str(checkpoint)
    if text.startswith(EMBEDDED_PREFIX):
        return embedded_checkpoint(text.removeprefix(EMBEDDED_PREFIX))
    return Path(text).expanduser()


def build_model(
    preset: str | None = None,
    flags: dict[str, Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    init_seed: int = 0,
) -> tuple[ADMUNet, dict[str, Any]]:
    """The network in eval mode and a provenance record (flags, checkpoint path and sha256).

    Without a checkpoint the weights are random, drawn from `init_seed`: the random-weight baseline.
    """
    resolved = resolve_flags(preset, flags)
    path = resolve_checkpoint(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = ADMUNet.from_flags(**resolved)
    record: dict[str, Any] = {
        "preset": preset,
        "flags": model.config.to_flags(),
        "checkpoint": None,
        "checkpoint_sha256": None,
        "init": "checkpoint" if path else f"random(seed={init_seed})",
    }
    if path is not None:
        record["checkpoint"] = str(checkpoint)
        record["checkpoint_sha256"] = load_checkpoint(model, path)
    return model.eval().requires_grad_(False), record
