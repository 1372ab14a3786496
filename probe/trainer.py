"""One training loop for probe heads: many heads per pass over the data (DINOv2's linear evaluation).

The heads live in one `nn.ModuleDict` and train with ONE optimizer (the recipe's SGD or AdamW) holding a
parameter group per head (each with its own lr and weight decay) and ONE schedule; every batch is read once, each
feature moved to the device once, and the heads' losses are summed into one backward. Heads do not share
parameters, so each head gets exactly the gradient it gets alone, and the optimizer updates every group as it
would a single head's: a head trained with others ends exactly as it does trained alone.

One shortcut, on by default (`fuse=True`): linear heads on one feature share one matmul
(`probe.heads.LinearGroup`); each still gets its own gradient, so only float rounding can differ.

Settings come from a `probe.recipe.Recipe` (validated there); `train`/`train_many` also take its optimiser fields
as keyword overrides (`lr=0.05, momentum=0.9`; a misspelt one is a `TypeError`). `recipe.keep` says which weights
a head keeps: those of its best validation epoch (`"best"`: the highest validation accuracy, the earliest on ties)
or of the last epoch (`"last"`, the paper's protocol, and what any head keeps without a validation stream).

Determinism: the trainer draws no random numbers. A run is fixed by the heads' initial weights
(`probe.heads.seeded_init`) and the stream's seed. Checkpoints (`checkpoint_dir`, `probe.checkpoint`) are
written after every epoch; `resume=True` continues after the last completed epoch and ends
with the same weights as an uninterrupted run. Status goes to `logging` (one line per epoch) and a tqdm bar.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from extract.progress import progress_bar
from extract.statedir import has_state
from probe.checkpoint import load_checkpoint, save_checkpoint
from probe.evaluation import InputSpec, evaluate, feature_names, fusable_groups, gather
from probe.head_results import HeadResult, SweepResult, select_heads, shown_epoch
from probe.heads import LinearGroup
from probe.optimizer import build_optimizer
from probe.recipe import ProbeConfigError, Recipe, check_lr
from probe.stream import BatchStream

__all__ = ["train", "train_many"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _Head:
    """Per-head bookkeeping: which weights to keep, the history, divergence."""

    def __init__(self, key: Hashable, head: nn.Module, spec: InputSpec, lr: float, group: int) -> None:
        self.key, self.head, self.spec, self.lr, self.group = key, head, spec, float(lr), group
        self.needs_pairs = _has_batchnorm(head)
        self.kept_epoch: int | None = None
        self.kept_val: tuple[float | None, float | None] = (None, None)
        self.kept_state: dict[str, torch.Tensor] | None = None
        self.diverged = False
        # A diverged head is no longer stepped; its history keeps the lr it last trained with.
        self.frozen_lr: float | None = None
        self.history: list[dict[str, float | None]] = []


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------- training


def _resolve_single_input(stream: BatchStream) -> str:
    for xs, _ in stream:
        if len(xs) != 1:
            raise ValueError(
                f"the stream carries features {sorted(xs)}; pass input=<feature name> to say which one the head reads"
            )
        return next(iter(xs))
    raise ValueError("training stream yielded no samples")


def train(
    head: nn.Module,
    train_stream: BatchStream,
    val_stream: BatchStream | None = None,
    test_stream: BatchStream | None = None,
    *,
    input: InputSpec | None = None,
    recipe: Recipe | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, Mapping[str, dict[str, float | None]]], None] | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    step_size: int | None = None,
    gamma: float | None = None,
    keep: str | None = None,
) -> HeadResult:
    """Train one head (see `train_many`; this is the one-head case). `input=None`: the stream's only feature.

    `lr`, `epochs`, `momentum`, `weight_decay`, `step_size`, `gamma` and `keep` override fields of `recipe`
    (default `Recipe()`); None leaves the recipe's.
    """
    recipe = (recipe or Recipe()).replace(
        lr=lr, epochs=epochs, momentum=momentum, weight_decay=weight_decay, step_size=step_size, gamma=gamma, keep=keep
    )
    if input is None:
        input = _resolve_single_input(train_stream)
    result = train_many(
        {"head": head},
        {"head": input},
        train_stream,
        val_stream,
        test_stream,
        recipe=recipe,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
        device=device,
        on_epoch_end=on_epoch_end,
    )
    return result.heads["head"]


def train_many(
    heads: Mapping[K, nn.Module],
    inputs_of: Mapping[K, InputSpec],
    train_stream: BatchStream,
    val_stream: BatchStream | None = None,
    test_stream: BatchStream | None = None,
    *,
    lrs: float | Mapping[K, float] | None = None,
    weight_decays: Mapping[K, float] | None = None,
    recipe: Recipe | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, Mapping[K, dict[str, float | None]]], None] | None = None,
    fuse: bool = True,
    lr: float | None = None,
    epochs: int | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    step_size: int | None = None,
    gamma: float | None = None,
    keep: str | None = None,
) -> SweepResult:
    """Train several heads in one pass over the data.

    Each epoch reads every batch of `train_stream` once and takes one SGD step for all heads (lr per head
    from `lrs`: one float for all, {key: lr}, or None for `recipe.lr`; weight decay per head from
    `weight_decays` {key: value}, else `recipe.weight_decay`). After each epoch every head is
    evaluated on `val_stream`; what a head keeps is `recipe.keep`'s rule. `test_stream` is evaluated once, at
    the end, with the kept weights. The heads are trained in place (and moved to `device`).

    A head whose training loss becomes non-finite (lr too high) is marked `diverged` and is not stepped again;
    the others carry on. `on_epoch_end(epoch, {key: history row})` is called after each epoch (after the
    checkpoint is written); an exception raised there stops training, which resumes cleanly.
    `fuse=False` computes every head's logits on its own (see the module docstring).
    """
    started = time.perf_counter()
    recipe = (recipe or Recipe()).replace(
        lr=lr, epochs=epochs, momentum=momentum, weight_decay=weight_decay, step_size=step_size, gamma=gamma, keep=keep
    )
    if not heads:
        raise ValueError("heads must hold at least one head")
    missing = [k for k in heads if k not in inputs_of]
    if missing:
        raise ValueError(f"inputs_of has no entry for heads {missing!r}")
    for k in heads:
        spec = inputs_of[k]
        if not isinstance(spec, str) and not (
            isinstance(spec, Mapping) and spec and all(isinstance(v, str) for v in spec.values())
        ):
            raise ValueError(
                f"inputs_of[{k!r}] must be a feature name or a non-empty {{input key: feature name}}, got {spec!r}"
            )
    if isinstance(lrs, Mapping):
        absent = [k for k in heads if k not in lrs]
        if absent:
            raise ProbeConfigError(f"lrs has no learning rate for heads {absent!r}")
        lr_of = {k: check_lr(f"lr of head {k!r}", lrs[k]) for k in heads}
    else:
        lr_of = {k: check_lr("lr", recipe.lr if lrs is None else lrs) for k in heads}
    if weight_decays is not None:
        absent = [k for k in heads if k not in weight_decays]
        if absent:
            raise ProbeConfigError(f"weight_decays has no value for heads {absent!r}")
        bad = {k: v for k, v in weight_decays.items() if not float(v) >= 0.0}
        if bad:
            raise ProbeConfigError(f"weight_decays must be >= 0, got {bad!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    device = torch.device(device)

    bank = nn.ModuleDict({str(i): h for i, h in enumerate(heads.values())}).to(device)
    runs = [_Head(k, h, inputs_of[k], lr_of[k], i) for i, (k, h) in enumerate(heads.items())]
    wd_list = None if weight_decays is None else [float(weight_decays[r.key]) for r in runs]  # type: ignore[index]
    optimizer, scheduler = build_optimizer(list(bank.values()), [r.lr for r in runs], recipe, wd_list)
    names = sorted({n for r in runs for n in feature_names(r.spec)})
    config = {
        "heads": [repr(r.key) for r in runs],
        "inputs": [r.spec if isinstance(r.spec, str) else {repr(a): b for a, b in r.spec.items()} for r in runs],
        "lrs": [r.lr for r in runs],
        "step_size": recipe.step_size,
        "gamma": recipe.gamma,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "keep": recipe.keep,
        **({"weight_decays": wd_list} if wd_list is not None else {}),
        # Runs of the SGD + StepLR recipes recorded neither key, and still resume.
        **(
            {"optimizer": recipe.optimizer_label(), "schedule": recipe.schedule_label()}
            if (recipe.optimizer, recipe.schedule) != ("sgd", "step")
            else {}
        ),
    }

    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and has_state(ckpt):
        if not resume:
            raise FileExistsError(
                f"{ckpt} already holds a checkpoint; pass resume=True to continue it or choose another checkpoint_dir"
            )
        start_epoch = load_checkpoint(ckpt, runs, optimizer, scheduler, config, device)

    epochs = recipe.epochs
    bar = progress_bar(total=epochs, initial=start_epoch, desc="train", unit="epoch", enabled=progress, leave=False)
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            rows = _train_epoch(
                epoch, runs, bank, optimizer, scheduler, train_stream, val_stream, names, device, fuse, recipe.keep
            )
            if ckpt is not None:
                save_checkpoint(ckpt, runs, optimizer, scheduler, config, epoch + 1)
            if progress:
                summary = _epoch_summary(runs, rows)
                log.info("epoch %d/%d | %s | %.1fs", shown_epoch(epoch), epochs, summary, time.perf_counter() - t0)
                bar.set_postfix_str(summary, refresh=False)
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, cast(Mapping[K, dict[str, float | None]], rows))  # keyed by the runs' keys
    finally:
        bar.close()

    for r in runs:
        if r.kept_state is not None:
            r.head.load_state_dict(r.kept_state)
    test = _evaluate_runs(runs, test_stream, device, fuse) if test_stream is not None else {}
    results: dict[Hashable, HeadResult] = {}
    for r in runs:
        val_acc, val_loss = r.kept_val
        results[r.key] = HeadResult(
            key=r.key,
            input=r.spec,
            lr=r.lr,
            epochs_trained=len(r.history),
            best_epoch=shown_epoch(r.kept_epoch),
            val_accuracy=val_acc,
            val_loss=val_loss,
            test_accuracy=test[id(r)][1] if test else None,
            test_loss=test[id(r)][0] if test else None,
            diverged=r.diverged,
            history=[{**row, "epoch": shown_epoch(int(row["epoch"] or 0))} for row in r.history],
        )
    return select_heads(results, selected=val_stream is not None, wall_time_s=time.perf_counter() - started)


def _train_epoch(
    epoch: int,
    runs: list[_Head],
    bank: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_stream: BatchStream,
    val_stream: BatchStream | None,
    names: list[str],
    device: torch.device,
    fuse: bool,
    keep: str,
) -> dict[Hashable, dict[str, float | None]]:
    """One pass over the training data, the scheduler step, validation and the keep rule; the history rows."""
    active = [r for r in runs if not r.diverged]
    bank.train()
    groups, single = fusable_groups([(r, r.head, r.spec) for r in active]) if fuse else ([], active)
    fused = [(g, LinearGroup([r.head for r in g], g[0].spec)) for g in groups]
    loss_sum = {id(r): torch.zeros((), dtype=torch.float64, device=device) for r in single}
    correct = {id(r): torch.zeros((), dtype=torch.int64, device=device) for r in single}
    seen = {id(r): 0 for r in active}
    # A fused group's sums stay one (H,) tensor during the epoch: per-head bookkeeping per batch would cost
    # more small ops than the heads' arithmetic.
    group_loss = [torch.zeros(len(g), dtype=torch.float64, device=device) for g, _ in fused]
    group_correct = [torch.zeros(len(g), dtype=torch.int64, device=device) for g, _ in fused]
    group_seen = 0
    train_stream.set_epoch(epoch)
    for xs, y in train_stream:
        y = y.to(device, non_blocking=True)
        feats = {n: xs[n].to(device, non_blocking=True) for n in names}  # one copy per feature, shared
        batch = int(y.shape[0])
        optimizer.zero_grad(set_to_none=True)  # heads left out of this batch's loss then get no step
        terms: list[torch.Tensor] = []
        for i, (_, group) in enumerate(fused):
            logits = group.logits(feats[group.spec])
            ce = group.per_head_ce(logits, y)
            # sum over heads of each head's mean: the gradient each head gets is its own mean CE's.
            terms.append(ce.sum() / batch)
            with torch.no_grad():
                group_loss[i] += ce.detach().mean(0).double() * batch
                group_correct[i] += group.correct(logits.detach(), y)
        group_seen += batch
        for r in single:
            if r.needs_pairs and batch < 2:
                continue  # BatchNorm cannot normalise a single sample in training mode
            logits = r.head(gather(r.spec, feats))
            loss = F.cross_entropy(logits, y)
            terms.append(loss)
            # Accumulated as tensors: no host sync per batch (matters on GPU).
            loss_sum[id(r)] += loss.detach().double() * batch
            correct[id(r)] += (logits.detach().argmax(1) == y).sum()
            seen[id(r)] += batch
        if terms:
            torch.autograd.backward(terms)  # the gradient of their sum, without building the sum
            optimizer.step()
    for (g, _), losses, hits in zip(fused, group_loss, group_correct):
        for j, r in enumerate(g):
            loss_sum[id(r)], correct[id(r)], seen[id(r)] = losses[j], hits[j], group_seen
    if not any(seen.values()) and active:
        raise ValueError("training stream yielded no samples")
    scheduler.step()
    val = _evaluate_runs(runs, val_stream, device, fuse) if val_stream is not None else {}
    rows: dict[Hashable, dict[str, float | None]] = {}
    for r in runs:
        lr_now = optimizer.param_groups[r.group]["lr"]
        row: dict[str, float | None] = {"epoch": float(epoch), "lr": r.frozen_lr if r.diverged else lr_now}
        if id(r) in seen and seen[id(r)]:
            train_loss = float(loss_sum[id(r)]) / seen[id(r)]
            row["train_accuracy"] = int(correct[id(r)]) / seen[id(r)]
            if math.isfinite(train_loss):
                row["train_loss"] = train_loss
            else:
                row["train_loss"] = None  # recorded as null (JSON has no NaN)
                r.diverged, r.frozen_lr = True, lr_now  # its weights are garbage now; kept ones stay valid
        else:
            row["train_loss"] = row["train_accuracy"] = None
        v_loss, v_acc = val.get(id(r), (None, None))
        if val:
            row["val_loss"], row["val_accuracy"] = v_loss, v_acc
        if keep == "last" or not val:
            # The head keeps its final weights: a diverged head's are garbage, so nothing is kept.
            r.kept_epoch, r.kept_val = (None, (None, None)) if r.diverged else (epoch, (v_acc, v_loss))
        elif (
            not r.diverged
            and v_acc is not None
            and (r.kept_epoch is None or r.kept_val[0] is None or v_acc > r.kept_val[0])
        ):
            # Epochs rank by validation accuracy alone, the earliest on ties (a later epoch must beat it).
            r.kept_epoch, r.kept_val, r.kept_state = epoch, (v_acc, v_loss), _clone_state(r.head)
        row["diverged"] = float(r.diverged)
        r.history.append(row)
        rows[r.key] = row
    return rows


def _evaluate_runs(
    runs: list[_Head], stream: BatchStream, device: torch.device, fuse: bool
) -> dict[int, tuple[float, float]]:
    return evaluate({id(r): r.head for r in runs}, {id(r): r.spec for r in runs}, stream, device, fuse=fuse)


def _epoch_summary(runs: list[_Head], rows: Mapping[Any, dict[str, float | None]]) -> str:
    parts = [f"{len(runs)} heads"] if len(runs) > 1 else []
    losses = [loss for row in rows.values() if (loss := row.get("train_loss")) is not None]
    if losses:
        parts.append(f"train loss {min(losses):.4f}" + (" (best head)" if len(runs) > 1 else ""))
    vals = [(acc, k) for k, row in rows.items() if (acc := row.get("val_accuracy")) is not None]
    if vals:
        acc, k = max(vals, key=lambda v: v[0])
        parts.append(f"val acc {acc:.4f}" + (f" ({k!r})" if len(runs) > 1 else ""))
    diverged = sum(r.diverged for r in runs)
    if diverged:
        parts.append(f"{diverged} diverged")
    return " | ".join(parts)
