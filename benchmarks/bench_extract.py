"""Extraction benchmark: images/s of the whole pipeline vs the U-Net alone, and the pipeline's overhead.

Runs `extract.pipeline.extract` on a spec (default cache_specs/cpu_small.yaml) into a temporary store, then
times the model alone on the very same micro-batches (same inputs, same timesteps, same blocks,
no loading, no pooling, no writing), and reports

    overhead = (pipeline wall time - pure model time) / pure model time      (target <= 15%)

The in-run model time (the forwards timed inside the pipeline) is printed too; the difference
between it and the standalone pass shows how much the loader/writer threads slow the U-Net down.

    python benchmarks/bench_extract.py [--spec cache_specs/cpu_small.yaml] [--micro-batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract.diffusion import NoiseSchedule, seeded_noise
from extract.pipeline import DEFAULT_MICRO_BATCH, build, extract, resolve_device
from extract.preprocess import preprocess
from extract.sources import open_source
from extract.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def pure_model_seconds(spec_path: str, micro_batch: int, device: str | None) -> tuple[float, int]:
    """Time only the U-Net forwards of the run's micro-batches (inputs prepared beforehand)."""
    spec = load_spec(spec_path)
    dev = resolve_device(device or spec.compute.device)
    model, _ = build(spec, dev)
    source = open_source(spec.dataset)
    size = spec.dataset.image_size
    x0 = torch.from_numpy(
        np.stack([preprocess(source.load(i).image, size, spec.dataset.preprocess) for i in range(len(source))])
    )
    schedule = NoiseSchedule.from_flags(spec.model.noise_schedule, spec.model.diffusion_steps)
    grid = spec.grid
    inputs = []
    for lo in range(0, len(source), micro_batch):
        idx = list(range(lo, min(len(source), lo + micro_batch)))
        for t in grid.timesteps:
            for draw in range(spec.noise.draws):
                x_t = schedule.q_sample(x0[idx], t, seeded_noise(spec.noise.seed, idx, t, draw, x0.shape[1:]))
                for view in spec.views.names:
                    inputs.append((x_t if view == "center" else x_t.flip(-1), t))
    blocks = list(grid.blocks)
    with torch.inference_mode():
        model.features(inputs[0][0][:1].to(dev), torch.full((1,), inputs[0][1], device=dev), blocks)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for x, t in inputs:
            model.features(x.to(dev), torch.full((x.shape[0],), t, device=dev), blocks)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, len(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "cache_specs" / "cpu_small.yaml"))
    parser.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--store", default=None, help="store path (default: a temporary directory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "bench.zarr")
        # warm the model code paths once so neither arm pays one-off costs
        pure_model_seconds(args.spec, args.micro_batch, args.device)
        summary = extract(args.spec, store, progress=False, micro_batch=args.micro_batch, device=args.device)
        pure, n = pure_model_seconds(args.spec, args.micro_batch, args.device)

    wall, in_run = summary["seconds"], summary["model_seconds"]
    rows = [
        ("images", f"{n}", ""),
        ("pipeline wall time", f"{wall:.2f} s", f"{n / wall:.1f} images/s"),
        ("pure model time (standalone)", f"{pure:.2f} s", f"{n / pure:.1f} images/s"),
        ("model time inside the run", f"{in_run:.2f} s", f"{n / in_run:.1f} images/s"),
        ("store writes (writer thread)", f"{summary['write_seconds']:.2f} s", "overlapped"),
        ("overhead (wall - pure) / pure", f"{100 * (wall - pure) / pure:.1f} %", "target <= 15 %"),
        ("overhead vs in-run model time", f"{100 * (wall - in_run) / in_run:.1f} %", ""),
    ]
    print(
        f"spec {args.spec}  device {summary['device']}  micro-batch {summary['micro_batch']}  "
        f"torch threads {torch.get_num_threads()}"
    )
    for label, value, note in rows:
        print(f"  {label:<32} {value:>12}   {note}")


if __name__ == "__main__":
    main()
