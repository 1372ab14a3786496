"""Training a small ADM U-Net from scratch: DDPM epsilon-prediction with EMA weights.

Used to make the embedded Fashion-MNIST model (no pretrained weights can be downloaded where diffbank
is demonstrated). The loop is resumable: a checkpoint directory holds safetensors of the online
weights, EMA weights and optimizer state, plus a JSON record of the step, the data order and the
loss curve. Each step's randomness (batch order, t, noise) is a pure function of (seed, step), so a
resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.diffusion import NoiseSchedule
from extract.hardware import cpu_has_native
from extract.models.adm import ADMUNet
from extract.progress import progress_bar
from extract.statedir import has_state, join_optimizer_state, load_state, save_state, split_optimizer_state

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    flags: dict[str, Any]
    steps: int = 20_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    hflip: bool = True
    seed: int = 0
    autocast: str = "auto"  # auto | bfloat16 | none
    checkpoint_every: int = 500
    threads: int | None = None
    channels_last: bool = False  # NHWC: faster on some CPUs and GPUs, slower on this 2-core EPYC
    # Min-SNR-gamma (Hang et al., ICCV 2023): epsilon-MSE weighted by min(SNR, gamma)/SNR, so the
    # low-noise steps, whose epsilon targets are nearly unlearnable, stop dominating the gradient.
    weighting: str = "uniform"  # uniform | min-snr
    snr_gamma: float = 5.0
    device: str = "cpu"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise ValueError(f"autocast must be auto, bfloat16 or none, got {self.autocast!r}")
        if self.weighting not in ("uniform", "min-snr"):
            raise ValueError(f"weighting must be uniform or min-snr, got {self.weighting!r}")
        if self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {self.snr_gamma}")


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "none":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native("bfloat16") else None


_Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


class EMAUpdate:
    """swa_utils' multi-tensor EMA update, with the usual warm-up of the decay over the first steps.

    The warm-up needs the update count on the host; reading AveragedModel's n_averaged (a device
    tensor) would synchronise the GPU on every step, so the update keeps its own `count`.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.count = 0

    def __call__(self, averaged: _Tensors, current: _Tensors, _num_averaged: torch.Tensor | int) -> None:
        d = min(self.decay, (1 + self.count) / (10 + self.count))
        torch._foreach_lerp_(averaged, current, 1 - d)
        self.count += 1


def _step_rng(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2**63))
    return g


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of step's batch: epochs are seeded permutations, so the order survives a resume."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        # cosine decay to 10% keeps late steps from undoing the EMA's averaging
        progress = step / max(1, cfg.steps)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def _save(
    out: Path, model: ADMUNet, ema: torch.optim.swa_utils.AveragedModel, opt: torch.optim.Optimizer, record: dict
) -> None:
    """The run's state in the project's one checkpoint format (`extract.statedir`): online and EMA weights and
    the optimizer's moments as tensors, everything else in the JSON record."""
    opt_tensors, opt_record = split_optimizer_state(opt.state_dict())
    tensors = {
        **{f"online.{k}": v for k, v in model.state_dict().items()},
        **{f"ema.{k}": v for k, v in _ema_state(ema).items()},
        **opt_tensors,
    }
    save_state(out, tensors, {**record, "optimizer": opt_record}, step=record["step"])


def _ema_state(ema: torch.optim.swa_utils.AveragedModel) -> dict[str, torch.Tensor]:
    """The averaged network's own state dict (guided-diffusion keys), float32 on the CPU."""
    return {k: v.detach().float().cpu().contiguous() for k, v in ema.module.state_dict().items()}


