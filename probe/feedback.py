"""DifFeed: the paper's feedback head, trained with the frozen U-Net in the loop.

This is the one probe that runs the U-Net (everything else in `probe` reads stores only), because its input
is not a cacheable feature: pass 2 depends on the feedback layers being trained.

Mechanics (docs: /work/shared/PAPER.md), at one timestep t (the paper's 150):
- pass 1, without gradients, gives the decoder outputs of the feedback blocks;
- each feedback block b has a layer Conv1x1 (no bias) + BatchNorm + ReLU mapping its map to the channels of
  its skip partner, the encoder block `num_blocks + 1 - b` (38 - b on the 256 models);
- pass 2 runs with each layer's output added to its partner's output (the sum is also what the skip carries,
  see `ADMUNet.features(additions=...)`), and an `AttentionPoolHead` reads the read block of pass 2.
Only the feedback layers and the head train; the U-Net is frozen (no parameter needs a gradient, so none gets a
`.grad`), while gradients flow through its pass-2 activations back to the feedback layers.

Default blocks, for any ADM configuration (R = num_res_blocks, L = len(channel_mult)): one feedback per
resolution level, namely the decoder block whose skip comes from the first ResBlock of each encoder level
(encoder blocks 2 + l (R + 1), l = 0..L-1); the read block is the second-deepest of them (the deepest when
L = 1). On the 256 models (R = 2, L = 6) this gives the paper's lists exactly: feedback {21, 24, 27, 30, 33, 36}
into {17, 14, 11, 8, 5, 2}, read block 24. On the embedded Fashion-MNIST model (19 blocks): {12, 15, 18} into
{8, 5, 2}, read block 15.

Noise: training epoch e draws the noise of draw e, evaluation always draw 0, each keyed by (seed, sample key, t,
draw) with `extract.diffusion.seeded_noise`; so every epoch sees fresh noise, a rerun is exact, and draw 0 is
the noise an extraction with the same seed stores. With no feedback blocks the same trainer is the plain attention
head on live U-Net features (the paper's protocol, noise as augmentation): the baseline DifFeed is compared with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from extract.diffusion import NoiseSchedule, seeded_noise
from extract.models.adm import ADMUNet
from probe.data import default_memory_budget, stratified_holdout
from probe.heads import AttentionPoolHead

__all__ = [
    "CHECKPOINT_FORMAT",
    "DifFeed",
    "FeedbackRecipe",
    "ImageSet",
    "activation_bytes_per_sample",
    "default_feedback_blocks",
    "default_read_block",
    "feedback_parameter_count",
    "skip_partner",
    "train_feedback",
    "validation_split",
]

log = logging.getLogger("probe.feedback")

CHECKPOINT_FORMAT = "diffbank-difffeed-checkpoint/1"
EVAL_DRAW = 0
_KEY_VAL = 12  # probe.data's key for a carved validation split: the same seed carves the same rows


# ---------------------------------------------------------------------------------------------- blocks


def _encoder_size(unet: ADMUNet) -> int:
    return len(unet.input_blocks)


def skip_partner(unet: ADMUNet, block: int) -> int:
    """The encoder block whose output decoder block `block` takes as its skip (38 - b on the 256 models)."""
    number = unet.block_info(block).number
    if number <= _encoder_size(unet) + 1:
        raise ValueError(f"block {number} is not a decoder block (decoder blocks: {_encoder_size(unet) + 2}..)")
    return unet.num_blocks + 1 - number


def default_feedback_blocks(unet: ADMUNet) -> list[int]:
    """One decoder block per resolution level: the one fed by the first ResBlock of each encoder level."""
    cfg = unet.config
    firsts = [2 + level * (cfg.num_res_blocks + 1) for level in range(len(cfg.channel_mult))]
    return sorted(unet.num_blocks + 1 - p for p in firsts)


def default_read_block(unet: ADMUNet) -> int:
    """The paper's block 24 on the 256 models: the second-deepest default feedback block."""
    blocks = default_feedback_blocks(unet)
    return blocks[1] if len(blocks) > 1 else blocks[0]


def _feedback_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


