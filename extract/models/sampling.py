"""Sampling from an epsilon-prediction model (DDIM, eta configurable) and image grids."""

from __future__ import annotations

import numpy as np
import torch

from extract.diffusion import NoiseSchedule
from extract.models.adm import ADMUNet
from extract.progress import progress_bar


@torch.inference_mode()
def ddim_sample(
    model: ADMUNet,
    schedule: NoiseSchedule,
    n: int,
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """n images in [-1, 1] from pure noise, over `steps` evenly spaced timesteps of the schedule."""
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"steps must be in [1, {schedule.num_steps}], got {steps}")
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    x = torch.randn(n, model.config.in_channels, size, size, generator=g)
    abar = torch.from_numpy(schedule.alphas_cumprod).float()
    ts = np.linspace(0, schedule.num_steps - 1, steps).round().astype(int)[::-1]
    for i, t in enumerate(progress_bar(ts, enabled=progress, desc="sampling", unit="step")):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        eps = model(x, torch.full((n,), int(t), dtype=torch.long))[:, : model.config.in_channels]
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        noise = torch.randn(x.shape, generator=g) if i + 1 < len(ts) else torch.zeros_like(x)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps + sigma * noise
    return x.clamp(-1, 1)


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 HWC grid."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    pix = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, col = divmod(k, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = pix[k]
    return grid
