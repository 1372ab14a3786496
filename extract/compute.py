"""The compute of one micro-batch: seeded noise, one U-Net forward per (timestep, draw, view) that serves
every requested block and stops after the deepest, the mean over draws (or each draw on its own, for
`combine: separate`), then pooling.

The horizontally flipped view mirrors the centre view's noised input x_t (same noise, mirrored).

Everything after loading happens on the compute device: uint8 pixels go over once (a quarter of the
float bytes, asynchronously from pinned memory on CUDA), are scaled, noised (`noise.rule: counter`
draws the noise there too), run, pooled, and only the pooled features come back. On CUDA the model
is timed with events and the host waits once per micro-batch, for its pooled features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch

from extract.diffusion import NoiseSchedule, noise_for
from extract.pooling import pool
from extract.preprocess import batch_to_model_range
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
        return sorted({f.key.t for f in self.features})

    def blocks_at(self, t: int) -> list[int]:
        return sorted({f.key.block for f in self.features if f.t == t})

    def views(self) -> list[str]:
        return [v for v in ("center", "flip") if any(f.view == v for f in self.features)]


class Computer:
    """Noise, forward, draw-averaging and pooling for one micro-batch; times the model alone."""

    def __init__(self, model: torch.nn.Module, spec: Spec, device: torch.device, labels: np.ndarray | None = None):
        """`labels`: every row's label, for a class-conditional model given `class_label: dataset`."""
        self.model = model
        self.spec = spec
        self.device = device
        m = spec.model
        self.schedule = NoiseSchedule.for_model(m.noise_schedule, m.diffusion_steps, m.scheduler)
        # A class-conditional diffusers UNet gets the spec's fixed class, or with "dataset" each row's label.
        self.class_label = m.class_label
        if self.class_label == "dataset" and labels is None:
            raise ExtractionError("model.class_label: dataset needs the rows' labels")
        self._labels = labels
        self.model_seconds = 0.0
        self.forwards = 0
        self.compile_seconds = 0.0
        dtype = spec.compute.dtype
        self._autocast = (
            torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
        )
        self._memory_format = torch.channels_last if spec.compute.channels_last else torch.contiguous_format
        if spec.compute.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit this documented keyword
        # Compiled once per (blocks, batch shape): the first call of each pays the compile, timed apart.
        # extract.models' networks: `features(x, t, blocks)` gives the blocks' outputs keyed as requested (here by number)
        tapped = cast(Callable[..., dict[int, torch.Tensor]], model.features)
        self._features = torch.compile(tapped) if spec.compute.compile else tapped
        self._compiled: set[tuple[Any, ...]] = set()
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def class_input(self, rows: np.ndarray) -> torch.Tensor | None:
        """The class a conditional model gets for store rows `rows` (None: an unconditional model)."""
        if self.class_label is None:
            return None
        if self.class_label == "dataset":
            assert self._labels is not None
            return torch.as_tensor(self._labels[rows], dtype=torch.long, device=self.device)
        return torch.full((len(rows),), int(self.class_label), dtype=torch.long, device=self.device)

    def forward(
        self, x_t: torch.Tensor, t: int, blocks: list[int], y: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=self.device)
        x_t = x_t.contiguous(memory_format=self._memory_format)
        key = (tuple(blocks), tuple(x_t.shape))
        if self.spec.compute.compile and key not in self._compiled:
            # The first call per (blocks, batch shape) compiles: its time is compile time, not model time.
            t0 = time.perf_counter()
            out = self._run(x_t, tt, blocks, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds += time.perf_counter() - t0
            self._compiled.add(key)
        elif self.device.type == "cuda":  # events time the GPU's work without making the host wait for it
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self._run(x_t, tt, blocks, y)
            stop.record()
            self._events.append((start, stop))
        else:
            t0 = time.perf_counter()
            out = self._run(x_t, tt, blocks, y)
            self.model_seconds += time.perf_counter() - t0
        self.forwards += 1
        return out

    def _run(
        self, x_t: torch.Tensor, tt: torch.Tensor, blocks: list[int], y: torch.Tensor | None
    ) -> dict[int, torch.Tensor]:
        with self._autocast:
            out = self._features(x_t, tt, blocks) if y is None else self._features(x_t, tt, blocks, y=y)
        return {b: v.float() for b, v in out.items()}

    def _collect(self, pooled: dict[str, torch.Tensor]) -> Callable[[], dict[str, np.ndarray]]:
        """Start copying pooled features to the host; the returned function waits for them.

        On CUDA the copies go into pinned memory behind the forwards, so the host can queue the next
        micro-batch before it waits for this one: the GPU never idles between micro-batches.
        """
        if self.device.type != "cuda":
            arrays = {name: v.numpy() for name, v in pooled.items()}
            return lambda: arrays
        host = {name: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for name, v in pooled.items()}
        for name, v in pooled.items():
            host[name].copy_(v, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        events, self._events = self._events, []

        def wait() -> dict[str, np.ndarray]:
            done.synchronize()
            self.model_seconds += sum(a.elapsed_time(b) for a, b in events) / 1000
            return {name: v.numpy() for name, v in host.items()}

        return wait

    def compute(self, pixels: torch.Tensor, indices: np.ndarray, job: UnitJob) -> dict[str, np.ndarray]:
        """Pooled float32 features of one micro-batch (uint8 pixels (m, S, S, 3) of global rows
        `indices`), for every feature of the job."""
        return self.submit(pixels, indices, job)()

    def submit(
        self, pixels: torch.Tensor, indices: np.ndarray, job: UnitJob
    ) -> Callable[[], dict[str, np.ndarray]]:
        """`compute`, queued: returns a function that waits for the features (at once on a CPU)."""
        pooled: dict[str, torch.Tensor] = {}
        noise_spec = self.spec.noise
        separate = noise_spec.combine == "separate"
        x0 = batch_to_model_range(pixels.to(self.device, non_blocking=True))
        shape = tuple(x0.shape[1:])
        rows = indices.tolist()
        y = self.class_input(indices)
        for t in job.timesteps:
            blocks = job.blocks_at(t)
            wanted = [f for f in job.features if f.t == t]
            # Separate draws: only the draws this job still lacks (a resumed unit may miss some);
            # averaged: every draw, since each one enters the mean.
            draws = sorted({f.draw for f in wanted}) if separate else range(noise_spec.draws)
            sums: dict[str, dict[int, torch.Tensor]] = {v: {} for v in job.views()}
            for i, draw in enumerate(draws):
                noise = noise_for(noise_spec.rule, noise_spec.seed, rows, t, draw, shape, self.device)
                x_t = self.schedule.q_sample(x0, t, noise)
                for view in job.views():
                    x_v = x_t if view == "center" else x_t.flip(-1)
                    feats = self.forward(x_v, t, blocks, y)
                    if separate:
                        for f in wanted:
                            if f.draw == draw and f.view == view:
                                pooled[f.name] = pool(feats[f.key.block], f.key.pool)
                        continue
                    for b, v in feats.items():
                        sums[view][b] = v if i == 0 else sums[view][b] + v
            if separate:
                continue
            for f in wanted:
                mean = sums[f.view][f.key.block]
                if len(draws) > 1:
                    mean = mean / len(draws)
                pooled[f.name] = pool(mean, f.key.pool)
        return self._collect(pooled)


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


def configure_determinism(device: torch.device, deterministic: bool = True) -> None:
    """deterministic: no autotuning (it picks kernels by timing, so bytes could change run to run)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