def feedback_parameter_count(unet: ADMUNet, feedback_blocks: Sequence[int] | None = None) -> int:
    """Trainable parameters of the feedback layers alone (about 2.8M for the 256 models' defaults)."""
    blocks = default_feedback_blocks(unet) if feedback_blocks is None else feedback_blocks
    total = 0
    for b in blocks:
        c_in, c_out = unet.block_info(b).channels, unet.block_info(skip_partner(unet, b)).channels
        total += c_in * c_out + 2 * c_out
    return total


# ---------------------------------------------------------------------------------------------- module


class DifFeed(nn.Module):
    """Feedback layers + attention head around a frozen U-Net; `forward(x_t, t)` gives logits.

    The U-Net is held but not registered as a submodule, so `parameters()`, `state_dict()` and checkpoints hold
    only what trains; move it with `.unet.to(device)` (the trainer does). `feedback_blocks=()` gives the plain
    attention head on the read block (one pass, no feedback).
    """

    def __init__(
        self,
        unet: ADMUNet,
        num_classes: int,
        feedback_blocks: Sequence[int] | None = None,
        read_block: int | None = None,
        tokens: int = 16,
        dim: int = 1024,
        heads: int = 8,
        depth: int = 2,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "unet", unet)  # bypasses nn.Module registration on purpose (see above)
        unet.eval().requires_grad_(False)
        blocks = default_feedback_blocks(unet) if feedback_blocks is None else feedback_blocks
        self.feedback_blocks = sorted({unet.block_info(b).number for b in blocks})
        self.read_block = unet.block_info(default_read_block(unet) if read_block is None else read_block).number
        if tokens < 1:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        self.tokens = int(tokens)
        # The head first: under one seed it starts with the same weights whatever the feedback, so DifFeed and
        # its no-feedback baseline are paired from the first step.
        info = unet.block_info(self.read_block)
        side = min(self.tokens, info.resolution)
        self.head = AttentionPoolHead(
            (info.channels, side, side), num_classes, dim=dim, heads=heads, depth=depth, final_norm=final_norm
        )
        self.partners: dict[int, int] = {}
        layers = {}
        for b in self.feedback_blocks:
            p = skip_partner(unet, b)
            src, dst = unet.block_info(b), unet.block_info(p)
            if src.resolution != dst.resolution:
                raise ValueError(
                    f"feedback block {b} ({src.resolution}x{src.resolution}) and its partner {p} "
                    f"({dst.resolution}x{dst.resolution}) differ in resolution"
                )
            if p >= self.read_block:
                raise ValueError(
                    f"feedback block {b} feeds block {p}, which is not before the read block {self.read_block}"
                )
            self.partners[b] = p
            layers[str(b)] = _feedback_layer(src.channels, dst.channels)
        self.feedback = nn.ModuleDict(layers)

    def train(self, mode: bool = True) -> DifFeed:
        super().train(mode)
        self.unet.eval()  # dropout (LSUN models) stays off whatever the head's mode
        return self

    def additions(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[int, torch.Tensor]:
        """Pass 1 (no gradient) and the feedback layers: {encoder block: tensor to add in pass 2}."""
        if not self.feedback_blocks:
            return {}
        with torch.no_grad():
            decoded = self.unet.features(x_t, t, self.feedback_blocks)
        return {self.partners[b]: self.feedback[str(b)](decoded[b]) for b in self.feedback_blocks}

    def read(self, x_t: torch.Tensor, t: torch.Tensor, additions: Mapping[int, torch.Tensor] | None) -> torch.Tensor:
        """Pass 2's read-block map, average-pooled to at most tokens x tokens."""
        if additions:
            h = self.unet.features(x_t, t, [self.read_block], additions=additions)[self.read_block]
        else:
            with torch.no_grad():  # nothing before the head trains: keep no graph
                h = self.unet.features(x_t, t, [self.read_block])[self.read_block]
        if h.shape[-1] > self.tokens or h.shape[-2] > self.tokens:
            h = F.adaptive_avg_pool2d(h, (min(self.tokens, h.shape[-2]), min(self.tokens, h.shape[-1])))
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.read(x_t, t, self.additions(x_t, t)))

    def describe(self) -> dict[str, Any]:
        return {
            "feedback_blocks": self.feedback_blocks,
            "skip_partners": {str(b): p for b, p in self.partners.items()},
            "read_block": self.read_block,
            "tokens": self.tokens,
            "feedback_parameters": sum(p.numel() for p in self.feedback.parameters()),
            "head_parameters": sum(p.numel() for p in self.head.parameters()),
        }


