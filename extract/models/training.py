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
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extract.diffusion import NoiseSchedule
from extract.models.adm import ADMUNet
from extract.models.checkpoints import read_state_dict

STATE_FILE = "train_state.json"


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

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise ValueError(f"autocast must be auto, bfloat16 or none, got {self.autocast!r}")


def _cpu_has_fast_bf16() -> bool:
    """AMX / AVX512-BF16 make bf16 matmuls ~3x faster than fp32 on the CPU; elsewhere bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "none":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_fast_bf16() else None


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)


def _step_rng(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) % (2**63))
    return g


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of step's batch: epochs are seeded permutations, so the order survives a resume."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def _lr_at(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    # cosine decay to 10% keeps late steps from undoing the EMA's averaging
    progress = step / max(1, cfg.steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(out: Path, model: ADMUNet, ema: EMA, opt: torch.optim.Optimizer, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "online.safetensors.tmp"))
    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(out / "ema.safetensors.tmp"))
    opt_tensors = {f"{pid}.{name}": value.contiguous()
                   for pid, state in opt.state_dict()["state"].items()
                   for name, value in state.items() if isinstance(value, torch.Tensor)}
    save_file(opt_tensors, str(out / "optimizer.safetensors.tmp"))
    # Rename after all three are complete so a crash mid-save leaves the previous checkpoint intact.
    for name in ("online", "ema", "optimizer"):
        (out / f"{name}.safetensors.tmp").replace(out / f"{name}.safetensors")
    (out / (STATE_FILE + ".tmp")).write_text(json.dumps(record, indent=1))
    (out / (STATE_FILE + ".tmp")).replace(out / STATE_FILE)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = read_state_dict(path) if path.is_file() else {}
    sd = opt.state_dict()
    for pid in range(len(sd["param_groups"][0]["params"])):
        keys = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(pid)}
        if keys:
            sd["state"][pid] = keys
    opt.load_state_dict(sd)


def train(images: torch.Tensor, cfg: TrainConfig, out_dir: str | Path,
          log: Callable[[str], None] = print, progress: bool = True, until_step: int | None = None) -> dict[str, Any]:
    """Train on `images` (N, 3, H, W) float32 in [-1, 1]; resumes from `out_dir` when it holds a run.

    `until_step` stops early (after checkpointing) without changing the run's config, so a later call
    continues the same trajectory: time-boxed sessions give the same weights as one long run.
    """
    out = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cpu")
    amp = autocast_dtype(cfg.autocast, device)
    torch.manual_seed(cfg.seed)
    model = ADMUNet.from_flags(**cfg.flags).to(device).train()
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    if images.shape[1:] != (3, model.config.image_size, model.config.image_size):
        raise ValueError(f"images must be (N, 3, {model.config.image_size}, {model.config.image_size}), "
                         f"got {tuple(images.shape)}")
    schedule = NoiseSchedule.from_flags(cfg.noise_schedule, cfg.diffusion_steps)
    sqrt_ab = torch.from_numpy(schedule.sqrt_alphas_cumprod).float()
    sqrt_1mab = torch.from_numpy(schedule.sqrt_one_minus_alphas_cumprod).float()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMA(model, cfg.ema_decay)
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "step": 0, "losses": [], "wall_seconds": 0.0,
                              "autocast": str(amp).replace("torch.", "") if amp else "none",
                              "num_images": int(len(images))}
    if (out / STATE_FILE).is_file():
        prev = json.loads((out / STATE_FILE).read_text())
        if prev["config"] != record["config"]:
            changed = sorted(k for k in record["config"] if prev["config"].get(k) != record["config"][k])
            raise ValueError(f"{out} holds a run with a different config (differs in: {', '.join(changed)}); "
                             f"use another output directory")
        model.load_state_dict(read_state_dict(out / "online.safetensors"))
        ema.shadow = {k: v.float() for k, v in read_state_dict(out / "ema.safetensors").items()}
        _load_optimizer(opt, out / "optimizer.safetensors")
        record = prev
        log(f"resuming from step {record['step']} of {cfg.steps}")

    n = len(images)
    start_step, started = record["step"], time.time()
    wall_before = record["wall_seconds"]
    window: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)
    stop = cfg.steps if until_step is None else min(cfg.steps, until_step)
    for step in range(start_step, stop):
        g = _step_rng(cfg.seed, step)
        idx = torch.from_numpy(_batch_indices(n, cfg.batch_size, cfg.seed, step))
        x0 = images[idx]
        if cfg.hflip:
            flip = torch.rand(len(idx), generator=g) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, cfg.diffusion_steps, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * noise
        x_t = x_t.contiguous(memory_format=layout)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = model(x_t, t)
        loss = F.mse_loss(pred.float()[:, :3], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        window.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(window[-100:]):.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == stop:
            record["losses"].append([done, float(np.mean(window))])
            window = []
            record["step"] = done
            record["wall_seconds"] = wall_before + time.time() - started
            _save(out, model, ema, opt, record)
            if bar is None:
                log(f"step {done}/{cfg.steps} loss {record['losses'][-1][1]:.4f}")
    if bar is not None:
        bar.close()
    return record


def ema_model(out_dir: str | Path, flags: dict[str, Any]) -> ADMUNet:
    """The EMA weights of a training run as an eval-mode network."""
    model = ADMUNet.from_flags(**flags)
    model.load_state_dict(read_state_dict(Path(out_dir) / "ema.safetensors"))
    return model.eval()


def export_ema(out_dir: str | Path, path: str | Path, name: str, command: str = "") -> Path:
    """Write a run's EMA weights as safetensors plus the JSON card that `registry` reads."""
    from safetensors.torch import save_file

    out_dir, path = Path(out_dir), Path(path)
    record = json.loads((out_dir / STATE_FILE).read_text())
    cfg = record["config"]
    weights = {k: v.contiguous() for k, v in read_state_dict(out_dir / "ema.safetensors").items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"name": name, "format": "guided-diffusion state dict (EMA)"})
    card = {
        "name": name,
        "flags": cfg["flags"],
        "noise_schedule": cfg["noise_schedule"],
        "diffusion_steps": cfg["diffusion_steps"],
        "objective": "DDPM epsilon-prediction (MSE), uniform t",
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
