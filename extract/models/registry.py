"""From a spec's model section to a ready network: its weights (a checkpoint, embedded or random) and provenance."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from extract.models.adm import ADMUNet
from extract.models.checkpoints import load_checkpoint
from extract.models.config import EMBEDDED_PREFIX, embedded_checkpoint, resolve_flags


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
