"""One training loop for probe heads: many heads per pass over the data (DINOv2's linear evaluation).

The heads live in one `nn.ModuleDict` and train with ONE `torch.optim.SGD` holding a parameter group per head
(each with its own lr) and ONE `StepLR`; every batch is read once, each feature moved to the device once, and
the heads' losses are summed into one backward. Heads do not share parameters, so each head gets exactly the
gradient it gets alone, and SGD updates every group as it would a single head's optimizer: a head trained
with others ends exactly as it does trained alone.

One shortcut, on by default (`fuse=True`): plain `LinearHead`s that read the same feature (one feature at
several lrs, as in a sweep) compute their logits with one matmul over their concatenated weights. Autograd
still hands each head's own parameters their own gradient slice, so the optimizer is the same; only float
rounding of the shared matmul can differ (about 1e-7 relative).

Settings come from a `probe.recipe.Recipe` (validated there); `train`/`train_many` also take its fields as
keyword overrides (`lr=0.05, momentum=0.9`). `recipe.keep` says which weights a head keeps: those of its best
validation epoch (`"best"`: the highest validation accuracy, the earliest on ties) or of the last epoch (`"last"`, the paper's protocol, and what any head keeps without a validation stream).

Determinism: the trainer draws no random numbers. A run is fixed by the heads' initial weights
(`probe.heads.seeded_init`) and the stream's seed. Checkpoints (`checkpoint_dir`) are `extract.statedir`
state directories written after every epoch; `resume=True` continues after the last completed epoch and ends
with the same weights as an uninterrupted run. Status goes to `logging` (one line per epoch) and a tqdm bar.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from extract.provenance import to_jsonable
from extract.statedir import has_state, join_optimizer_state, load_state, save_state, split_optimizer_state

from .heads import LinearHead
from .metrics import select_best, selection_rank
from .recipe import ProbeConfigError, Recipe, check_lr
from .stream import BatchStream

__all__ = ["HeadResult", "SweepResult", "train", "train_many", "evaluate", "predict_logits", "build_optimizer"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "diffbank.probe.trainer/2"

K = TypeVar("K", bound=Hashable)
# What a head reads: one feature name (the head gets a tensor) or {head input key: feature name}
# (the head gets a dict, e.g. DifFormerHead's {(t, block): tensor}).
InputSpec = str | Mapping[Hashable, str]


@dataclasses.dataclass
class HeadResult:
    """The outcome for one head. Epochs are 0-based; `best_epoch` is the epoch whose weights the head holds."""

    key: Hashable
    input: InputSpec
    lr: float
    epochs_trained: int
    best_epoch: int | None
    val_accuracy: float | None
    val_loss: float | None
    test_accuracy: float | None
    test_loss: float | None
    diverged: bool
    history: list[dict[str, float | None]]


@dataclasses.dataclass
class SweepResult:
    """Results of `train_many`: per head, plus the selection on validation (`probe.metrics.select_best`).

    `best_per_input` maps each input (the feature name, or for dict inputs the sorted feature names joined by
    "+") to the key of its best head (e.g. the best lr per feature); `best` is the best head overall. Both are
    empty/None without a validation stream: selecting on test data would bias the reported test accuracy.
    """

    heads: dict[Hashable, HeadResult]
    best_per_input: dict[str, Hashable]
    best: Hashable | None
    wall_time_s: float

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per head (for tables and JSON)."""
        return [
            {
                "key": r.key if isinstance(r.key, (str, int, float)) else repr(r.key),
                "input": input_label(r.input),
                "lr": r.lr,
                "best_epoch": r.best_epoch,
                "val_accuracy": r.val_accuracy,
                "test_accuracy": r.test_accuracy,
                "diverged": r.diverged,
                "selected_for_input": self.best_per_input.get(input_label(r.input)) == r.key,
            }
            for r in self.heads.values()
        ]


def input_label(spec: InputSpec) -> str:
    return spec if isinstance(spec, str) else "+".join(sorted(set(spec.values())))


def _feature_names(spec: InputSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec.values())


def _gather(spec: InputSpec, feats: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[Hashable, torch.Tensor]:
    if isinstance(spec, str):
        return feats[spec]
    return {k: feats[name] for k, name in spec.items()}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def build_optimizer(heads: Sequence[nn.Module], lrs: Sequence[float], recipe: Recipe
                    ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR]:
    """The optimizer and schedule of a run: SGD with one parameter group per head, one StepLR over all."""
    groups = [{"params": list(h.parameters()), "lr": float(lr)} for h, lr in zip(heads, lrs)]
    optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)


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


# ------------------------------------------------------------------------------------------ fused linear heads

