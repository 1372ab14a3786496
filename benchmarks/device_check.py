"""The prepared device check: is the U-Net right on this device, and how fast is it at the paper's sizes?

Writes one JSON file (`--out DIR`/device_check.json), rewritten atomically after every section and every arm
(`"complete": false` until the end), so a run cut short still reports what it measured. Every section and arm
records its own error instead of stopping the run. `--budget` bounds the whole call: work that would not fit
is skipped with the reason recorded, and work that overruns is cut at the budget.

Sections, most informative first:
1. correctness: guided-diffusion's reference outputs (tests/data/adm_tiny*.npz): every block and the output in
   float32 (TF32 off) to 1e-4 relative; bf16 and fp16 autocast errors against stated tolerances.
2. batch_independence: the same 8 images in one batch and in batches of 3 (max difference).
3. arms: block-24 features of the 256x256 uncond topology (random weights, 256x256 inputs, batch 64) in bf16
   (float32 on a CPU), one row per way of running it: eager, torch.compile max-autotune-no-cudagraphs, an eager
   forward captured in a CUDA graph, torch.compile reduce-overhead, compile + channels_last, and the full
   forward with a hook on block 24 (the public code's way) as the reference at equal precision. Each row: the
   setup time (compile or capture) apart from the steady-state rate, images/s, TFLOP/s from the counted
   multiply-accumulates, the share of the device's data-sheet dense bf16 peak where it is known, the features'
   error against the float32 eager reference (bf16 tolerance 5e-2 relative), the top kernels.
4. pipeline (benchmarks/device_pipeline_check.py): pixel scaling and counter noise on the device against the
   CPU, an extraction's bytes independent of --batch-size and of a SIGKILL + resume, and `diffbank extract`
   end to end on synthetic JPEGs (host pipeline included) to block 24.
5. throughput: the eager table (features to block 24, blocks 19/24/30, the hooked full forward) in fp32 / bf16
   / fp16, contiguous and channels_last; cuDNN autotuning and fused against einsum attention.

    bash benchmarks/device_check.sh --out OUT   (installs zarr/dask from .whl/ first on a bare GPU machine)

    python benchmarks/device_check.py --device cuda --out OUT [--budget S] [--sections arms,pipeline] [--arms ...]
    python benchmarks/device_check.py --device cpu --quick --out OUT   (small sizes; what the test suite runs)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.models.adm import ADMUNet
from extract.models.checkpoints import load_checkpoint
from extract.models.config import PRESETS

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rel_err(a: torch.Tensor, b: np.ndarray) -> float:
    ref = torch.from_numpy(b).double()
    return float((a.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def correctness(device: torch.device) -> dict:
    out = {}
    for name in ("adm_tiny", "adm_tiny_alt"):
        ref = np.load(DATA / f"{name}.npz")
        meta = json.loads(str(ref["meta_json"]))
        model = ADMUNet.from_flags(**meta["args"]).eval()
        load_checkpoint(model, DATA / f"{name}.pt")
        model.to(device)
        x = torch.from_numpy(ref["in/x"]).to(device)
        t = torch.from_numpy(ref["in/t"]).to(device)
        y = torch.from_numpy(ref["in/y"]).to(device) if "in/y" in ref else None
        blocks = meta["global_blocks"]
        row = {}
        for label, dtype in DTYPES.items():
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                feats = model.features(x, t, blocks, y=y)
                final = model(x, t, y=y)
            err = max(
                [rel_err(feats[b].float(), ref[f"act/{b}"]) for b in blocks] + [rel_err(final.float(), ref["act/out"])]
            )
            row[label] = {"max_rel_err": err, "tolerance": TOLERANCE[label], "ok": err <= TOLERANCE[label]}
        out[name] = row
    return out


def batch_independence(device: torch.device) -> dict:
    ref = np.load(DATA / "adm_tiny.npz")
    meta = json.loads(str(ref["meta_json"]))
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**meta["args"]).eval().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g).to(device)
    t = torch.full((8,), 90, device=device)
    block = meta["global_blocks"][len(meta["global_blocks"]) // 2]
    with torch.inference_mode():
        whole = model.features(x, t, [block])[block]
        parts = torch.cat([model.features(x[i : i + 3], t[i : i + 3], [block])[block] for i in range(0, 8, 3)])
    diff = float((whole - parts).abs().max())
    return {"block": block, "max_abs_diff": diff, "bitwise_equal": bool(torch.equal(whole, parts))}


class Timer:
    """CUDA events on a GPU (no host synchronisation inside the timed loop), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int) -> float:
        fn()  # warm-up (and autotuning)
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched on the CUDA device
# name in this order: the PCIe part before the plain "H100" that the SXM part reports ("NVIDIA H100 80GB HBM3").
# NVL parts run below the SXM figure and are not listed: they get no percentage rather than a wrong one.
BF16_DENSE_PEAKS = (
    ("H100 PCIe", 756.0, "NVIDIA H100 PCIe data sheet: 1,513 TFLOP/s bf16 with sparsity, 756 dense"),
    ("H100", 989.0, "NVIDIA H100 SXM data sheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("H200", 989.0, "NVIDIA H200 SXM data sheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
)
# What each section costs at full size on an H100/H200 (seconds, with margin): the budget skips what would
# not fit. The arms carry their own estimates.
SECTION_ESTIMATE_S = {"correctness": 10, "batch_independence": 5, "pipeline": 150, "throughput": 90}
# The CPU-mode networks: the 256x256 uncond topology, narrow and small. The table's needs block 30; the arms'
# keeps the six levels (block 24 in the decoder) with one res block each: dynamo traces it per compile arm.
TABLE_QUICK_FLAGS = {
    "num_channels": 64,
    "image_size": 64,
    "attention_resolutions": "8,4,2",
    "channel_mult": "1,1,2,2,4,4",
}
ARMS_QUICK_FLAGS = {
    "num_channels": 32,
    "image_size": 32,
    "num_res_blocks": 1,
    "attention_resolutions": "4,2",
    "channel_mult": "1,1,2,2,4,4",
    "num_head_channels": 32,
}
SECTIONS = ("correctness", "batch_independence", "arms", "pipeline", "throughput")


def bf16_peak(device_name: str) -> dict[str, Any]:
    """The dense bf16 peak that percentages of peak use on this device, or why there is none."""
    if "NVL" not in device_name:
        for part, tflops, source in BF16_DENSE_PEAKS:
            if part in device_name:
                return {"device_name": device_name, "tflop_per_s": tflops, "source": source}
    return {
        "device_name": device_name,
        "tflop_per_s": None,
        "note": "no data-sheet bf16 peak on record for this device: no percentages of peak",
    }


def rate(images_per_s: float, macs: int, precision: str, peak: dict[str, Any]) -> dict[str, Any]:
    """images/s and TFLOP/s (2 FLOPs per counted multiply-accumulate); reduced-precision rows also get their
    share of the bf16 peak where the device's peak is known (float32 runs on other units: no share)."""
    tflops = 2 * macs * images_per_s / 1e12
    row: dict[str, Any] = {"images_per_s": round(images_per_s, 2), "tflop_per_s": round(tflops, 2)}
    if precision != "float32" and peak["tflop_per_s"]:
        row["pct_of_peak"] = round(100 * tflops / peak["tflop_per_s"], 1)
        row["peak_tflop_per_s"] = peak["tflop_per_s"]
    return row


class OverBudget(Exception):
    """The time budget ran out inside a section or an arm."""


class Budget:
    """The whole call's seconds: work asks whether it fits before it starts, and is cut when it overruns."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self, reserve: float = 0.0) -> float:
        return self.deadline - reserve - time.monotonic()

    def refusal(self, needs: float, reserve: float = 0.0) -> str | None:
        """Why work estimated at `needs` seconds does not fit while `reserve` stays kept for later work (None:
        it fits)."""
        left = self.left(reserve)
        if needs <= left:
            return None
        kept = f" after {reserve:.0f} s kept for later sections" if reserve else ""
        return f"time budget: needs ~{needs:.0f} s, {max(left, 0.0):.0f} s left{kept}"

    @contextmanager
    def cut(self, reserve: float = 0.0) -> Iterator[None]:
        """Raise OverBudget inside the block when the budget less `reserve` runs out (SIGALRM; not nestable).
        Python code is interrupted between bytecodes, so a running kernel or compile step finishes first."""
        seconds = self.left(reserve)
        if seconds <= 0:
            raise OverBudget("time budget: nothing left")

        def expire(signum: int, frame: Any) -> None:
            raise OverBudget(f"time budget: cut after {seconds:.0f} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Replace `path` atomically: a run killed mid-write leaves the previous whole report, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    device: torch.device, quick_flags: dict[str, Any] | None
) -> tuple[dict, ADMUNet, torch.Tensor, torch.Tensor]:
    """The timed network (the 256x256 uncond topology, random weights; `quick_flags` shrink it) and its batch:
    64 images at its resolution (2 in the CPU mode), all at t = 90."""
    flags = {**PRESETS["256x256_diffusion_uncond"], **(quick_flags or {})}
    batch = 2 if quick_flags else 64
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**flags).eval().to(device)
    size = flags["image_size"]
    return flags, model, torch.randn(batch, 3, size, size, device=device), torch.full((batch,), 90, device=device)


def hooked_block24(model: ADMUNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Block 24 the public code's way: the whole forward, the block's output caught by a forward hook."""
    captured = {}
    target = model.get_submodule(model.block_info(24).module)
    handle = target.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    try:
        model(x, t)
    finally:
        handle.remove()
    return captured["h"]


class CapturedForward:
    """A forward captured once into a CUDA graph at a fixed batch. Each call copies its inputs into the static
    input buffers, replays the graph and returns the static output, which the next call overwrites. Without
    CUDA the same buffers feed a plain call, so the buffer logic runs everywhere; `record` says which ran.
    Under autocast the capture needs `cache_enabled=False` (cached casts would be freed after capture)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *example: torch.Tensor, warmup: int = 3):
        self.fn = fn
        self.inputs = [e.clone() for e in example]
        self.graph: torch.cuda.CUDAGraph | None = None
        if example[0].is_cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation and the allocator's first blocks, off the capture
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(*self.inputs)
            self.record = "captured with torch.cuda.CUDAGraph; each call copies the batch in and replays"
        else:
            self.output = fn(*self.inputs)
            self.record = f"cuda graphs need CUDA: plain calls on {example[0].device.type} through the static buffers"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"captured with {len(self.inputs)} inputs, called with {len(inputs)}")
        for buffer, value in zip(self.inputs, inputs, strict=True):
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise ValueError(
                    f"captured at {tuple(buffer.shape)} {buffer.dtype}, called with {tuple(value.shape)} {value.dtype}"
                )
            buffer.copy_(value)
        if self.graph is None:
            self.output = self.fn(*self.inputs)
        else:
            self.graph.replay()
        return self.output


@dataclass
class Arm:
    """One way of running block-24 extraction. `prepare()` returns the steady-state call; the compile or
    capture happens in it or in the first calls, and is timed apart as the setup."""

    name: str
    kind: str  # "eager", "compile" or "graph": later compile arms' estimates follow the first one's setup time
    prepare: Callable[[], Callable[[], torch.Tensor]]
    estimate_s: float  # setup + timing at full size on an H100/H200
    setup: str  # what runs before the two warm-up calls that every arm's setup time also holds
    macs_to: int | None = 24  # None: the full forward
    layout: str = "contiguous"
    autocast_cache: bool = True


def block24_arms(
    device: torch.device,
    quick: bool,
    budget: Budget,
    reserve_s: float,
    backend: str,
    only: list[str] | None,
    peak: dict[str, Any],
    publish: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Block-24 extraction run each way in turn, each checked against the float32 eager features; `publish`
    gets the section after every arm (a run cut short keeps what it measured)."""
    flags, model, x, t = bench_model(device, ARMS_QUICK_FLAGS if quick else None)
    batch, size, repeats = x.shape[0], x.shape[-1], 1 if quick else 10
    # bf16 is the precision extraction uses on a GPU; CPUs without native bf16 run it ~35x slower
    precision = "bfloat16" if device.type == "cuda" else "float32"
    dtype = DTYPES[precision]
    macs = {24: model.flops_to_block(24), None: model.flops_to_block(None)}
    timer = Timer(device)

    t0 = time.perf_counter()
    with torch.inference_mode():
        reference = model.features(x, t, [24])[24].float()
        synchronize(device)
    section: dict[str, Any] = {
        "flags": flags,
        "batch": batch,
        "input": size,
        "precision": precision,
        "compile_backend": backend,
        "gflop_per_image": {"24": round(2 * macs[24] / 1e9, 1), "full": round(2 * macs[None] / 1e9, 1)},
        "reference": {
            "arm": "eager features [24]",
            "precision": "float32",
            "tf32": False,
            "seconds": round(time.perf_counter() - t0, 2),
        },
        "tolerance": TOLERANCE[precision],
        "arms": [],
    }

    def block24(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return model.features(xx, tt, [24])[24]

    def compiled(mode: str, channels_last: bool = False) -> Callable[[], torch.Tensor]:
        torch._dynamo.reset()  # each arm compiles from scratch (in-process caches cleared; inductor's disk cache stays)
        inputs = x
        if channels_last:
            model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        # only inductor takes a mode; the eager backend (CPU test mode) runs the same dynamo capture without it
        fn = torch.compile(block24, mode=mode if backend == "inductor" else None, backend=backend)
        if mode == "reduce-overhead":  # cudagraph trees: mark each call a new step (its outputs are overwritten)
            return lambda: (torch.compiler.cudagraph_mark_step_begin(), fn(inputs, t))[1]
        return lambda: fn(inputs, t)

    def captured() -> Callable[[], torch.Tensor]:
        graph = CapturedForward(block24, x, t)
        section["cuda_graph"] = graph.record
        return lambda: graph(x, t)

    def compile_setup(mode: str, what: str = "") -> str:
        applied = mode if backend == "inductor" else f"{mode} not applied: the {backend} backend takes no mode"
        return f"torch.compile{what} (backend {backend}, mode {applied})"

    arms = [
        Arm("eager", "eager", lambda: lambda: block24(x, t), 15, "none"),
        Arm(
            "compile max-autotune-no-cudagraphs",
            "compile",
            lambda: compiled("max-autotune-no-cudagraphs"),
            150,
            compile_setup("max-autotune-no-cudagraphs"),
        ),
        Arm(
            "cuda graph (eager capture)",
            "graph",
            captured,
            20,
            "on a GPU 3 calls on a side stream + the capture at the fixed batch (elsewhere one plain call)",
            autocast_cache=False,
        ),
        Arm(
            "compile reduce-overhead",
            "compile",
            lambda: compiled("reduce-overhead"),
            90,
            compile_setup("reduce-overhead") + " (cudagraph trees record during the warm-up calls)",
        ),
        Arm(
            "compile max-autotune-no-cudagraphs + channels_last",
            "compile",
            lambda: compiled("max-autotune-no-cudagraphs", channels_last=True),
            150,
            compile_setup("max-autotune-no-cudagraphs", " on channels_last weights and input"),
            layout="channels_last",
        ),
        Arm(
            "full forward + hook 24 (eager)",
            "eager",
            lambda: lambda: hooked_block24(model, x, t),
            20,
            "none",
            macs_to=None,
        ),
    ]
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"unknown arms {unknown}; known: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in only]
    setup_seen: dict[str, float] = {}
    for arm in arms:
        estimate = 0.0 if quick else arm.estimate_s
        if arm.kind in setup_seen and not quick:  # the first compile's measured setup predicts the next ones'
            estimate = setup_seen[arm.kind] * 1.2 + 15
        row: dict[str, Any] = {"arm": arm.name, "precision": precision, "layout": arm.layout}
        why = budget.refusal(estimate, reserve_s)
        if why:
            row["skipped"] = why
        else:
            try:
                with budget.cut(reserve_s):
                    row.update(_run_arm(arm, device, dtype, timer, repeats, reference, peak, batch, macs[arm.macs_to]))
                setup_seen.setdefault(arm.kind, row["setup_seconds"])
            except OverBudget as exc:
                row["skipped"] = str(exc)
            except Exception as exc:  # one arm's failure (a compile error, say) must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:600]
                row["traceback"] = traceback.format_exc()[-1500:]
            finally:
                model.to(memory_format=torch.contiguous_format)
                torch._dynamo.reset()
        section["arms"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("top_kernels", "traceback")}), flush=True)
        _rank(section)
        publish(section)
    return section