def activation_bytes_per_sample(model: DifFeed, t: int = 150) -> int:
    """Bytes autograd saves for backward, per sample, in one training forward (shapes only, on the meta device).

    The U-Net's weights are not copied: a meta twin of the same configuration runs with meta copies of the
    trainable layers. This is the part of a step's memory that grows with the micro-batch.
    """
    with torch.device("meta"):
        twin_unet = ADMUNet(model.unet.config)
        twin = DifFeed(
            twin_unet,
            model.head.classifier.out_features,
            model.feedback_blocks,
            model.read_block,
            model.tokens,
            dim=model.head.classifier.in_features,
            heads=_heads_of(model),
            depth=len(model.head.encoder.blocks),
        )
    size = model.unet.config.image_size
    x = torch.zeros(1, model.unet.config.in_channels, size, size, device="meta")
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Weights are not activations; a tensor several ops save is stored once (the graph keeps it alive,
        # so its id is unique during the forward).
        if not isinstance(tensor, nn.Parameter):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = twin.train()(x, torch.full((1,), int(t), device="meta"))
    del logits
    return sum(seen.values())


def _heads_of(model: DifFeed) -> int:
    blocks = model.head.encoder.blocks
    return blocks[0].attn.heads if len(blocks) else 1


# ---------------------------------------------------------------------------------------------- data


class ImageSet:
    """Labelled images by key: `load(keys) -> float32 (n, 3, H, W)` in [-1, 1].

    `keys` are the samples' global indices (in the source), which also key their noise, so a sample keeps its
    noise whatever subset or order it is used in.
    """

    def __init__(self, labels: np.ndarray, keys: np.ndarray, load: Callable[[np.ndarray], Any]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)
        if self.labels.shape != self.keys.shape or self.labels.ndim != 1:
            raise ValueError(f"labels {self.labels.shape} and keys {self.keys.shape} must be equal 1-d arrays")
        self._load = load

    @classmethod
    def from_array(
        cls, images: np.ndarray | torch.Tensor, labels: np.ndarray, keys: np.ndarray | None = None
    ) -> ImageSet:
        """Images already preprocessed, float32 (N, 3, H, W); `keys` default to their row numbers."""
        array = torch.as_tensor(images, dtype=torch.float32)
        keys = np.arange(len(array)) if keys is None else np.asarray(keys, dtype=np.int64)
        position = {int(k): i for i, k in enumerate(keys)}
        return cls(labels, keys, lambda ks: array[torch.as_tensor([position[int(k)] for k in ks])])

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> ImageSet:
        positions = np.asarray(positions, dtype=np.int64)
        return ImageSet(self.labels[positions], self.keys[positions], self._load)

    def images(self, positions: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self._load(self.keys[np.asarray(positions, dtype=np.int64)]), dtype=torch.float32)

    def digest(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.keys).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()[:16]


def validation_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): a seeded, stratified `fraction` of `data` held out for selection."""
    positions = np.arange(len(data), dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _KEY_VAL]))
    kept, held = stratified_holdout(positions, data.labels, fraction, rng)
    return data.subset(kept), data.subset(held)


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class FeedbackRecipe:
    """Everything that decides the numbers; the defaults are the paper's DifFeed recipe."""

    t: int = 150
    epochs: int = 28
    batch_size: int = 16  # the effective batch: micro-batches accumulate up to it
    lr: float = 1e-2
    momentum: float = 0.0
    weight_decay: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


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
    from tqdm.auto import tqdm

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
        bar = tqdm(
            total=len(order),
            desc=f"{'difffeed' if model.feedback_blocks else 'attention'} epoch {epoch + 1}/{recipe.epochs}",
            unit="img",
            disable=not progress,
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
        "noise": f"training epoch e uses draw e, evaluation draw {EVAL_DRAW}; seeded per (seed, sample, t, draw)",
        "num_train": len(train),
        "num_val": len(val),
        "num_test": len(test) if test is not None else 0,
        "history": history,
        "best_epoch": best_epoch,
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