def _fusion_key(head: nn.Module, spec: InputSpec) -> tuple[Any, ...] | None:
    """Heads with equal keys can share one matmul; None: this head cannot.

    Only plain `LinearHead`s without BatchNorm that read one feature qualify; subclasses, other heads and dict
    inputs take the ordinary per-head path.
    """
    if type(head) is not LinearHead or not isinstance(head.norm, nn.Identity) or not isinstance(spec, str):
        return None
    w, b = head.linear.weight, head.linear.bias
    if b is None or b.dtype != w.dtype or b.device != w.device:
        return None
    return (spec, w.shape[0], w.shape[1], w.dtype, w.device)


def _fusable_groups(items: Sequence[tuple[Any, nn.Module, InputSpec]]) -> tuple[list[list[Any]], list[Any]]:
    """Split (tag, head, spec) triples into groups of >= 2 fusable heads (tags, in order) and the rest."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    rest: list[Any] = []
    for tag, head, spec in items:
        key = _fusion_key(head, spec)
        if key is None:
            rest.append(tag)
        else:
            groups.setdefault(key, []).append(tag)
    fused = [g for g in groups.values() if len(g) >= 2]
    rest += [g[0] for g in groups.values() if len(g) == 1]
    return fused, rest


class _LinearGroup:
    """H `LinearHead`s on one feature as one (H*K, D) matmul; gradients flow back to each head's own weights."""

    def __init__(self, heads: Sequence[LinearHead], spec: str) -> None:
        self.spec = spec
        self.heads = list(heads)
        self.num_heads = len(self.heads)
        self.classes = self.heads[0].linear.out_features
        self.in_features = self.heads[0].linear.in_features
        self.in_shape = self.heads[0].in_shape
        self.weights = [h.linear.weight for h in self.heads]
        self.biases = [h.linear.bias for h in self.heads]
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def frozen(self) -> _LinearGroup:
        """Concatenate the weights once, for evaluation (weights fixed, no gradient)."""
        self._fixed = (torch.cat(self.biases).detach(), torch.cat(self.weights).detach().t())
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"LinearHead expects inputs of shape (N, {self.in_shape}), got {tuple(x.shape)}")
        bias, weight_t = self._fixed if self._fixed is not None else (torch.cat(self.biases), torch.cat(self.weights).t())
        return torch.addmm(bias, x.flatten(1), weight_t)

    def per_head_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, H*K) logits -> (B, H) cross-entropy of every sample under every head."""
        n, h = int(y.shape[0]), self.num_heads
        targets = y.unsqueeze(1).expand(n, h).reshape(-1)
        return F.cross_entropy(logits.reshape(n * h, self.classes), targets, reduction="none").view(n, h)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(H,) number of samples each head classifies correctly."""
        n = int(y.shape[0])
        return (logits.view(n, self.num_heads, self.classes).argmax(2) == y.unsqueeze(1)).sum(0)


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(
    heads: Mapping[K, nn.Module],
    inputs_of: Mapping[K, InputSpec],
    stream: BatchStream,
    device: str | torch.device = "cpu",
    *,
    fuse: bool = True,
) -> dict[K, tuple[float, float]]:
    """Mean cross-entropy and accuracy of every head on one pass over `stream`: {key: (loss, accuracy)}.

    With `fuse`, linear heads on the same feature are evaluated together, with one matmul per batch.
    """
    device = torch.device(device)
    was_training = {k: h.training for k, h in heads.items()}
    for h in heads.values():
        h.eval()
    names = sorted({n for k in heads for n in _feature_names(inputs_of[k])})
    groups, single = _fusable_groups([(k, h, inputs_of[k]) for k, h in heads.items()]) if fuse else ([], list(heads))
    banks = [(g, _LinearGroup([heads[k] for k in g], inputs_of[g[0]]).frozen()) for g in groups]  # type: ignore[misc]
    bank_loss = [torch.zeros(len(g), dtype=torch.float64, device=device) for g, _ in banks]
    bank_correct = [torch.zeros(len(g), dtype=torch.int64, device=device) for g, _ in banks]
    loss_sum = {k: torch.zeros((), dtype=torch.float64, device=device) for k in single}
    correct = {k: torch.zeros((), dtype=torch.int64, device=device) for k in single}
    count = 0
    stream.set_epoch(0)
    for xs, y in stream:
        y = y.to(device)
        feats = {n: xs[n].to(device) for n in names}
        for i, (_, bank) in enumerate(banks):
            logits = bank.logits(feats[bank.spec])
            bank_loss[i] += bank.per_head_ce(logits.float(), y).sum(0).double()
            bank_correct[i] += bank.correct(logits, y)
        for k in single:
            logits = heads[k](_gather(inputs_of[k], feats))
            loss_sum[k] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct[k] += (logits.argmax(1) == y).sum()
        count += int(y.shape[0])
    for k, h in heads.items():
        h.train(was_training[k])
    if count == 0:
        raise ValueError("evaluation stream yielded no samples")
    for (g, _), ls, cs in zip(banks, bank_loss, bank_correct):
        for j, k in enumerate(g):
            loss_sum[k], correct[k] = ls[j], cs[j]
    return {k: (float(loss_sum[k]) / count, int(correct[k]) / count) for k in heads}


