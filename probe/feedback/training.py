"""DifFeed's training loop: fresh seeded noise per epoch, micro-batches sized to memory, selection on
validation, and checkpoints that resume exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from extract.diffusion import NoiseSchedule, seeded_noise
from extract.progress import progress_bar
from probe.budget import default_memory_budget
from probe.feedback.images import ImageSet
from probe.feedback.network import DifFeed, activation_bytes_per_sample
from probe.head_results import EPOCHS_COUNTED_FROM
from probe.recipe import FeedbackRecipe

CHECKPOINT_FORMAT = "diffbank-difffeed-checkpoint/1"
EVAL_DRAW = 0

log = logging.getLogger("probe.feedback")


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 15, int(epoch)])).permutation(n)


def _noised(
    data: ImageSet,
    positions: np.ndarray,
    schedule: NoiseSchedule,
    recipe: FeedbackRecipe,
    draw: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = data.images(positions)
    noise = seeded_noise(recipe.seed, data.keys[positions].tolist(), recipe.t, draw, x0.shape[1:])
    t = torch.full((len(positions),), recipe.t, dtype=torch.long)
    return schedule.q_sample(x0, t, noise).to(device), t.to(device)


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return default_memory_budget(0.25)
    return int(available * 0.5)


def auto_micro_batch(model: DifFeed, recipe: FeedbackRecipe, device: torch.device) -> int:
    """The largest micro-batch (<= batch_size) whose saved activations, with a 2x margin, fit the free memory."""
    per_sample = max(1, activation_bytes_per_sample(model, recipe.t))
    return max(1, min(recipe.batch_size, _memory_budget(device) // (2 * per_sample)))


def _evaluate(
    model: DifFeed, data: ImageSet, schedule: NoiseSchedule, recipe: FeedbackRecipe, batch: int, device: torch.device
) -> tuple[float, float, np.ndarray]:
    """(accuracy, mean loss, predictions) with the fixed evaluation noise."""
    model.eval()
    preds = np.empty(len(data), dtype=np.int64)
    loss = 0.0
    with torch.no_grad():
        for lo in range(0, len(data), batch):
            pos = np.arange(lo, min(len(data), lo + batch))
            x_t, t = _noised(data, pos, schedule, recipe, EVAL_DRAW, device)
            logits = model(x_t, t).float()
            y = torch.as_tensor(data.labels[pos], device=device)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            preds[pos] = logits.argmax(1).cpu().numpy()
    acc = float(np.mean(preds == data.labels)) if len(data) else math.nan
    return acc, loss / max(1, len(data)), preds


def _clone(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _save_state(
    directory: Path,
    model: DifFeed,
    best: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
) -> None:
    """Atomic: the tensors land under a new name, then state.json (the commit point) names them."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _clone(model.state_dict()).items()}
    if best is not None:
        tensors.update({f"best.{k}": v.contiguous() for k, v in best.items()})
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for name, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = v.detach().cpu().contiguous().clone()
    name = f"state-{meta['epochs_done']:04d}.safetensors"
    save_file(tensors, str(directory / (name + ".tmp")), metadata={"format": CHECKPOINT_FORMAT})
    os.replace(directory / (name + ".tmp"), directory / name)
    record = {
        **meta,
        "format": CHECKPOINT_FORMAT,
        "tensors": name,
        "optimizer_param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
    }
    (directory / "state.json.tmp").write_text(json.dumps(record, indent=1))
    os.replace(directory / "state.json.tmp", directory / "state.json")
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _resumable(config: Mapping[str, Any]) -> dict[str, Any]:
    """What must match to resume: all of it but the epoch count, so a finished run can be trained on."""
    return {**config, "recipe": {k: v for k, v in config["recipe"].items() if k != "epochs"}}


