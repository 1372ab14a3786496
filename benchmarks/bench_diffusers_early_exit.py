"""Early exit on a diffusers UNet2DModel: `features(blocks=[tap])` against diffusers' own full forward with
a hook on the tap, on google/ddpm-cifar10-32's layout (random weights: speed does not depend on them).

Both arms use the same weights and inputs and must return the same tensor; they are interleaved so load
changes on the machine hit both alike. The FLOP bound is full forward / forward up to the tap, counted
by torch's FlopCounterMode (extract.models.accounting).

    python benchmarks/bench_diffusers_early_exit.py [--tap mid_block] [--batch 8] [--repeats 5] [--threads 1]
        [--json docs/results/bench_diffusers_early_exit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from extract.models.accounting import tap_costs
from extract.models.diffusers_unet import DDPM_CIFAR10_LAYOUT, DiffusersUNet, build_unet, tap_modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tap", default="mid_block")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_LAYOUT).eval()
    model = DiffusersUNet(unet)
    info = model.block_info(args.tap)
    size = DDPM_CIFAR10_LAYOUT["sample_size"]
    x = torch.randn(args.batch, 3, size, size)
    t = torch.full((args.batch,), 90, dtype=torch.long)
    target = tap_modules(unet)[info.module]
    captured: dict[str, torch.Tensor] = {}

    def full_with_hook() -> torch.Tensor:
        handle = target.register_forward_hook(
            lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o)
        )
        try:
            unet(x, t)
        finally:
            handle.remove()
        return captured["h"]

    def early_exit() -> torch.Tensor:
        return model.features(x, t, [info.number])[info.number]

    arms = {"diffusers forward + hook": full_with_hook, f"features(blocks=[{info.module}])": early_exit}
    with torch.inference_mode():
        assert torch.equal(full_with_hook(), early_exit()), "early exit must equal the hooked full forward"
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, fn in arms.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    costs = {c.module: c for c in tap_costs(DiffusersUNet(build_unet(unet.config)), size)}
    share = costs[info.module].share
    medians = {name: statistics.median(v) for name, v in times.items()}
    full_s, early_s = medians.values()
    record = {
        "model": "google/ddpm-cifar10-32 layout (UNet2DModel, random weights), 32x32 input, float32",
        "parameters_millions": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "tap": {"number": info.number, "module": info.module, "channels": info.channels, "resolution": info.resolution},
        "taps": model.num_blocks,
        "flop_share_to_tap": round(share, 4),
        "flop_bound_speedup": round(1 / share, 2),
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "median_seconds_per_batch": {k: round(v, 4) for k, v in medians.items()},
        "images_per_second": {k: round(args.batch / v, 1) for k, v in medians.items()},
        "speedup": round(full_s / early_s, 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()},
        "torch": torch.__version__,
    }
    print(
        f"model: {record['model']}, {record['parameters_millions']}M parameters, {model.num_blocks} taps\n"
        f"tap {info.number} = {info.module} ({info.channels} ch, {info.resolution}x{info.resolution}); "
        f"its share of the full forward's FLOPs: {share:.1%}\n"
        f"batch {args.batch}, {args.repeats} interleaved repeats, {args.threads} thread(s)\n"
        f"{'arm':<40}{'median s/batch':>16}{'images/s':>12}"
    )
    for name, seconds in medians.items():
        print(f"{name:<40}{seconds:>16.4f}{args.batch / seconds:>12.1f}")
    print(f"speed-up of early exit: {record['speedup']}x (FLOP bound: {record['flop_bound_speedup']}x)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
