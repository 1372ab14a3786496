"""The compute of one micro-batch: seeded noise, one U-Net forward per (timestep, draw, view) that serves
every requested block and stops after the deepest, the mean over draws (or each draw on its own, for
`combine: separate`), then pooling.

The horizontally flipped view mirrors the centre view's noised input x_t (same noise, mirrored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import torch

from extract.diffusion import NoiseSchedule, seeded_noise
from extract.pooling import pool
from extract.spec import Spec
from extract.store import FeatureInfo


class ExtractionError(RuntimeError):
    """A run that must stop (strict mode met a bad image, the writer failed, ...).

    `resumable` is True when the store holds this run's finished units and rerunning the same
    command continues from them (after fixing the cause); False when a rerun would start from scratch.
    """

    def __init__(self, message: str, *, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C while units were being computed: the finished ones are in the store."""


def resolve_device(name: str | None) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU."""
    name = name or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExtractionError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


@dataclasses.dataclass
class UnitJob:
    unit: int
    features: list[FeatureInfo]

    @property
    def timesteps(self) -> list[int]:
        return sorted({f.t for f in self.features})

    def blocks_at(self, t: int) -> list[int]:
        return sorted({f.block for f in self.features if f.t == t})

    def views(self) -> list[str]:
        return [v for v in ("center", "flip") if any(f.view == v for f in self.features)]


class Computer:
    """Noise, forward, draw-averaging and pooling for one micro-batch; times the model alone."""

    def __init__(self, model: torch.nn.Module, spec: Spec, device: torch.device):
        self.model = model
        self.spec = spec
        self.device = device
        self.schedule = NoiseSchedule.from_flags(spec.model.noise_schedule, spec.model.diffusion_steps)
        self.model_seconds = 0.0
        self.forwards = 0
        dtype = spec.compute.dtype
        self._autocast = (
            torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, x_t: torch.Tensor, t: int, blocks: list[int]) -> dict[int, torch.Tensor]:
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=self.device)
        self._sync()
        t0 = time.perf_counter()
        with self._autocast:
            out = self.model.features(x_t.to(self.device, non_blocking=True), tt, blocks)
        out = {b: v.float() for b, v in out.items()}
        self._sync()
        self.model_seconds += time.perf_counter() - t0
        self.forwards += 1
        return out

    def compute(self, x0: torch.Tensor, indices: np.ndarray, job: UnitJob) -> dict[str, np.ndarray]:
        """Pooled float32 features of one micro-batch (images x0 of global rows `indices`), for every
        feature of the job."""
        out: dict[str, np.ndarray] = {}
        separate = self.spec.noise.combine == "separate"
        shape = tuple(x0.shape[1:])
        for t in job.timesteps:
            blocks = job.blocks_at(t)
            wanted = [f for f in job.features if f.t == t]
            # Separate draws: only the draws this job still lacks (a resumed unit may miss some);
            # averaged: every draw, since each one enters the mean.
            draws = sorted({f.draw for f in wanted}) if separate else range(self.spec.noise.draws)
            sums: dict[str, dict[int, torch.Tensor]] = {v: {} for v in job.views()}
            for i, draw in enumerate(draws):
                noise = seeded_noise(self.spec.noise.seed, indices.tolist(), t, draw, shape)
                x_t = self.schedule.q_sample(x0, t, noise)
                for view in job.views():
                    x_v = x_t if view == "center" else x_t.flip(-1)
                    feats = self.forward(x_v, t, blocks)
                    if separate:
                        for f in wanted:
                            if f.draw == draw and f.view == view:
                                out[f.name] = pool(feats[f.block], (f.pool_kind, f.pool_size)).cpu().numpy()
                        continue
                    for b, v in feats.items():
                        sums[view][b] = v if i == 0 else sums[view][b] + v
            if separate:
                continue
            for f in wanted:
                mean = sums[f.view][f.block]
                if len(draws) > 1:
                    mean = mean / len(draws)
                out[f.name] = pool(mean, (f.pool_kind, f.pool_size)).cpu().numpy()
        return out


@contextlib.contextmanager
def compute_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads for the duration of a run, restored afterwards.

    oneDNN splits some convolutions (1x1 ones among them) differently for different thread counts,
    so the float32 features, and now and then a stored float16 value, change with it: the count is
    part of what decides a store's bytes, like the micro-batch.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def configure_determinism(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: not reproducible
        torch.backends.cudnn.deterministic = True
