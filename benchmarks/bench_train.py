"""Training throughput of the embedded model's recipe: images/s and achieved GFLOP/s, eager vs torch.compile,
float32 vs bf16 autocast, side by side in one run.

FLOPs per training image = 3 x the forward's (forward + backward ~ 2 x forward), 2 FLOPs per multiply-accumulate counted by
`ADMUNet.flops_to_block`. Compile time is reported separately and also charged to its arm's
`images_per_s_incl_compile`, since a run pays it once.

    python benchmarks/bench_train.py --device cpu --threads 1 --steps 20 --batch-size 64
    python benchmarks/bench_train.py --device cuda --steps 200 --batch-size 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from extract.models import fmnist
from extract.models.adm import ADMUNet
from extract.models.training import TrainConfig, train


def measure(arm: dict, args: argparse.Namespace, images: torch.Tensor) -> dict:
    cfg = TrainConfig(
        flags=fmnist.FLAGS,
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        checkpoint_every=10**9,
        device=args.device,
        weighting="min-snr",
        **arm,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(images, cfg, tmp, progress=False, until_step=args.warmup)  # includes compilation
        _sync(args.device)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        train(images, cfg, tmp, progress=False)
        _sync(args.device)
        steady = time.perf_counter() - t1
    ips = args.steps * args.batch_size / steady
    return {
        **arm,
        "images_per_s": round(ips, 1),
        "warmup_s": round(first, 2),
        "images_per_s_incl_compile": round((args.steps + args.warmup) * args.batch_size / (first + steady), 1),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arms", default="none:eager,bfloat16:eager,none:compile,bfloat16:compile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = max(args.batch_size * 4, 512)
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = ADMUNet.from_flags(**fmnist.FLAGS)
    gflop_per_image = 3 * 2 * model.flops_to_block() / 1e9  # flops_to_block counts multiply-accumulates
    rows = []
    for spec in args.arms.split(","):
        precision, mode = spec.split(":")
        arm = {"autocast": precision, "compile": mode == "compile", "channels_last": args.device.startswith("cuda")}
        try:
            row = measure(arm, args, images)
        except Exception as exc:  # an arm that cannot run here (e.g. no compiler) is reported, not fatal
            row = {**arm, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if "images_per_s" in row:
            row["gflop_per_s"] = round(row["images_per_s"] * gflop_per_image, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        result = {
            "device": args.device,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "train_gflop_per_image": round(gflop_per_image, 4),
            "arms": rows,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        }
        if args.json:  # after every arm, so a time-boxed run keeps what it measured
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}))


if __name__ == "__main__":
    main()
