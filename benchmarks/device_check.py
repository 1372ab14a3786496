"""The prepared device check: is the U-Net right on this device, and how fast is it at the paper's sizes?

Writes one JSON file (`--out DIR`/device_check.json); every section records its own error instead of
stopping the run, so one failure does not hide the other figures.

1. Correctness against guided-diffusion's reference outputs (tests/data/adm_tiny*.npz): every block and the
   output in float32 (TF32 off) to 1e-4 relative; bf16 and fp16 autocast errors against the same reference,
   checked against stated tolerances.
2. Batch-size independence on the device: the same 8 images in one batch and in batches of 3 (max difference;
   extraction relies on fixed micro-batches where it is not bitwise).
3. Throughput on the 256x256 uncond topology with random weights, 256x256 inputs: features to block 24,
   blocks 19/24/30 (DifFormer), and the full forward with a hook on block 24 (the public code's way), in
   fp32 / bf16 / fp16, eager, channels_last, and torch.compile (compile time reported), timed with CUDA
   events; achieved TFLOP/s from the counted multiply-accumulates (2 FLOPs each).
4. The store-level pipeline (benchmarks/device_pipeline_check.py): pixel scaling and counter noise on the
   device against the CPU, an extraction's bytes independent of --batch-size and of a SIGKILL + resume on
   the device, and `diffbank extract` end to end on synthetic JPEGs (host pipeline included) to block 24.

    bash benchmarks/device_check.sh --out OUT   (installs zarr/dask from .whl/ first on a bare GPU machine)

    python benchmarks/device_check.py --device cuda --out OUT
    python benchmarks/device_check.py --device cpu --quick --out OUT   (small sizes; what CI runs)
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

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


def throughput(device: torch.device, quick: bool, compile_: bool, budget_s: float) -> dict:
    flags = dict(PRESETS["256x256_diffusion_uncond"])
    size, batch, repeats = 256, 64, 5
    if quick:  # the same topology, narrow and small, so the CPU mode runs in seconds
        flags.update(num_channels=64, image_size=64, attention_resolutions="8,4,2", channel_mult="1,1,2,2,4,4")
        size, batch, repeats = 64, 2, 1
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**flags).eval().to(device)
    macs = {b: model.flops_to_block(b) for b in (19, 24, 30)}
    macs["full"] = model.flops_to_block(None)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 90, device=device)
    target = model.get_submodule(model.block_info(24).module)
    timer = Timer(device)
    rows = []
    started = time.perf_counter()

    def hooked(net):
        captured = {}
        handle = target.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
        try:
            net(x, t)
        finally:
            handle.remove()
        return captured["h"]

    arms = [
        ("features [24]", lambda net: net.features(x, t, [24]), macs[24]),
        ("features [19,24,30]", lambda net: net.features(x, t, [19, 24, 30]), macs[30]),
        ("full forward + hook 24", hooked, macs["full"]),
    ]
    # Quick (CPU) mode times float32 only: bf16/fp16 run ~35x slower on CPUs without native support.
    precisions = {"float32": None} if quick else DTYPES
    for precision, dtype in precisions.items():
        for layout in ("contiguous", "channels_last"):
            if layout == "channels_last" and precision == "float32" and not quick:
                continue
            net = model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            for arm, fn, arm_macs in arms:
                if time.perf_counter() - started > budget_s:
                    rows.append({"arm": arm, "precision": precision, "layout": layout, "skipped": "time budget"})
                    continue
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
                ):
                    # float32 without TF32 is ~15x slower: fewer repeats keep the section inside its budget
                    sec = timer(lambda fn=fn, net=net: fn(net), repeats if dtype is not None else max(1, repeats // 2))
                ips = batch / sec
                rows.append(
                    {
                        "arm": arm,
                        "precision": precision,
                        "layout": layout,
                        "images_per_s": round(ips, 2),
                        "tflop_per_s": round(2 * arm_macs * ips / 1e12, 2),
                    }
                )
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
    if compile_ and time.perf_counter() - started < budget_s:
        result["compile"] = _compiled_arm(model, x, t, low, timer, repeats, macs[24], batch)
    if time.perf_counter() - started < budget_s:
        result["autotuning"] = _autotuning_arm(model, x, t, low, timer, repeats, batch, device)
    if time.perf_counter() - started < budget_s:
        result["attention"] = _attention_arm(model, x, t, low, timer, repeats, batch, device)
    if time.perf_counter() - started < budget_s:
        result["profile_top_kernels"] = _profile(model, x, t, low, device)
    by = {(r["arm"], r["precision"], r["layout"]): r.get("images_per_s") for r in rows}
    for precision in DTYPES:
        early, full = (
            by.get(("features [24]", precision, "contiguous")),
            by.get(("full forward + hook 24", precision, "contiguous")),
        )
        if early and full:
            result.setdefault("early_exit_speedup", {})[precision] = round(early / full, 2)
    return result


def _compiled_arm(model, x, t, dtype, timer, repeats, macs, batch) -> dict:
    """torch.compile of the block-24 feature pass (contiguous layout: channels_last was slower eagerly)."""
    try:
        compiled = torch.compile(lambda xx, tt: model.features(xx, tt, [24]))
        t0 = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            compiled(x, t)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            sec = timer(lambda: compiled(x, t), repeats)
        ips = batch / sec
        return {
            "arm": "features [24]",
            "precision": str(dtype or torch.float32).removeprefix("torch."),
            "compile_seconds": round(compile_s, 1),
            "images_per_s": round(ips, 2),
            "tflop_per_s": round(2 * macs * ips / 1e12, 2),
        }
    except Exception as exc:  # compilation may be unavailable on a bare machine
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


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


def _profile(model, x, t, dtype, device) -> list[dict]:
    """The ten kernels that take the most device time in one block-24 forward."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model.features(x, t, [24])
        with profile(activities=activities) as prof:
            model.features(x, t, [24])
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:10]
    return [{"name": e.key[:120], "ms": round(getattr(e, key, 0) / 1000, 3), "calls": e.count} for e in events]


def pipeline_checks(device: torch.device, quick: bool) -> dict:
    from device_pipeline_check import run_all

    return run_all(device, quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU mode CI runs)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (bf16, block 24)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the throughput section")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "quick": args.quick,
    }
    for name, fn in (
        ("correctness", lambda: correctness(device)),
        ("batch_independence", lambda: batch_independence(device)),
        ("throughput", lambda: throughput(device, args.quick, args.compile, args.budget)),
        ("pipeline", lambda: pipeline_checks(device, args.quick)),
    ):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-2000:]}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(report[name])[:600]}", flush=True)
    report["ok"] = (
        all(
            row["ok"]
            for model in report.get("correctness", {}).values()
            if isinstance(model, dict)
            for row in model.values()
            if isinstance(row, dict)
        )
        and "error" not in report["correctness"]
        and bool(report.get("pipeline", {}).get("ok"))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'device_check.json'}; correctness ok: {report['ok']}")


if __name__ == "__main__":
    main()
