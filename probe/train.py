"""Training loop for probe heads on cached features: many heads per data pass, checkpoints, early selection.

Recipe defaults are the paper's public code: SGD without momentum or weight decay, StepLR x0.1 every 7 epochs,
28 epochs, cross-entropy; lr 1e-2 for linear heads, 5e-2 for attention / DifFormer heads (`DEFAULT_LR`).

Data interface: anything satisfying `BatchStream` (below). `probe/data.py` adapts the Zarr store reader to it;
`ArrayStream` is the in-memory implementation used by tests and the scikit-learn-style estimators.

Determinism: the trainer itself draws no random numbers. A run is fixed by (initial head weights, the stream's
batches): build heads under `probe.heads.seeded_init(seed)` and give the stream a seed; the same seeds then give
bit-identical weights on the same device, and heads trained together with `train_many` end as they do when
trained one by one over the same batches: exactly, or, for linear heads fused into one bank (same feature,
several lrs; see `train_many`), up to float32 rounding of the shared matmuls.

Checkpoints (`checkpoint_dir`): after every epoch, `state-{epochs_done:04d}.safetensors` holds every head's
weights, its best-so-far weights and its optimizer tensors; `state.json` (written after it, atomically, so it
always names a complete tensor file) holds the epoch count, the configuration, the per-head history, optimizer
hyper-parameters and scheduler state. Older tensor files are removed. Nothing is ever unpickled.
`resume=True` continues after the last completed epoch and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .heads import LinearHead

__all__ = [
    "DEFAULT_LR",
    "BatchStream",
    "ArrayStream",
    "HeadResult",
    "SweepResult",
    "train",
    "train_many",
    "evaluate",
    "predict_logits",
]

DEFAULT_LR = {"linear": 1e-2, "attention": 5e-2, "difformer": 5e-2}
CHECKPOINT_FORMAT = "diffbank.probe.train/1"

K = TypeVar("K", bound=Hashable)
# What a head reads: one feature name (the head gets a tensor) or {head input key: feature name}
# (the head gets a dict, e.g. DifFormerHead's {(t, block): tensor}).
InputSpec = Union[str, Mapping[Hashable, str]]


@runtime_checkable
class BatchStream(Protocol):
    """One split of a cached dataset, served in batches.

    - `num_samples`: the number of samples one full iteration yields.
    - `set_epoch(epoch)`: fixes the order of the next iteration; a shuffling stream must give the same order for
      the same (seed, epoch) (this is what makes runs reproducible and resumable), a non-shuffling one ignores it.
    - `__iter__()`: yields `(xs, y)` with `xs: dict[str, torch.Tensor]` (feature name -> float32 CPU tensor,
      batch first, e.g. (B, C, H, W) or (B, D)) and `y: torch.Tensor` int64 (B,), class indices 0..K-1.
      Every batch carries the same feature names. Standardisation, if any, is the stream's job.
    """

    @property
    def num_samples(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]: ...


class ArrayStream:
    """In-memory `BatchStream` over numpy arrays.

    `arrays` maps feature names to arrays sharing the first axis with `labels` (int class indices 0..K-1).
    With `shuffle=True` the order of epoch e is a permutation drawn from a torch.Generator seeded from
    (seed, e) alone, so it does not depend on how many epochs ran before (resume-safe).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray | Sequence[int],
        batch_size: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not arrays:
            raise ValueError("arrays must hold at least one feature")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        y = np.asarray(labels)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array of class indices, got dtype {y.dtype}, shape {y.shape}")
        if y.size and y.min() < 0:
            raise ValueError("labels must be class indices >= 0")
        self.arrays: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.ndim < 2 or arr.shape[0] != y.shape[0]:
                raise ValueError(
                    f"feature {name!r} has shape {arr.shape}; expected (N, ...) with N = {y.shape[0]} labels"
                )
            self.arrays[str(name)] = arr
        self.labels = torch.from_numpy(y.astype(np.int64))
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self._epoch = 0

    @property
    def num_samples(self) -> int:
        n = int(self.labels.shape[0])
        return n - n % self.batch_size if self.drop_last else n

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        # SeedSequence mixes (seed, epoch) into well-separated streams; a torch.Generator draws the permutation.
        state = int(np.random.SeedSequence([self.seed, self._epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.randperm(self.labels.shape[0], generator=torch.Generator().manual_seed(state))

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n = int(self.labels.shape[0])
        order = self._order()
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            if self.drop_last and stop - start < self.batch_size:
                break
            if order is None:
                xs = {k: _to_tensor(a[start:stop]) for k, a in self.arrays.items()}
                yield xs, self.labels[start:stop]
            else:
                idx = order[start:stop]
                idx_np = idx.numpy()
                yield {k: _to_tensor(a[idx_np]) for k, a in self.arrays.items()}, self.labels[idx]


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


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
    """Results of `train_many`: per head, plus the selection by validation accuracy.

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
                "input": _input_label(r.input),
                "lr": r.lr,
                "best_epoch": r.best_epoch,
                "val_accuracy": r.val_accuracy,
                "test_accuracy": r.test_accuracy,
                "diverged": r.diverged,
                "selected_for_input": self.best_per_input.get(_input_label(r.input)) == r.key,
            }
            for r in self.heads.values()
        ]


def _input_label(spec: InputSpec) -> str:
    return spec if isinstance(spec, str) else "+".join(sorted(set(spec.values())))


def _feature_names(spec: InputSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec.values())


def _gather(spec: InputSpec, feats: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[Hashable, torch.Tensor]:
    if isinstance(spec, str):
        return feats[spec]
    return {k: feats[name] for k, name in spec.items()}


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _check_number(name: str, value: Any, *, positive: bool = False, low: float | None = None, integer: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(float(value))
    if ok and positive:
        ok = value > 0
    if ok and low is not None:
        ok = value >= low
    if not ok:
        kind = "int" if integer else "number"
        need = " > 0" if positive else (f" >= {low}" if low is not None else "")
        raise ValueError(f"{name} must be a finite {kind}{need}, got {value!r}")


class _Run:
    """Mutable per-head training state."""

    def __init__(self, key: Hashable, head: nn.Module, spec: InputSpec, lr: float, momentum: float,
                 weight_decay: float, step_size: int, gamma: float) -> None:
        self.key = key
        self.head = head
        self.spec = spec
        self.lr = float(lr)
        self.optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=step_size, gamma=gamma)
        self.needs_pairs = _has_batchnorm(head)
        self.best_epoch: int | None = None
        self.best_val_accuracy = -math.inf
        self.best_val_loss = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.diverged = False
        self.history: list[dict[str, float | None]] = []


# ------------------------------------------------------------------------------------------ fused linear heads

def _fusion_key(head: nn.Module, spec: InputSpec) -> tuple[Any, ...] | None:
    """Heads with equal keys can be trained and evaluated as one `_LinearBank`; None: this head cannot.

    Only plain `LinearHead`s without BatchNorm that read one feature qualify; subclasses, other heads and dict
    inputs take the ordinary per-head path.
    """
    if type(head) is not LinearHead or not isinstance(head.norm, nn.Identity) or not isinstance(spec, str):
        return None
    w, b = head.linear.weight, head.linear.bias
    if b is None or b.dtype != w.dtype or b.device != w.device:
        return None
    return (spec, w.shape[0], w.shape[1], w.dtype, w.device)


def _fusable_groups(heads: Sequence[tuple[Any, nn.Module, InputSpec]]) -> tuple[list[list[Any]], list[Any]]:
    """Split (tag, head, spec) triples into groups of >= 2 fusable heads (tags, in order) and the rest."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    rest: list[Any] = []
    for tag, head, spec in heads:
        key = _fusion_key(head, spec)
        if key is None:
            rest.append(tag)
        else:
            groups.setdefault(key, []).append(tag)
    fused = [g for g in groups.values() if len(g) >= 2]
    rest += [g[0] for g in groups.values() if len(g) == 1]
    return fused, rest


class _LinearBank:
    """H `LinearHead`s on the same feature as one (H*K, D) weight: one matmul gives every head's logits.

    Training: the loss is the sum over heads of each head's mean cross-entropy, so each head's gradient is
    exactly the gradient it gets alone; the SGD update (weight decay, momentum, lr) is applied head slice by head
    slice with the same tensor operations as `torch.optim.SGD`, so each head ends as it does alone up to the
    rounding of the shared matmuls. The bank is loaded from the heads (and their optimizers' momentum buffers)
    with `from_runs` and written back with `write_back`, so between epochs the heads, optimizers and checkpoints
    are exactly those of the per-head path.
    """

    def __init__(self, heads: Sequence[LinearHead], spec: str, device: torch.device) -> None:
        self.spec = spec
        self.heads = list(heads)
        self.num_heads = len(self.heads)
        self.classes = self.heads[0].linear.out_features
        self.in_features = self.heads[0].linear.in_features
        self.in_shape = self.heads[0].in_shape
        with torch.no_grad():
            self.weight = torch.cat([h.linear.weight.detach() for h in self.heads]).to(device)
            self.bias = torch.cat([h.linear.bias.detach() for h in self.heads]).to(device)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ValueError(f"LinearHead expects inputs of shape (N, {self.in_shape}), got {tuple(x.shape)}")
        return x.flatten(1)

    def per_head_ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, H*K) logits -> (B, H) cross-entropy of every sample under every head."""
        n, h = int(y.shape[0]), self.num_heads
        targets = y.unsqueeze(1).expand(n, h).reshape(-1)
        return F.cross_entropy(logits.reshape(n * h, self.classes), targets, reduction="none").view(n, h)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(H,) number of samples each head classifies correctly."""
        n = int(y.shape[0])
        return (logits.view(n, self.num_heads, self.classes).argmax(2) == y.unsqueeze(1)).sum(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, self._check(x), self.weight.t())


class _TrainBank(_LinearBank):
    """A `_LinearBank` that trains its heads (the `_Run`s of one fusable group) for one epoch."""

    def __init__(self, runs: Sequence[_Run], device: torch.device, momentum: float, weight_decay: float) -> None:
        super().__init__([r.head for r in runs], runs[0].spec, device)  # type: ignore[arg-type, misc]
        self.runs = list(runs)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        # The scheduler already set this epoch's lr in each optimizer (as for the per-head path).
        self.lrs = [float(r.optimizer.param_groups[0]["lr"]) for r in self.runs]
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.has_buffer = [False] * self.num_heads
        if self.momentum:
            for i, name in enumerate(("weight", "bias")):
                parts = [r.optimizer.state.get(getattr(r.head.linear, name), {}).get("momentum_buffer") for r in self.runs]
                if any(p is not None for p in parts):
                    ref = getattr(self, name)
                    self.buffers[i] = torch.cat([p.detach() if p is not None else torch.zeros_like(ref[:self.classes])
                                                 for p in parts]).to(ref.device)
            self.has_buffer = [r.optimizer.state.get(r.head.linear.weight, {}).get("momentum_buffer") is not None
                               for r in self.runs]
        dev = self.weight.device
        self.loss_sum = torch.zeros(self.num_heads, dtype=torch.float64, device=dev)
        self.correct_sum = torch.zeros(self.num_heads, dtype=torch.int64, device=dev)
        self.seen = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        n = int(y.shape[0])
        logits = self.logits(x)
        ce = self.per_head_ce(logits, y)
        # sum over heads of each head's mean: d loss / d logits of head h is what head h's own mean CE gives.
        gw, gb = torch.autograd.grad(ce.sum() / n, (self.weight, self.bias))
        with torch.no_grad():
            self._sgd(self.weight, gw, 0)
            self._sgd(self.bias, gb, 1)
            self.loss_sum += ce.detach().mean(0).double() * n
            self.correct_sum += self.correct(logits.detach(), y)
        self.seen += n

    def _sgd(self, param: torch.Tensor, grad: torch.Tensor, which: int) -> None:
        # The operations of torch.optim.SGD's single-tensor step (dampening 0, no nesterov), per head slice.
        k = self.classes
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = self.buffers[which]
            if buf is None:
                buf = self.buffers[which] = grad.detach().clone()
            elif all(self.has_buffer):
                buf.mul_(self.momentum).add_(grad, alpha=1)
            else:  # some heads have stepped before (resumed mid-way), some not
                for h, seen in enumerate(self.has_buffer):
                    part = buf[h * k:(h + 1) * k]
                    if seen:
                        part.mul_(self.momentum).add_(grad[h * k:(h + 1) * k], alpha=1)
                    else:
                        part.copy_(grad[h * k:(h + 1) * k])
            if which == 1:
                self.has_buffer = [True] * self.num_heads
            grad = buf
        if len(set(self.lrs)) == 1:
            param.add_(grad, alpha=-self.lrs[0])
        else:
            for h, lr in enumerate(self.lrs):
                param[h * k:(h + 1) * k].add_(grad[h * k:(h + 1) * k], alpha=-lr)

    def write_back(self) -> None:
        """Copy weights and momentum buffers into the heads and their optimizers."""
        k = self.classes
        with torch.no_grad():
            for h, r in enumerate(self.runs):
                lin = r.head.linear
                lin.weight.copy_(self.weight[h * k:(h + 1) * k])
                lin.bias.copy_(self.bias[h * k:(h + 1) * k])
                for i, param in enumerate((lin.weight, lin.bias)):
                    buf = self.buffers[i]
                    if buf is not None:
                        r.optimizer.state[param]["momentum_buffer"] = buf[h * k:(h + 1) * k].clone()
                if self.seen:
                    # The bank stepped for this optimizer: tell its StepLR (which otherwise warns that the
                    # scheduler stepped before the optimizer ever did).
                    r.optimizer._opt_called = True  # type: ignore[attr-defined]


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
    banks = [(g, _LinearBank([heads[k] for k in g], inputs_of[g[0]], device)) for g in groups]  # type: ignore[misc]
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
    lr: float = DEFAULT_LR["linear"],
    epochs: int = 28,
    step_size: int = 7,
    gamma: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, Mapping[Hashable, dict[str, float | None]]], None] | None = None,
) -> HeadResult:
    """Train one head (see `train_many`; this is the one-head case). `input=None`: the stream's only feature."""
    if input is None:
        input = _resolve_single_input(train_stream)
    result = train_many(
        {"head": head}, {"head": input}, train_stream, val_stream, test_stream, lrs=lr, epochs=epochs,
        step_size=step_size, gamma=gamma, momentum=momentum, weight_decay=weight_decay,
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
    lrs: float | Mapping[K, float] = DEFAULT_LR["linear"],
    epochs: int = 28,
    step_size: int = 7,
    gamma: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    on_epoch_end: Callable[[int, Mapping[K, dict[str, float | None]]], None] | None = None,
    fuse: bool = True,
) -> SweepResult:
    """Train several heads in one pass over the data (DINOv2 linear-evaluation style).

    Each epoch reads every batch of `train_stream` once; each feature is moved to `device` once and shared by
    every head that reads it; each head then takes its own SGD step (own optimizer and StepLR scheduler, lr from
    `lrs`: one float for all, or {key: lr}). After each epoch every head is evaluated on `val_stream`; a head keeps
    the weights of its best validation-accuracy epoch (the earliest on ties), or its last epoch without a
    validation stream. `test_stream` is evaluated once, at the end, with the kept weights.

    A head whose training loss becomes non-finite (lr too high) is marked `diverged` and is not stepped again;
    the sweep carries on with the others. `on_epoch_end(epoch, {key: history row})` is called after each epoch
    (after the checkpoint is written); an exception raised there stops training, which resumes cleanly.
    The heads are trained in place (and moved to `device`).

    Fusion (`fuse=True`, the default): plain `LinearHead`s (no BatchNorm) that read the same feature, e.g. one
    feature at several lrs, train as one bank: one matmul for all their logits, one backward, and an SGD update
    that applies each head's own lr (same operations as `torch.optim.SGD`, per head slice). Every head still
    gets exactly its own gradient, so results equal per-head training up to float rounding of the shared
    matmuls (about 1e-7 relative); between epochs the heads, optimizers, checkpoints and results are the
    ordinary per-head ones. `fuse=False` trains every head on its own.
    """
    started = time.perf_counter()
    if not heads:
        raise ValueError("heads must hold at least one head")
    missing = [k for k in heads if k not in inputs_of]
    if missing:
        raise ValueError(f"inputs_of has no entry for heads {missing!r}")
    for k in heads:
        spec = inputs_of[k]
        if not isinstance(spec, str) and not (isinstance(spec, Mapping) and spec and all(isinstance(v, str) for v in spec.values())):
            raise ValueError(f"inputs_of[{k!r}] must be a feature name or a non-empty {{input key: feature name}}, got {spec!r}")
    _check_number("epochs", epochs, integer=True, low=1)
    _check_number("step_size", step_size, integer=True, low=1)
    _check_number("gamma", gamma, positive=True)
    _check_number("momentum", momentum, low=0.0)
    _check_number("weight_decay", weight_decay, low=0.0)
    if isinstance(lrs, Mapping):
        absent = [k for k in heads if k not in lrs]
        if absent:
            raise ValueError(f"lrs has no learning rate for heads {absent!r}")
        lr_of = {k: lrs[k] for k in heads}
    else:
        lr_of = {k: lrs for k in heads}
    for k, lr in lr_of.items():
        _check_number(f"lr of head {k!r}" if isinstance(lrs, Mapping) else "lr", lr, positive=True)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    epochs, step_size = int(epochs), int(step_size)
    device = torch.device(device)

    runs: list[_Run] = []
    for k, head in heads.items():
        head.to(device)
        runs.append(_Run(k, head, inputs_of[k], float(lr_of[k]), float(momentum), float(weight_decay), step_size, float(gamma)))
    names = sorted({n for r in runs for n in _feature_names(r.spec)})
    config = {
        "heads": [repr(r.key) for r in runs],
        "inputs": [r.spec if isinstance(r.spec, str) else {repr(a): b for a, b in r.spec.items()} for r in runs],
        "lrs": [r.lr for r in runs],
        "step_size": step_size,
        "gamma": float(gamma),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
    }

    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        if (ckpt / "state.json").exists():
            if not resume:
                raise FileExistsError(
                    f"{ckpt} already holds a checkpoint; pass resume=True to continue it or choose another checkpoint_dir"
                )
            start_epoch = _load_checkpoint(ckpt, runs, config, device)
        ckpt.mkdir(parents=True, exist_ok=True)

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        active = [r for r in runs if not r.diverged]
        for r in runs:
            r.head.train()
        # Linear heads on one feature train as one bank (rebuilt each epoch: diverged heads drop out).
        groups, single = _fusable_groups([(r, r.head, r.spec) for r in active]) if fuse else ([], active)
        banks = [_TrainBank(g, device, momentum, weight_decay) for g in groups]
        loss_sum = {id(r): torch.zeros((), dtype=torch.float64, device=device) for r in single}
        correct = {id(r): torch.zeros((), dtype=torch.int64, device=device) for r in single}
        seen = {id(r): 0 for r in active}
        train_stream.set_epoch(epoch)
        for xs, y in train_stream:
            y = y.to(device, non_blocking=True)
            feats = {n: xs[n].to(device, non_blocking=True) for n in names}  # one copy per feature, shared
            batch = int(y.shape[0])
            for bank in banks:
                bank.step(feats[bank.spec], y)
            for r in single:
                if r.needs_pairs and batch < 2:
                    continue  # BatchNorm cannot normalise a single sample in training mode
                logits = r.head(_gather(r.spec, feats))
                loss = F.cross_entropy(logits, y)
                r.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                r.optimizer.step()
                # Accumulated as tensors: no host sync per batch (matters on GPU).
                loss_sum[id(r)] += loss.detach().double() * batch
                correct[id(r)] += (logits.detach().argmax(1) == y).sum()
                seen[id(r)] += batch
        for bank in banks:
            bank.write_back()
            for j, r in enumerate(bank.runs):
                loss_sum[id(r)], correct[id(r)], seen[id(r)] = bank.loss_sum[j], bank.correct_sum[j], bank.seen
        if not any(seen.values()) and active:
            raise ValueError("training stream yielded no samples")
        for r in active:
            r.scheduler.step()
        val = _evaluate_runs(runs, val_stream, device, fuse) if val_stream is not None else {}
        rows: dict[K, dict[str, float | None]] = {}
        for r in runs:
            row: dict[str, float | None] = {"epoch": float(epoch), "lr": r.optimizer.param_groups[0]["lr"]}
            if r in active and seen[id(r)]:
                train_loss = float(loss_sum[id(r)]) / seen[id(r)]
                row["train_accuracy"] = int(correct[id(r)]) / seen[id(r)]
                if math.isfinite(train_loss):
                    row["train_loss"] = train_loss
                else:
                    row["train_loss"] = None  # recorded as null (JSON has no NaN)
                    r.diverged = True  # its weights are garbage now; earlier best weights stay valid
            else:
                row["train_loss"] = row["train_accuracy"] = None
            if val:
                v_loss, v_acc = val[id(r)]
                row["val_loss"], row["val_accuracy"] = v_loss, v_acc
                if not r.diverged and v_acc > r.best_val_accuracy:
                    r.best_val_accuracy, r.best_val_loss, r.best_epoch = v_acc, v_loss, epoch
                    r.best_state = _clone_state(r.head)
            row["diverged"] = float(r.diverged)
            r.history.append(row)
            rows[r.key] = row
        if ckpt is not None:
            _save_checkpoint(ckpt, runs, config, epoch + 1)
        if progress:
            _print_progress(epoch, epochs, runs, rows, time.perf_counter() - t0)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rows)

    # Early selection: restore the best validation epoch's weights.
    for r in runs:
        if r.best_state is not None:
            r.head.load_state_dict(r.best_state)
        elif val_stream is None:
            r.best_epoch = epochs - 1 if not r.diverged else None
    test = _evaluate_runs(runs, test_stream, device, fuse) if test_stream is not None else {}
    results: dict[Hashable, HeadResult] = {}
    for r in runs:
        results[r.key] = HeadResult(
            key=r.key, input=r.spec, lr=r.lr, epochs_trained=len(r.history), best_epoch=r.best_epoch,
            val_accuracy=r.best_val_accuracy if r.best_state is not None else None,
            val_loss=r.best_val_loss if r.best_state is not None else None,
            test_accuracy=test[id(r)][1] if test else None, test_loss=test[id(r)][0] if test else None,
            diverged=r.diverged, history=r.history,
        )
    best_per_input: dict[str, Hashable] = {}
    best: Hashable | None = None
    if val_stream is not None:
        def rank(k: Hashable) -> tuple[float, float]:
            res = results[k]
            return (res.val_accuracy if res.val_accuracy is not None else -1.0,
                    -(res.val_loss if res.val_loss is not None else math.inf))
        for r in runs:  # the first head wins ties: iteration order is the caller's order
            label = _input_label(r.spec)
            if label not in best_per_input or rank(r.key) > rank(best_per_input[label]):
                best_per_input[label] = r.key
            if best is None or rank(r.key) > rank(best):
                best = r.key
    return SweepResult(results, best_per_input, best, time.perf_counter() - started)


