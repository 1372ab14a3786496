"""The U-Net on a CPU: torch threads 1 vs 2, OpenMP waiting passive vs spinning, channels_last, torch.compile.

Each arm is its own process (OMP_WAIT_POLICY is read once, when torch loads OpenMP), running
`features(blocks=[24])` of the 256x256 uncond topology at 64 channels on 64x64 inputs (the shape of the
paper's model, sized for a CPU), float32, same weights and inputs. Arms run round-robin over repeats so
load changes on a shared machine hit all alike; medians are reported, with the machine's load average.

    python benchmarks/bench_cpu_unet.py [--repeats 3] [--seconds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {  # name: (threads, OMP_WAIT_POLICY, channels_last, compile)
    "1 thread": (1, "PASSIVE", False, False),
    "2 threads, passive wait": (2, "PASSIVE", False, False),
    "2 threads, spinning wait": (2, "ACTIVE", False, False),
    "1 thread, channels_last": (1, "PASSIVE", True, False),
    "1 thread, torch.compile": (1, "PASSIVE", False, True),
}


def child(threads: int, channels_last: bool, compile_: bool, seconds: float) -> None:
    import torch

    from extract.models.adm import ADMUNet
    from extract.models.config import PRESETS

    torch.set_num_threads(threads)
    flags = {**PRESETS["256x256_diffusion_uncond"], "image_size": 64, "num_channels": 64, "num_head_channels": 32}
    flags["attention_resolutions"] = "2,4,8"  # the 256 model's 32/16/8 at a quarter of the size
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**flags).eval()
    x = torch.randn(8, 3, 64, 64)
    t = torch.full((8,), 150)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    features = torch.compile(model.features) if compile_ else model.features
    with torch.inference_mode():
        t0 = time.perf_counter()
        features(x, t, [24])
        warmup = time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            features(x, t, [24])
            n += 1
        rate = n * x.shape[0] / (time.perf_counter() - t0)
    print(json.dumps({"images_per_s": rate, "warmup_s": warmup}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads, channels_last, compile_, seconds = args.child
        child(int(threads), channels_last == "1", compile_ == "1", float(seconds))
        return
    root = Path(__file__).resolve().parents[1]
    runs: dict[str, list[dict]] = {a: [] for a in args.arms}
    loads = []
    for _ in range(args.repeats):
        for arm in args.arms:
            threads, wait, nhwc, comp = ARMS[arm]
            env = {**os.environ, "OMP_WAIT_POLICY": wait, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
            cmd = [sys.executable, __file__, "--child", str(threads), str(int(nhwc)), str(int(comp)), str(args.seconds)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
            loads.append(os.getloadavg()[0])
    base = statistics.median(r["images_per_s"] for r in runs[args.arms[0]])
    print(f"{os.cpu_count()} CPUs, median of {args.repeats}, load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'arm':<28}{'images/s':>10}{'vs first':>10}{'warm-up s':>11}")
    result = {"cpus": os.cpu_count(), "load_average": [min(loads), max(loads)], "arms": {}}
    for arm in args.arms:
        rate = statistics.median(r["images_per_s"] for r in runs[arm])
        warm = statistics.median(r["warmup_s"] for r in runs[arm])
        result["arms"][arm] = {"images_per_s": rate, "vs_first": rate / base, "warmup_s": warm}
        print(f"{arm:<28}{rate:>10.2f}{rate / base:>9.2f}x{warm:>11.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
