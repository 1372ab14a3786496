"""A diffusers-format model end to end: train a small UNet2DModel on Fashion-MNIST (DDPM epsilon-prediction,
time-boxed), save it as a pipeline folder (unet/ + scheduler/), extract a store from it and from the same
network at initialisation, and probe both with `probe logistic`.

    python benchmarks/fmnist_diffusers.py --out runs/fmnist_diffusers [--train-seconds 300]
        [--train-images 5000 --test-images 1000] [--json docs/results/fmnist_diffusers.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from extract.models.fmnist import training_images
from extract.pipeline import extract
from probe.options import LogisticOptions
from probe.run import run_logistic

LAYOUT = {
    "sample_size": 32,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 32,
}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
TAP, TIMESTEP = "mid_block", 50


def save(unet: UNet2DModel, directory: Path) -> Path:
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(**SCHEDULER).save_pretrained(directory / "scheduler")
    return directory


def train(unet: UNet2DModel, seconds: float, batch: int, seed: int) -> dict:
    images = training_images()
    scheduler = DDPMScheduler(**SCHEDULER)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    losses, step, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x0 = images[torch.randint(len(images), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(SCHEDULER["num_train_timesteps"], (batch,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    unet.eval()
    tail = losses[-20:]
    return {"steps": step, "batch": batch, "seconds": round(time.perf_counter() - t0, 1), "final_loss": sum(tail) / len(tail)}


def spec(directory: Path, train_images: int, test_images: int) -> dict:
    return {
        "name": directory.name,
        "model": {"family": "diffusers", "path": str(directory)},
        "dataset": {"kind": "idx", "splits": ["train", "test"], "limit": {"train": train_images, "test": test_images}},
        "features": {"timesteps": [TIMESTEP], "blocks": [TAP], "pooling": [2]},
        "storage": {"dtype": "float16", "chunk_rows": 64},
        "compute": {"device": "cpu", "batch_size": 128},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fmnist_diffusers")
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**LAYOUT)
    save(unet, out / "init")
    record = {"layout": LAYOUT, "scheduler": SCHEDULER, "tap": TAP, "t": TIMESTEP, "pooling": "avg2"}
    record["parameters"] = sum(p.numel() for p in unet.parameters())
    record["training"] = train(unet, args.train_seconds, args.batch, args.seed)
    save(unet, out / "trained")
    cs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    for arm in ("init", "trained"):
        t0 = time.perf_counter()
        extract(spec(out / arm, args.train_images, args.test_images), out / f"{arm}.zarr", progress=False)
        seconds = time.perf_counter() - t0
        options = LogisticOptions(solver="sklearn", cs=cs)  # the grid these figures were measured with
        result = run_logistic(str(out / f"{arm}.zarr"), out / f"{arm}-logistic", options)
        record[arm] = {
            "extract_seconds": round(seconds, 1),
            "features": result["features"],
            "selected": result["selected"],
            "val_top1": result["metrics"]["val"]["top1"],
            "test_top1": result["metrics"]["test"]["top1"],
        }
        print(arm, json.dumps(record[arm])[:400], flush=True)
    print(json.dumps({k: record[k] for k in ("training", "init", "trained")}, indent=1)[:3000])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