def _load_state(
    directory: Path,
    model: DifFeed,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    meta = json.loads((directory / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / 'state.json'} is not a {CHECKPOINT_FORMAT} checkpoint")
    for key, value in _resumable(config).items():
        if json.loads(json.dumps(value)) != _resumable(meta["config"]).get(key):
            raise ValueError(
                f"cannot resume from {directory}: {key} differs (checkpoint {meta['config'].get(key)!r}, now {value!r}); "
                f"start afresh (--restart) or use another --out"
            )
    tensors = load_file(str(directory / meta["tensors"]))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    state: dict[int, dict[str, Any]] = {}
    for key, v in part("optim.").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    best = part("best.") or None
    return meta, best


def _accumulate(
    model: DifFeed,
    data: ImageSet,
    batch: np.ndarray,
    micro: int,
    schedule: NoiseSchedule,
    recipe: FeedbackRecipe,
    epoch: int,
    device: torch.device,
) -> tuple[float, int]:
    """Gradients of one batch's mean loss, accumulated micro-batch by micro-batch: (summed loss, correct)."""
    for p in model.parameters():
        p.grad = None
    loss_sum, correct = 0.0, 0
    for lo in range(0, len(batch), micro):
        pos = batch[lo : lo + micro]
        x_t, t = _noised(data, pos, schedule, recipe, draw=epoch, device=device)
        y = torch.as_tensor(data.labels[pos], device=device)
        logits = model(x_t, t).float()
        # Summed over the micro-batch and divided by the whole batch: the accumulated gradient is the batch mean.
        loss = F.cross_entropy(logits, y, reduction="sum") / len(batch)
        loss.backward()
        loss_sum += float(loss.detach()) * len(batch)
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum, correct


def train_feedback(
    model: DifFeed,
    schedule: NoiseSchedule,
    train: ImageSet,
    val: ImageSet,
    test: ImageSet | None = None,
    *,
    recipe: FeedbackRecipe = FeedbackRecipe(),
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    micro_batch: int | None = None,
    eval_batch_size: int | None = None,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train `model`'s feedback layers and head; select the epoch on `val`, score `test`; return results JSON.

    `micro_batch=None` sizes micro-batches to the free memory (`auto_micro_batch`); each micro-batch is one
    BatchNorm batch, so the micro-batch size is part of the recorded configuration. With `out_dir`, a checkpoint
    is written after every epoch (`out_dir/checkpoint/`) and a rerun resumes from it (`resume=False` starts
    afresh); results.json and the selected weights (weights.safetensors) are written at the end.
    `max_steps` stops after that many optimiser steps (tests and memory measurements).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"train ({len(train)} samples) and val ({len(val)} samples) must not be empty")
    schedule.check_timesteps([recipe.t])
    model.unet.to(dev)
    model.to(dev)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "checkpoint" if out is not None else None
    saved = ckpt / "state.json" if ckpt is not None and resume else None
    if micro_batch:
        micro = int(micro_batch)
    elif saved is not None and saved.is_file():
        micro = int(json.loads(saved.read_text())["config"]["micro_batch"])  # a resume keeps the BatchNorm batches
    else:
        micro = auto_micro_batch(model, recipe, dev)
    micro = min(micro, recipe.batch_size)
    eval_batch = int(eval_batch_size or max(micro, 1))
    config = {
        "method": "difffeed" if model.feedback_blocks else "attention (live U-Net features)",
        "recipe": dataclasses.asdict(recipe),
        "model": model.describe(),
        "micro_batch": micro,
        "train": train.digest(),
        "val": val.digest(),
    }
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_acc, best_loss = -1, -math.inf, math.inf
    start_epoch = 0
    if ckpt is not None and (ckpt / "state.json").is_file():
        if resume:
            meta, best_state = _load_state(ckpt, model, optimizer, scheduler, config, dev)
            start_epoch, history = int(meta["epochs_done"]), meta["history"]
            best_epoch, best_acc, best_loss = meta["best_epoch"], meta["best_val_accuracy"], meta["best_val_loss"]
            log.info("resuming from %s after epoch %d", ckpt, start_epoch)
        else:
            shutil.rmtree(ckpt)
    steps = 0
    started = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        order = _order(len(train), recipe.seed, epoch)
        seen, correct, loss_sum = 0, 0, 0.0
        bar = progress_bar(
            total=len(order),
            desc=f"{'difffeed' if model.feedback_blocks else 'attention'} epoch {epoch + 1}/{recipe.epochs}",
            unit="img",
            enabled=progress,
            leave=False,
        )
        for lo in range(0, len(order), recipe.batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            batch = order[lo : lo + recipe.batch_size]
            buffers = _clone(dict(model.named_buffers()))
            while True:
                try:
                    batch_loss, batch_correct = _accumulate(model, train, batch, micro, schedule, recipe, epoch, dev)
                    break
                except torch.cuda.OutOfMemoryError:
                    if micro == 1:
                        raise
                    # Undo the partial batch (BatchNorm statistics included) and retry it in smaller pieces.
                    with torch.no_grad():
                        for name, buf in model.named_buffers():
                            buf.copy_(buffers[name])
                    micro = max(1, micro // 2)
                    log.warning("out of memory: micro-batch now %d", micro)
                    torch.cuda.empty_cache()
            optimizer.step()
            steps += 1
            loss_sum += batch_loss
            correct += batch_correct
            seen += len(batch)
            bar.update(len(batch))
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        epoch_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_acc, val_loss, _ = _evaluate(model, val, schedule, recipe, eval_batch, dev)
        row = {
            "epoch": epoch + 1,
            "lr": epoch_lr,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_accuracy": val_acc,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss):
            best_epoch, best_acc, best_loss = epoch + 1, val_acc, val_loss
            best_state = _clone(model.state_dict())
        if progress:
            log.info(
                "epoch %d/%d: train loss %.4f, val top-1 %.2f%%",
                epoch + 1,
                recipe.epochs,
                row["train_loss"],
                100 * val_acc,
            )
        if max_steps is not None and steps >= max_steps:
            break
        config["micro_batch"] = micro  # an out-of-memory retry may have lowered it; a resume keeps the lower one
        if ckpt is not None:
            _save_state(
                ckpt,
                model,
                best_state,
                optimizer,
                scheduler,
                {
                    "config": config,
                    "epochs_done": epoch + 1,
                    "history": history,
                    "best_epoch": best_epoch,
                    "best_val_accuracy": best_acc,
                    "best_val_loss": best_loss,
                },
            )
    if best_state is not None:
        model.load_state_dict(best_state)
    results: dict[str, Any] = {
        **config,
        "device": str(dev),
        "selection": "epoch with the best validation top-1 (ties: lower validation loss)",
        "noise": f"training epoch e uses draw e - 1, evaluation draw {EVAL_DRAW}; seeded per (seed, sample, t, draw)",
        "num_train": len(train),
        "num_val": len(val),
        "num_test": len(test) if test is not None else 0,
        "history": history,
        "best_epoch": best_epoch,
        "epochs_counted_from": EPOCHS_COUNTED_FROM,
        "val_accuracy": best_acc,
        "train_seconds": time.perf_counter() - started,
    }
    if test is not None and len(test):
        acc, loss, preds = _evaluate(model, test, schedule, recipe, eval_batch, dev)
        results.update(test_accuracy=acc, test_loss=loss, test_predictions=preds.tolist())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in _clone(model.state_dict()).items()}, str(out / "weights.safetensors.tmp")
        )
        os.replace(out / "weights.safetensors.tmp", out / "weights.safetensors")
        (out / "results.json.tmp").write_text(json.dumps(results, indent=1))
        os.replace(out / "results.json.tmp", out / "results.json")
    return results
