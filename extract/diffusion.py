"""Noise schedules and forward noising, as guided-diffusion defines them, plus seeded noise.

Timesteps are 0-based indices of the T-step process (alpha_bar_0 = 0.9999 for the linear schedule);
the model receives that raw integer. Schedules are float64; the q_sample coefficients are cast to
float32 per sample, which is what the reference's `_extract_into_tensor` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")
DIFFUSERS_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # beta_schedule of a scheduler config


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

    @classmethod
    def for_model(
        cls, noise_schedule: str, diffusion_steps: int, scheduler: Mapping[str, Any] | None = None
    ) -> NoiseSchedule:
        """A model's schedule: its diffusers scheduler config where it has one, else the named schedule."""
        if scheduler is not None:
            return cls.from_scheduler_config(scheduler)
        return cls.from_flags(noise_schedule, diffusion_steps)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """The training schedule of a diffusers scheduler config (DDPMScheduler and its kin), with the
        betas computed as diffusers computes them (float32, then widened)."""
        if config.get("beta_schedule") is None and config.get("trained_betas") is None:
            raise ValueError(
                f"the scheduler ({config.get('_class_name', 'unnamed')}) has no beta_schedule or trained_betas: "
                f"diffbank noises images with a discrete DDPM schedule"
            )
        steps = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
            if len(betas) != steps:
                raise ValueError(f"trained_betas has {len(betas)} values for num_train_timesteps={steps}")
            return cls("trained_betas", betas.double().numpy())
        kind = config["beta_schedule"]
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = torch.tensor(cosine_betas(steps), dtype=torch.float32)
        else:
            raise ValueError(
                f"unsupported beta_schedule {kind!r}; choose one of {', '.join(DIFFUSERS_SCHEDULES)} or trained_betas"
            )
        return cls(kind, betas.double().numpy())

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
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        if isinstance(t, torch.Tensor):
            t = t.to(device=x0.device, dtype=torch.long)
            if t.ndim == 0:
                t = t.expand(x0.shape[0])
            self.check_timesteps(t)
            a = self._coef(self.sqrt_alphas_cumprod, t, x0.ndim)
            s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
        else:
            self.check_timesteps([t])  # on the host: no device round trip for one int
            # The same float64 -> float32 cast of the coefficients as `_coef`.
            a, s = (
                torch.tensor(np.float32(table[int(t)]), device=x0.device)
                for table in (self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
            )
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


# splitmix64's increment and finaliser constants, as signed int64 (torch has no uint64 arithmetic).
def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _xor_shifted(z: torch.Tensor, bits: int, scratch: torch.Tensor) -> torch.Tensor:
    """z ^= z >>> bits, in place (torch's >> on int64 is arithmetic: the mask makes it logical)."""
    torch.bitwise_right_shift(z, bits, out=scratch)
    return z.bitwise_xor_(scratch.bitwise_and_((1 << (64 - bits)) - 1))


def counter_noise(
    seed: int,
    sample_indices: Sequence[int],
    timestep: int,
    draw: int,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise from a counter-based rule, computed on `device` with no generator state.

    Element j of sample i is splitmix64(key_i + (j + 1) * golden), key_i = `noise_seed` of (seed, i, t,
    draw); 24 bits make u1 in (0, 1], 24 more u2 in [0, 1), and Box-Muller gives
    sqrt(-2 ln u1) cos(2 pi u2). Row i depends only on its key, so batches, order and workers do not
    matter; the transcendentals are float32, so CPU and CUDA agree to an ulp or so, not bit for bit.
    In place throughout: on a CPU it costs about 9 ms per 3x256x256 image (the generator rule ~1.5).
    """
    device = torch.device(device)
    keys = torch.tensor([noise_seed(seed, i, timestep, draw) for i in sample_indices], dtype=torch.int64)
    count = math.prod(shape)
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_GOLDEN).unsqueeze(0)
    z = z + keys.to(device).unsqueeze(1)  # int64 sums and products wrap mod 2**64 on CPU and CUDA alike
    scratch = torch.empty_like(z)
    _xor_shifted(z, 30, scratch).mul_(_MIX1)
    _xor_shifted(z, 27, scratch).mul_(_MIX2)
    _xor_shifted(z, 31, scratch)
    u1 = torch.bitwise_right_shift(z, 40, out=scratch).bitwise_and_((1 << 24) - 1).add_(1).float().mul_(2.0**-24)
    u2 = torch.bitwise_right_shift(z, 16, out=scratch).bitwise_and_((1 << 24) - 1).float().mul_(2.0**-24)
    normal = u1.log_().mul_(-2.0).sqrt_().mul_(u2.mul_(2 * math.pi).cos_())
    return normal.reshape(len(sample_indices), *shape)


def noise_for(
    rule: str,
    seed: int,
    sample_indices: Sequence[int],
    timestep: int,
    draw: int,
    shape: Sequence[int],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A spec's `noise.rule` on `device`: `generator` draws on the CPU and copies, `counter` draws there."""
    if rule == "generator":
        return seeded_noise(seed, sample_indices, timestep, draw, shape).to(device, non_blocking=True)
    if rule == "counter":
        return counter_noise(seed, sample_indices, timestep, draw, shape, device)
    raise ValueError(f"unknown noise rule {rule!r}; choose generator or counter")