def _weights(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_run(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(EMA weights, record) of a training run directory."""
    tensors, record = load_state(out_dir)
    record.pop("optimizer", None)
    return _weights(tensors, "ema."), record


def snapshot_name(images_seen: int) -> str:
    return f"ema_{images_seen:09d}.safetensors"


def train(
    images: torch.Tensor,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    until_step: int | None = None,
    max_seconds: float | None = None,
    snapshot_images: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Train on `images` (N, 3, H, W) float32 in [-1, 1]; resumes from `out_dir` when it holds a run.

    `until_step` and `max_seconds` stop early (after checkpointing) without changing the run's config,
    so a later call continues the same trajectory: time-boxed runs give the same weights as one
    long run. `snapshot_images` keeps a copy of the EMA weights in `out_dir/snapshots/` each time the
    count of images seen passes one of its marks (a training-progress curve's points).
    """
    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    amp = autocast_dtype(cfg.autocast, device)
    torch.manual_seed(cfg.seed)
    model = ADMUNet.from_flags(**cfg.flags).to(device).train()
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)  # type: ignore[call-overload]  # torch's stubs omit this documented keyword
    if images.shape[1:] != (3, model.config.image_size, model.config.image_size):
        raise ValueError(
            f"images must be (N, 3, {model.config.image_size}, {model.config.image_size}), got {tuple(images.shape)}"
        )
    schedule = NoiseSchedule.from_flags(cfg.noise_schedule, cfg.diffusion_steps)
    sqrt_ab = torch.from_numpy(schedule.sqrt_alphas_cumprod).float().to(device)
    sqrt_1mab = torch.from_numpy(schedule.sqrt_one_minus_alphas_cumprod).float().to(device)
    snr = (sqrt_ab / sqrt_1mab) ** 2
    weight_of_t = snr.clamp(max=cfg.snr_gamma) / snr if cfg.weighting == "min-snr" else torch.ones_like(snr)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg))
    ema_fn = EMAUpdate(cfg.ema_decay)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn)
    forward = torch.compile(model) if cfg.compile else model
    record: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "step": 0,
        "losses": [],
        "wall_seconds": 0.0,
        "autocast": str(amp).replace("torch.", "") if amp else "none",
        "num_images": int(len(images)),
        "snapshots": [],
    }
    if has_state(out):
        tensors, prev = load_state(out)
        if prev["config"] != record["config"]:
            changed = sorted(k for k in record["config"] if prev["config"].get(k) != record["config"][k])
            raise ValueError(
                f"{out} holds a run with a different config (differs in: {', '.join(changed)}); "
                f"use another output directory"
            )
        model.load_state_dict(_weights(tensors, "online."))
        ema.module.load_state_dict(_weights(tensors, "ema."))
        ema.n_averaged.fill_(prev["step"])
        ema_fn.count = max(0, prev["step"] - 1)  # the first update copies; later ones average
        # load_state_dict moves the moments to each parameter's device (Adam's step count stays on the CPU)
        opt.load_state_dict(join_optimizer_state(tensors, prev.pop("optimizer")))
        sched.load_state_dict(prev["scheduler"])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # load_state_dict leaves the groups' lr as built
            group["lr"] = lr
        record = prev
        log.info("resuming from step %d of %d", record["step"], cfg.steps)

    data = images.to(device)
    n = len(images)
    start_step, started = record["step"], time.time()
    wall_before = record["wall_seconds"]
    loss_sum, loss_count = torch.zeros((), device=device), 0
    bar = progress_bar(total=cfg.steps, initial=start_step, unit="step", enabled=progress)
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    marks = sorted(m for m in snapshot_images if m > start_step * cfg.batch_size)
    for step in range(start_step, stop):
        g = _step_rng(cfg.seed, step, device)
        idx = torch.from_numpy(_batch_indices(n, cfg.batch_size, cfg.seed, step)).to(device)
        x0 = data[idx]
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=g, device=device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, cfg.diffusion_steps, (len(idx),), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        x_t = x_t.contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = forward(x_t, t)
        per_sample = (pred.float()[:, :3] - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight_of_t[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        loss_sum += loss.detach()
        loss_count += 1
        done = step + 1
        if not bar.disable:
            bar.update(1)
            if done % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / loss_count:.4f}")
        while marks and done * cfg.batch_size >= marks[0]:
            _save_snapshot(out, ema, marks.pop(0), done, record)
        timed_out = max_seconds is not None and time.time() - started >= max_seconds
        if done % cfg.checkpoint_every == 0 or done == stop or timed_out:
            record["losses"].append([done, loss_sum.item() / loss_count])
            loss_sum.zero_()
            loss_count = 0
            record["step"] = done
            record["wall_seconds"] = wall_before + time.time() - started
            record["scheduler"] = sched.state_dict()
            _save(out, model, ema, opt, record)
            if bar.disable:  # plain lines where no bar is drawn
                log.info("step %d/%d loss %.4f", done, cfg.steps, record["losses"][-1][1])
        if timed_out:
            log.info("stopping after %.0f s at step %d (max_seconds); rerun to continue", max_seconds, done)
            break
    bar.close()
    return record


def _save_snapshot(
    out: Path, ema: torch.optim.swa_utils.AveragedModel, mark: int, step: int, record: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    path = out / "snapshots" / snapshot_name(mark)
    save_file(_ema_state(ema), str(path), metadata={"images_seen_mark": str(mark), "step": str(step)})
    record["snapshots"].append({"file": path.name, "mark_images": mark, "step": step})


def ema_model(out_dir: str | Path, flags: dict[str, Any]) -> ADMUNet:
    """The EMA weights of a training run as an eval-mode network."""
    model = ADMUNet.from_flags(**flags)
    model.load_state_dict(load_run(out_dir)[0])
    return model.eval()


def export_ema(out_dir: str | Path, path: str | Path, name: str, command: str = "") -> Path:
    """Write a run's EMA weights as safetensors plus the JSON card that `registry` reads."""
    from safetensors.torch import save_file

    out_dir, path = Path(out_dir), Path(path)
    weights, record = load_run(out_dir)
    cfg = record["config"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"name": name, "format": "guided-diffusion state dict (EMA)"})
    card = {
        "name": name,
        "flags": cfg["flags"],
        "noise_schedule": cfg["noise_schedule"],
        "diffusion_steps": cfg["diffusion_steps"],
        "objective": (
            "DDPM epsilon-prediction, uniform t, "
            + (
                "Min-SNR-gamma weighting (gamma {:g}; Hang et al., ICCV 2023)".format(cfg["snr_gamma"])
                if cfg.get("weighting") == "min-snr"
                else "plain MSE"
            )
        ),
        "data": f"Fashion-MNIST training split ({record['num_images']} images), reference preprocessing to 32x32, "
        "grayscale as 3 channels, random horizontal flips",
        "steps": record["step"],
        "schedule_steps": cfg["steps"],
        "images_seen": record["step"] * cfg["batch_size"],
        "batch_size": cfg["batch_size"],
        "optimizer": f"AdamW lr {cfg['lr']} (warm-up {cfg['warmup_steps']}, cosine to 10%), grad clip {cfg['grad_clip']}",
        "ema_decay": cfg["ema_decay"],
        "autocast": record["autocast"],
        "wall_seconds": round(record["wall_seconds"], 1),
        "final_loss": record["losses"][-1][1],
        "loss_curve": record["losses"],
        "parameters": sum(v.numel() for v in weights.values()),
        "command": command,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    return path
