"""The trainer's checkpoints: every head's weights and kept weights, the optimizer and the scheduler, after
every epoch, as an `extract.statedir` state directory (safetensors + JSON, atomic; nothing unpickled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from extract.provenance import to_jsonable
from extract.statedir import join_optimizer_state, load_state, save_state, split_optimizer_state

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "diffbank.probe.trainer/2"


def save_checkpoint(directory: Path, runs: list[Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                    config: dict[str, Any], epochs_done: int) -> None:
    """Write the state after `epochs_done` epochs; `runs` are the trainer's per-head records."""
    tensors, optim_record = split_optimizer_state(optimizer.state_dict())
    heads_meta = []
    for i, r in enumerate(runs):
        tensors.update({f"h{i}.model.{n}": t for n, t in r.head.state_dict().items()})
        tensors.update({f"h{i}.kept.{n}": t for n, t in (r.kept_state or {}).items()})
        heads_meta.append({"key": repr(r.key), "kept_epoch": r.kept_epoch, "kept_val": list(r.kept_val),
                           "diverged": r.diverged, "frozen_lr": r.frozen_lr, "history": r.history})
    save_state(directory, tensors, {"format": CHECKPOINT_FORMAT, "epochs_done": epochs_done, "config": config,
                                    "heads": heads_meta, "optimizer": optim_record,
                                    "scheduler": scheduler.state_dict()}, step=epochs_done)


def load_checkpoint(directory: Path, runs: list[Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                    config: dict[str, Any], device: torch.device) -> int:
    """Restore the state into `runs`, the optimizer and the scheduler; the number of epochs done.

    A checkpoint made with other settings (`config`: heads, inputs, lrs, recipe) is refused.
    """
    tensors, meta = load_state(directory)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory} holds a {meta.get('format')!r} checkpoint, not {CHECKPOINT_FORMAT}")
    saved = meta["config"]
    for field in config:
        if to_jsonable(config[field]) != saved.get(field):
            raise ValueError(
                f"cannot resume from {directory}: {field} differs (checkpoint {saved.get(field)!r}, now {config[field]!r})"
            )
    for i, (r, hm) in enumerate(zip(runs, meta["heads"])):
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        r.head.load_state_dict(part(f"h{i}.model."))
        kept = part(f"h{i}.kept.")
        r.kept_state = {k: v.to(device) for k, v in kept.items()} if kept else None
        r.kept_epoch, r.kept_val = hm["kept_epoch"], tuple(hm["kept_val"])
        r.diverged, r.frozen_lr, r.history = bool(hm["diverged"]), hm["frozen_lr"], hm["history"]
    optimizer.load_state_dict(join_optimizer_state(tensors, meta["optimizer"], device=device))
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["epochs_done"])
