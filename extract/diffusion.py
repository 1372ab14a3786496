"""Noise schedules and forward noising, as guided-diffusion defines them, plus seeded noise.

Timesteps are 0-based indices of the T-step process (alpha_bar_0 = 0.9999 for the linear schedule);
the model receives that raw integer. Schedules are float64; the q_sample coefficients are cast to
float32 per sample, which is what the reference's `_extract_into_tensor` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(steps: int) -> np.ndarray:
    scale = 1000 / steps  # keeps the schedule's shape when T != 1000
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
        dtype=np.float64,
    )


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM schedule: betas and their cumulative products, in float64."""

    name: str
    betas: np.ndarray

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-d array in (0, 1]")
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_flags(cls, noise_schedule: str = "linear", diffusion_steps: int = 1000) -> NoiseSchedule:
        if diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be positive, got {diffusion_steps}")
        if noise_schedule == "linear":
            return cls("linear", linear_betas(diffusion_steps))
        if noise_schedule == "cosine":
            return cls("cosine", cosine_betas(diffusion_steps))
        raise ValueError(f"unknown noise_schedule {noise_schedule!r}; choose one of {', '.join(SCHEDULES)}")

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod)

    def check_timesteps(self, t: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        values = np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t).reshape(-1)
        bad = [int(v) for v in values if not 0 <= int(v) < self.num_steps or int(v) != v]
        if bad:
            raise ValueError(
                f"timestep(s) {sorted(set(bad))} outside [0, {self.num_steps}): t is the 0-based index "
                f"of the {self.num_steps}-step process"
            )

    def _coef(self, table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        out = torch.from_numpy(table).to(t.device)[t].float()
        return out.reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with t per sample (or one int for all)."""
        if not isinstance(t, torch.Tensor):
            t = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        t = t.to(device=x0.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        self.check_timesteps(t)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        a = self._coef(self.sqrt_alphas_cumprod, t, x0.ndim)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        return a * x0 + s * noise


def noise_seed(seed: int, sample_index: int, timestep: int, draw: int) -> int:
    """A 64-bit seed for one (global seed, sample, timestep, draw): independent of batching and order."""
    key = f"diffbank-noise/{int(seed)}/{int(sample_index)}/{int(timestep)}/{int(draw)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def seeded_noise(
    seed: int, sample_indices: Sequence[int], timestep: int, draw: int, shape: Sequence[int]
) -> torch.Tensor:
    """Standard normal noise, one seeded stream per sample: row i depends only on its own key.

    Drawn on the CPU in float32 so the bytes do not depend on the device that consumes them.
    """
    out = torch.empty((len(sample_indices), *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for row, index in enumerate(sample_indices):
        gen.manual_seed(noise_seed(seed, index, timestep, draw))
        out[row] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out