def _evaluate_runs(runs: list[_Run], stream: BatchStream, device: torch.device, fuse: bool) -> dict[int, tuple[float, float]]:
    return evaluate({id(r): r.head for r in runs}, {id(r): r.spec for r in runs}, stream, device, fuse=fuse)


def _print_progress(epoch: int, epochs: int, runs: list[_Run], rows: Mapping[Any, dict[str, float | None]], seconds: float) -> None:
    parts = [f"epoch {epoch + 1}/{epochs}"]
    if len(runs) > 1:
        parts.append(f"{len(runs)} heads")
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
    parts.append(f"{seconds:.1f}s")
    print(" | ".join(parts), file=sys.stderr, flush=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a diverged loss is recorded as null
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _save_checkpoint(directory: Path, runs: list[_Run], config: dict[str, Any], epochs_done: int) -> None:
    tensors: dict[str, torch.Tensor] = {}
    heads_meta = []
    for i, r in enumerate(runs):
        for name, t in r.head.state_dict().items():
            tensors[f"h{i}.model.{name}"] = t.detach().cpu().contiguous().clone()
        if r.best_state is not None:
            for name, t in r.best_state.items():
                tensors[f"h{i}.best.{name}"] = t.detach().cpu().contiguous().clone()
        opt = r.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for pid, pstate in opt["state"].items():
            for name, v in pstate.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"h{i}.optim.{pid}.{name}"] = v.detach().cpu().contiguous().clone()
                else:
                    opt_scalars.setdefault(str(pid), {})[name] = v
        heads_meta.append({
            "key": repr(r.key),
            "best_epoch": r.best_epoch,
            "best_val_accuracy": r.best_val_accuracy if r.best_state is not None else None,
            "best_val_loss": r.best_val_loss if r.best_state is not None else None,
            "diverged": r.diverged,
            "history": r.history,
            "optimizer": {"param_groups": opt["param_groups"], "state_scalars": opt_scalars},
            "scheduler": r.scheduler.state_dict(),
        })
    name = f"state-{epochs_done:04d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "epochs_done": str(epochs_done)})
    os.replace(tmp, directory / name)
    meta = {"format": CHECKPOINT_FORMAT, "epochs_done": epochs_done, "tensors": name, "config": config, "heads": heads_meta}
    tmp_json = directory / "state.json.tmp"
    tmp_json.write_text(json.dumps(_json_safe(meta), indent=1))
    os.replace(tmp_json, directory / "state.json")  # the commit point: state.json always names a complete file
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_checkpoint(directory: Path, runs: list[_Run], config: dict[str, Any], device: torch.device) -> int:
    meta = json.loads((directory / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / 'state.json'} is not a {CHECKPOINT_FORMAT} checkpoint")
    saved = meta["config"]
    for field in config:
        if _json_safe(config[field]) != saved.get(field):
            raise ValueError(
                f"cannot resume from {directory}: {field} differs (checkpoint {saved.get(field)!r}, now {config[field]!r})"
            )
    tensors = load_file(str(directory / meta["tensors"]))
    for i, (r, hm) in enumerate(zip(runs, meta["heads"])):
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        r.head.load_state_dict(part(f"h{i}.model."))
        best = part(f"h{i}.best.")
        r.best_state = {k: v.to(device) for k, v in best.items()} if best else None
        r.best_epoch = hm["best_epoch"]
        r.best_val_accuracy = hm["best_val_accuracy"] if hm["best_val_accuracy"] is not None else -math.inf
        r.best_val_loss = hm["best_val_loss"] if hm["best_val_loss"] is not None else math.inf
        r.diverged = bool(hm["diverged"])
        r.history = hm["history"]
        state: dict[int, dict[str, Any]] = {}
        for key, t in part(f"h{i}.optim.").items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = t.to(device)
        for pid, scalars in hm["optimizer"]["state_scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        r.optimizer.load_state_dict({"state": state, "param_groups": hm["optimizer"]["param_groups"]})
        r.scheduler.load_state_dict(hm["scheduler"])
    return int(meta["epochs_done"])