@torch.no_grad()
def predict_logits(
    head: nn.Module, stream: BatchStream, input: InputSpec, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Logits of `head` over one pass of `stream` (in stream order), as a CPU float32 tensor."""
    device = torch.device(device)
    was_training = head.training
    head.eval()
    stream.set_epoch(0)
    out = []
    for xs, _ in stream:
        feats = {n: xs[n].to(device) for n in _feature_names(input)}
        out.append(head(_gather(input, feats)).float().cpu())
    head.train(was_training)
    if not out:
        raise ValueError("stream yielded no samples")
    return torch.cat(out)


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
    on_epoch_end: Callable[[int, Mapping[Hashable, dict[str, float | None]]], None] | None = None,
    **settings: Any,
) -> HeadResult:
    """Train one head (see `train_many`; this is the one-head case). `input=None`: the stream's only feature.

    `settings` override fields of `recipe` (default `Recipe()`), e.g. `lr=0.05, momentum=0.9`.
    """
    recipe = (recipe or Recipe()).replace(**settings)
    if input is None:
        input = _resolve_single_input(train_stream)
    result = train_many(
        {"head": head}, {"head": input}, train_stream, val_stream, test_stream, recipe=recipe,
        checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, device=device, on_epoch_end=on_epoch_end,
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
    recipe: Recipe | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, Mapping[K, dict[str, float | None]]], None] | None = None,
    fuse: bool = True,
    **settings: Any,
) -> SweepResult:
    """Train several heads in one pass over the data.

    Each epoch reads every batch of `train_stream` once and takes one SGD step for all heads (lr per head
    from `lrs`: one float for all, {key: lr}, or None for `recipe.lr`). After each epoch every head is
    evaluated on `val_stream`; what a head keeps is `recipe.keep`'s rule. `test_stream` is evaluated once, at
    the end, with the kept weights. The heads are trained in place (and moved to `device`).

    A head whose training loss becomes non-finite (lr too high) is marked `diverged` and is not stepped again;
    the others carry on. `on_epoch_end(epoch, {key: history row})` is called after each epoch (after the
    checkpoint is written); an exception raised there stops training, which resumes cleanly.
    `fuse=False` computes every head's logits on its own (see the module docstring).
    """
    started = time.perf_counter()
    recipe = (recipe or Recipe()).replace(**settings)
    if not heads:
        raise ValueError("heads must hold at least one head")
    missing = [k for k in heads if k not in inputs_of]
    if missing:
        raise ValueError(f"inputs_of has no entry for heads {missing!r}")
    for k in heads:
        spec = inputs_of[k]
        if not isinstance(spec, str) and not (isinstance(spec, Mapping) and spec and all(isinstance(v, str) for v in spec.values())):
            raise ValueError(f"inputs_of[{k!r}] must be a feature name or a non-empty {{input key: feature name}}, got {spec!r}")
    if isinstance(lrs, Mapping):
        absent = [k for k in heads if k not in lrs]
        if absent:
            raise ProbeConfigError(f"lrs has no learning rate for heads {absent!r}")
        lr_of = {k: check_lr(f"lr of head {k!r}", lrs[k]) for k in heads}
    else:
        lr_of = {k: check_lr("lr", recipe.lr if lrs is None else lrs) for k in heads}
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    device = torch.device(device)

    bank = nn.ModuleDict({str(i): h for i, h in enumerate(heads.values())}).to(device)
    runs = [_Head(k, h, inputs_of[k], lr_of[k], i) for i, (k, h) in enumerate(heads.items())]
    optimizer, scheduler = build_optimizer(list(bank.values()), [r.lr for r in runs], recipe)
    names = sorted({n for r in runs for n in _feature_names(r.spec)})
    config = {
        "heads": [repr(r.key) for r in runs],
        "inputs": [r.spec if isinstance(r.spec, str) else {repr(a): b for a, b in r.spec.items()} for r in runs],
        "lrs": [r.lr for r in runs],
        "step_size": recipe.step_size,
        "gamma": recipe.gamma,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "keep": recipe.keep,
    }

    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and has_state(ckpt):
        if not resume:
            raise FileExistsError(
                f"{ckpt} already holds a checkpoint; pass resume=True to continue it or choose another checkpoint_dir"
            )
        start_epoch = _load_checkpoint(ckpt, runs, optimizer, scheduler, config, device)

    epochs = recipe.epochs
    bar = tqdm(total=epochs, initial=start_epoch, desc="train", unit="epoch", disable=not progress, leave=False)
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            rows = _train_epoch(epoch, runs, bank, optimizer, scheduler, train_stream, val_stream, names, device,
                                fuse, recipe.keep)
            if ckpt is not None:
                _save_checkpoint(ckpt, runs, optimizer, scheduler, config, epoch + 1)
            if progress:
                summary = _epoch_summary(runs, rows)
                log.info("epoch %d/%d | %s | %.1fs", epoch + 1, epochs, summary, time.perf_counter() - t0)
                bar.set_postfix_str(summary, refresh=False)
                bar.update(1)
            if on_epoch_end is not None:
                on_epoch_end(epoch, rows)
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
            key=r.key, input=r.spec, lr=r.lr, epochs_trained=len(r.history), best_epoch=r.kept_epoch,
            val_accuracy=val_acc, val_loss=val_loss,
            test_accuracy=test[id(r)][1] if test else None, test_loss=test[id(r)][0] if test else None,
            diverged=r.diverged, history=r.history,
        )
    best_per_input: dict[str, Hashable] = {}
    best: Hashable | None = None
    if val_stream is not None:
        def rank(k: Hashable) -> tuple[float, float]:
            return selection_rank(results[k].val_accuracy, results[k].val_loss)

        by_input: dict[str, list[Hashable]] = {}
        for r in runs:  # the caller's order decides ties
            by_input.setdefault(input_label(r.spec), []).append(r.key)
        best_per_input = {label: select_best(keys, rank) for label, keys in by_input.items()}
        best = select_best([r.key for r in runs], rank)
    return SweepResult(results, best_per_input, best, time.perf_counter() - started)


def _train_epoch(epoch: int, runs: list[_Head], bank: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                 scheduler: Any, train_stream: BatchStream, val_stream: BatchStream | None, names: list[str],
                 device: torch.device, fuse: bool, keep: str) -> dict[Hashable, dict[str, float | None]]:
    """One pass over the training data, the scheduler step, validation and the keep rule; the history rows."""
    active = [r for r in runs if not r.diverged]
    bank.train()
    groups, single = _fusable_groups([(r, r.head, r.spec) for r in active]) if fuse else ([], active)
    fused = [(g, _LinearGroup([r.head for r in g], g[0].spec)) for g in groups]  # type: ignore[misc]
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
            logits = r.head(_gather(r.spec, feats))
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
        elif not r.diverged and (r.kept_epoch is None or v_acc > r.kept_val[0]):
            # Epochs rank by validation accuracy alone, the earliest on ties (a later epoch must beat it).
            r.kept_epoch, r.kept_val, r.kept_state = epoch, (v_acc, v_loss), _clone_state(r.head)
        row["diverged"] = float(r.diverged)
        r.history.append(row)
        rows[r.key] = row
    return rows


def _evaluate_runs(runs: list[_Head], stream: BatchStream, device: torch.device, fuse: bool) -> dict[int, tuple[float, float]]:
    return evaluate({id(r): r.head for r in runs}, {id(r): r.spec for r in runs}, stream, device, fuse=fuse)


def _epoch_summary(runs: list[_Head], rows: Mapping[Any, dict[str, float | None]]) -> str:
    parts = [f"{len(runs)} heads"] if len(runs) > 1 else []
    losses = [row["train_loss"] for row in rows.values() if row.get("train_loss") is not None]
    if losses:
        parts.append(f"train loss {min(losses):.4f}" + (" (best head)" if len(runs) > 1 else ""))
    vals = [(row["val_accuracy"], k) for k, row in rows.items() if row.get("val_accuracy") is not None]
    if vals:
        acc, k = max(vals, key=lambda v: v[0])
        parts.append(f"val acc {acc:.4f}" + (f" ({k!r})" if len(runs) > 1 else ""))
    diverged = sum(r.diverged for r in runs)
    if diverged:
        parts.append(f"{diverged} diverged")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------- checkpoints

def _save_checkpoint(directory: Path, runs: list[_Head], optimizer: torch.optim.Optimizer, scheduler: Any,
                     config: dict[str, Any], epochs_done: int) -> None:
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


def _load_checkpoint(directory: Path, runs: list[_Head], optimizer: torch.optim.Optimizer, scheduler: Any,
                     config: dict[str, Any], device: torch.device) -> int:
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
