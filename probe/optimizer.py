"""The optimizer and learning-rate schedule a `probe.recipe.Recipe` gives a training run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from probe.recipe import Recipe

__all__ = ["build_optimizer"]


def build_optimizer(
    heads: Sequence[nn.Module], lrs: Sequence[float], recipe: Recipe, weight_decays: Sequence[float] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and schedule of a run: the recipe's SGD or AdamW with one parameter group per head (its
    lr, and its weight decay where `weight_decays` gives one per head; else the recipe's), one schedule over
    all (StepLR, or warm-up and cosine), stepped once per epoch."""
    groups: list[dict[str, Any]] = [{"params": list(h.parameters()), "lr": float(lr)} for h, lr in zip(heads, lrs)]
    if weight_decays is not None:
        for group, wd in zip(groups, weight_decays, strict=True):
            group["weight_decay"] = float(wd)
    optimizer: torch.optim.Optimizer
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
