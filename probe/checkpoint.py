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
# The earlier trainer (one optimizer and scheduler per head); its runs still resume.
_LEGACY_FORMAT = "diffbank.probe.train/1"


def save_checkpoint(
    directory: Path,
    runs: list[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    epochs_done: int,
) -> None:
    """Write the state after `epochs_done` epochs; `runs` are the trainer's per-head records."""
    tensors, optim_record = split_optimizer_state(optimizer.state_dict())
    heads_meta = []
    for i, r in enumerate(runs):
        tensors.update({f"h{i}.model.{n}": t for n, t in r.head.state_dict().items()})
        tensors.update({f"h{i}.kept.{n}": t for n, t in (r.kept_state or {}).items()})
        heads_meta.append(
            {
                "key": repr(r.key),
                "kept_epoch": r.kept_epoch,
                "kept_val": list(r.kept_val),
                "diverged": r.diverged,
                "frozen_lr": r.frozen_lr,
                "history": r.history,
            }
        )
    save_state(
        directory,
        tensors,
        {
            "format": CHECKPOINT_FORMAT,
            "epochs_done": epochs_done,
            "config": config,
            "heads": heads_meta,
            "optimizer": optim_record,
            "scheduler": scheduler.state_dict(),
        },
        step=epochs_done,
    )


def load_checkpoint(
    directory: Path,
    runs: list[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    device: torch.device,
) -> int:
    """Restore the state into `runs`, the optimizer and the scheduler; the number of epochs done.

    A checkpoint made with other settings (`config`: heads, inputs, lrs, recipe) is refused.
    """
    tensors, meta = load_state(directory)
    if meta.get("format") == _LEGACY_FORMAT:
        tensors, meta = _from_legacy(tensors, meta)
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
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        r.head.load_state_dict(part(f"h{i}.model."))
        kept = part(f"h{i}.kept.")
        r.kept_state = {k: v.to(device) for k, v in kept.items()} if kept else None
        r.kept_epoch, r.kept_val = hm["kept_epoch"], tuple(hm["kept_val"])
        r.diverged, r.frozen_lr, r.history = bool(hm["diverged"]), hm["frozen_lr"], hm["history"]
    optimizer.load_state_dict(join_optimizer_state(tensors, meta["optimizer"], device=device))
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["epochs_done"])


def _from_legacy(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A `diffbank.probe.train/1` state as this format: per-head optimizers and schedulers become one of each.

    Parameter ids are renumbered head after head (the order the trainer builds its parameter groups in);
    the schedulers of the heads still training agree on the step count, and each keeps its own lr.
    """
    out: dict[str, torch.Tensor] = {}
    groups, scalars, heads = [], {}, []
    offset = 0
    for i, hm in enumerate(meta["heads"]):
        for k, v in tensors.items():
            if k.startswith(f"h{i}.model."):
                out[k] = v
            elif k.startswith(f"h{i}.best."):
                out[f"h{i}.kept." + k[len(f"h{i}.best.") :]] = v
            elif k.startswith(f"h{i}.optim."):
                pid, name = k[len(f"h{i}.optim.") :].split(".", 1)
                out[f"optim.{offset + int(pid)}.{name}"] = v
        (group,) = hm["optimizer"]["param_groups"]
        for pid, values in hm["optimizer"]["state_scalars"].items():
            scalars[str(offset + int(pid))] = values
        groups.append({**group, "params": [offset + p for p in group["params"]]})
        offset += len(group["params"])
        heads.append(
            {
                "key": hm["key"],
                "kept_epoch": hm["best_epoch"],
                "kept_val": [hm["best_val_accuracy"], hm["best_val_loss"]],
                "diverged": hm["diverged"],
                "frozen_lr": hm["history"][-1]["lr"] if hm["diverged"] and hm["history"] else None,
                "history": hm["history"],
            }
        )
    running = [hm["scheduler"] for hm in meta["heads"] if not hm["diverged"]] or [meta["heads"][0]["scheduler"]]
    scheduler = {
        **running[0],
        "base_lrs": [hm["scheduler"]["base_lrs"][0] for hm in meta["heads"]],
        "_last_lr": [hm["scheduler"]["_last_lr"][0] for hm in meta["heads"]],
    }
    record = {
        "format": CHECKPOINT_FORMAT,
        "epochs_done": meta["epochs_done"],
        "config": {**meta["config"], "keep": "best"},
        "heads": heads,
        "optimizer": {"param_groups": groups, "state_scalars": scalars},
        "scheduler": scheduler,
    }
    return out, record