def _run_arm(arm: Arm, device, dtype, timer, repeats, reference, peak, batch, macs) -> dict[str, Any]:
    """Setup (compile or capture + warm-up), steady-state rate, the features' error, the top kernels."""
    precision = str(dtype or torch.float32).removeprefix("torch.")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with (
        torch.inference_mode(),
        torch.autocast(
            device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=arm.autocast_cache
        ),
    ):
        t0 = time.perf_counter()
        step = arm.prepare()
        for _ in range(2):
            step()
        synchronize(device)
        setup_s = time.perf_counter() - t0
        seconds = timer(step, repeats)
        err = float((step().float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        top = _profile(step, device)
    row = {
        "setup": f"{arm.setup} + 2 warm-up calls",
        "setup_seconds": round(setup_s, 2),
        **rate(batch / seconds, macs, precision, peak),
    }
    row.update(max_rel_err=err, tolerance=TOLERANCE[precision], features_ok=err <= TOLERANCE[precision])
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    row["top_kernels"] = top
    return row


def _rank(section: dict[str, Any]) -> None:
    """The fastest block-24 arm whose features are within tolerance, and its speed-up over eager."""
    rows = [r for r in section["arms"] if r.get("features_ok") and r["arm"] != "full forward + hook 24 (eager)"]
    if not rows:
        return
    best = max(rows, key=lambda r: r["images_per_s"])
    eager = next((r for r in rows if r["arm"] == "eager"), None)
    section["best"] = {k: best[k] for k in ("arm", "images_per_s", "tflop_per_s", "pct_of_peak") if k in best}
    if eager:
        section["best"]["speedup_vs_eager"] = round(best["images_per_s"] / eager["images_per_s"], 2)
    full = next(
        (r for r in section["arms"] if r["arm"] == "full forward + hook 24 (eager)" and "images_per_s" in r), None
    )
    if full and eager:
        section["early_exit_speedup_eager"] = round(eager["images_per_s"] / full["images_per_s"], 2)


def throughput(device: torch.device, quick: bool, budget: Budget, peak: dict[str, Any]) -> dict:
    flags, model, x, t = bench_model(device, TABLE_QUICK_FLAGS if quick else None)
    batch, size, repeats = x.shape[0], x.shape[-1], 1 if quick else 5
    macs = {b: model.flops_to_block(b) for b in (19, 24, 30)}
    macs["full"] = model.flops_to_block(None)
    timer = Timer(device)
    rows = []

    arms = [
        ("features [24]", lambda net: net.features(x, t, [24]), macs[24]),
        ("features [19,24,30]", lambda net: net.features(x, t, [19, 24, 30]), macs[30]),
        ("full forward + hook 24", lambda net: hooked_block24(net, x, t), macs["full"]),
    ]
    # Quick (CPU) mode times float32 only: bf16/fp16 run ~35x slower on CPUs without native support.
    precisions = {"float32": None} if quick else DTYPES
    row_s = 0 if quick else 5  # the slowest row at full size (float32, full forward) takes ~3 s
    for precision, dtype in precisions.items():
        for layout in ("contiguous", "channels_last"):
            if layout == "channels_last" and precision == "float32" and not quick:
                continue
            net = model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            for arm, fn, arm_macs in arms:
                row = {"arm": arm, "precision": precision, "layout": layout}
                why = budget.refusal(row_s)
                if why:
                    rows.append({**row, "skipped": why})
                    continue
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
                ):
                    # float32 without TF32 is ~15x slower: fewer repeats keep the section inside its budget
                    sec = timer(lambda fn=fn, net=net: fn(net), repeats if dtype is not None else max(1, repeats // 2))
                rows.append({**row, **rate(batch / sec, arm_macs, precision, peak)})
                print(json.dumps(rows[-1]), flush=True)
    model.to(memory_format=torch.contiguous_format)
    result = {
        "flags": flags,
        "batch": batch,
        "input": size,
        "gflop_per_image": {k: round(2 * v / 1e9, 1) for k, v in macs.items()},
        "arms": rows,
    }
    low = None if quick else torch.bfloat16  # the reduced precision worth running on this device
    if not budget.refusal(row_s * 4):
        result["autotuning"] = _autotuning_arm(model, x, t, low, timer, repeats, batch, device)
    if not budget.refusal(row_s * 4):
        result["attention"] = _attention_arm(model, x, t, low, timer, repeats, batch, device)
    by = {(r["arm"], r["precision"], r["layout"]): r.get("images_per_s") for r in rows}
    for precision in DTYPES:
        early, full = (
            by.get(("features [24]", precision, "contiguous")),
            by.get(("full forward + hook 24", precision, "contiguous")),
        )
        if early and full:
            result.setdefault("early_exit_speedup", {})[precision] = round(early / full, 2)
    return result


def _autotuning_arm(model, x, t, dtype, timer, repeats, batch, device) -> dict:
    """What `compute.deterministic: false` buys (cuDNN autotuning) and whether the features change."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    out = {}
    try:
        for label, bench in (("deterministic", False), ("autotuned", True)):
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, not bench
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                sec = timer(lambda: model.features(x, t, [24]), repeats)
                feats = model.features(x, t, [24])[24].float().cpu()
            out[label] = {"images_per_s": round(batch / sec, 2)}
            out.setdefault("_features", []).append(feats)
        a, b = out.pop("_features")
        out["bitwise_equal"] = bool(torch.equal(a, b))
        out["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    return out


def _attention_arm(model, x, t, dtype, timer, repeats, batch, device) -> dict:
    """Block 24 with the fused attention kernel (what reduced precision on a GPU uses) against the
    reference's einsum attention, same weights and inputs."""
    blocks = [m for m in model.modules() if hasattr(m, "fused")]
    out = {}
    try:
        for label, fused in (("fused", True), ("reference einsum", False)):
            for m in blocks:
                m.fused = fused
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                out[label] = {"images_per_s": round(batch / timer(lambda: model.features(x, t, [24]), repeats), 2)}
    finally:
        for m in blocks:
            m.fused = True
    return out


def _profile(step: Callable[[], Any], device: torch.device, top: int = 10) -> list[dict]:
    """The kernels that take the most device time (CPU time on a CPU) in one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return [{"name": e.key[:120], "ms": round(getattr(e, key, 0) / 1000, 3), "calls": e.count} for e in events]


def pipeline_checks(device: torch.device, quick: bool) -> dict:
    from device_pipeline_check import run_all

    return run_all(device, quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU mode the test suite runs)")
    ap.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds for the whole call (default: device_check.sh within 8 minutes on an H100/H200)",
    )
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--arms", default=None, help="comma-separated subset of the arms section's arm names")
    ap.add_argument(
        "--compile-backend",
        choices=("inductor", "eager", "aot_eager"),
        default=None,
        help="torch.compile backend (default: inductor; eager in --quick on a CPU, where inductor's "
        "C++ compile of the test network takes minutes)",
    )
    args = ap.parse_args()
    budget = Budget(args.budget)
    device = torch.device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    backend = args.compile_backend or ("eager" if args.quick and device.type == "cpu" else "inductor")
    only = [a.strip() for a in args.arms.split(",")] if args.arms else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "device_name": name,
        "quick": args.quick,
        "budget_seconds": args.budget,
        "sections": sections,
        "peak": bf16_peak(name),
        "complete": False,
        "skipped": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "device_check.json"

    def publish_arms(section: dict[str, Any]) -> None:
        report["arms"] = section
        write_json(path, report)

    # the arms keep time for the pipeline section when it runs after them
    reserve = SECTION_ESTIMATE_S["pipeline"] if "pipeline" in sections and not args.quick else 0.0
    runners: dict[str, Callable[[], Any]] = {
        "correctness": lambda: correctness(device),
        "batch_independence": lambda: batch_independence(device),
        "arms": lambda: block24_arms(device, args.quick, budget, reserve, backend, only, report["peak"], publish_arms),
        "pipeline": lambda: pipeline_checks(device, args.quick),
        "throughput": lambda: throughput(device, args.quick, budget, report["peak"]),
    }
    for section in (s for s in SECTIONS if s in sections):
        why = budget.refusal(0 if args.quick else SECTION_ESTIMATE_S.get(section, 0))
        if why:
            report["skipped"][section] = why
            write_json(path, report)
            continue
        t0 = time.perf_counter()
        try:
            if section == "arms":  # its arms are cut one by one
                report[section] = runners[section]()
            else:
                with budget.cut():
                    report[section] = runners[section]()
        except OverBudget as exc:
            report["skipped"][section] = str(exc)
        except Exception:
            report[section] = {"error": traceback.format_exc()[-2000:]}
        report[section + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{section}: {json.dumps(report.get(section))[:600]}", flush=True)
        write_json(path, report)
    report["checks"] = _checks(report)
    report["ok"] = all(v is True for v in report["checks"].values())
    report["complete"] = True
    write_json(path, report)
    print(f"wrote {path}; checks: {report['checks']}")


def _checks(report: dict[str, Any]) -> dict[str, bool | None]:
    """Each correctness claim of the run: True, False, or None where its section did not run."""
    correctness = report.get("correctness")
    correct = None
    if correctness is not None:
        correct = "error" not in correctness and all(row["ok"] for m in correctness.values() for row in m.values())
    arms = [r for r in report.get("arms", {}).get("arms", []) if "features_ok" in r]
    return {
        "correctness": correct,
        "arms_features_within_tolerance": all(r["features_ok"] for r in arms) if arms else None,
        "pipeline": None if "pipeline" not in report else bool(report["pipeline"].get("ok")),
    }


if __name__ == "__main__":
    main()
