"""The host side of extraction, with the U-Net replaced by a zero-cost stand-in: can it feed a GPU?

Writes synthetic 500x375 JPEGs (photo-like: smooth structure plus noise, quality 90), then measures,
side by side in one run with the arms interleaved over repeats (medians reported):

  reference       the loader before this change: decode to numpy, back to PIL for the resize, float32
                  CHW assembled on the host (kept here verbatim as `reference_load_batch`), in threads
  host threads    today's loader (`extract.loader.load_pixels`): the decoded image stays PIL until
                  cropped, uint8 batches (the device scales them), in threads
  host processes  the same in loader processes (`extract.loader.Loader`, what `num_workers > 0` runs):
                  no GIL shared, but pixels travel back through a pipe
  pipeline        `extract.pipeline.extract` end to end on the CPU (256x256 uncond preset, block 24,
                  avg-pool 2) with the stand-in model, N loader processes or the default two loader
                  threads: loading, noise, q_sample, pooling, store writes

for 1 and 2 workers, and prints
images/s (wall), the speed-up of 2 workers, and images per CPU-second of this process (the per-core
rate, which other jobs on a shared machine barely change). Also the per-image cost of the two
noise rules on this CPU. Goal: host >= 150 images/s per core, 2 workers >= 1.8x one.

    python benchmarks/bench_host_pipeline.py [--images 300] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from extract.diffusion import counter_noise, seeded_noise
from extract.loader import Loader
from extract.models.config import PRESETS, block_table, config_from_flags
from extract.overlap import load_batch, prefetch
from extract.preprocess import preprocess
from extract.sources import FolderSource
from extract.sources.base import decode_image_file

SIZE = 256
BATCH = 32


def write_jpegs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = root / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(coarse).astype(np.int16) + rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def reference_load_batch(source: FolderSource, indices: np.ndarray) -> torch.Tensor:
    """The loader as it was: PIL -> numpy (decode) -> PIL (resize) -> numpy, float32 on the host."""
    x0 = np.zeros((len(indices), 3, SIZE, SIZE), dtype=np.float32)
    for row, index in enumerate(indices):
        image = decode_image_file(source.root / source.sample_ids[int(index)])
        x0[row] = preprocess(image, SIZE)
    return torch.from_numpy(x0)


def timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn(): CPU time per image is the per-core cost,
    which other jobs on a shared machine barely change; wall time shows how workers scale."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def time_threads(fn: Any, jobs: list[tuple[Any, ...]], workers: int) -> tuple[float, float]:
    def run() -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in prefetch(lambda *job: pool.submit(fn, *job), jobs, depth=2 * workers):
                pass

    return timed(run)


def time_processes(source: FolderSource, jobs: list[tuple[Any, ...]], workers: int) -> tuple[float, float]:
    """Wall time, and CPU time of this process and its (finished) loader processes."""

    def run() -> None:
        with Loader(source, SIZE, "reference", processes=workers) as loader:
            for _ in prefetch(loader.submit, jobs, depth=2 * workers):
                pass

    children = os.times().children_user + os.times().children_system
    wall, cpu = timed(run)
    return wall, cpu + os.times().children_user + os.times().children_system - children


class StandIn(torch.nn.Module):
    """Zero-cost U-Net: the right feature shapes, no arithmetic."""

    def __init__(self, flags: dict[str, Any]):
        super().__init__()
        self.shapes = {b.number: (b.channels, b.resolution) for b in block_table(config_from_flags(**flags))}

    def features(self, x: torch.Tensor, t: torch.Tensor, blocks: list[int], **_: Any) -> dict[int, torch.Tensor]:
        out = {}
        for b in blocks:
            channels, res = self.shapes[b]
            out[b] = torch.zeros((x.shape[0], channels, res, res), device=x.device)
        return out


def time_pipeline(images: Path, workers: int, store: Path) -> tuple[float, float]:
    import extract.pipeline as pipeline
    import extract.prepare as preparation

    flags = dict(PRESETS["256x256_diffusion_uncond"])
    spec = {
        "model": {"preset": "256x256_diffusion_uncond"},
        "dataset": {"kind": "folder", "path": str(images), "image_size": SIZE},
        "features": {"timesteps": [150], "blocks": [24], "pooling": [2]},
        "compute": {"batch_size": BATCH, "num_workers": workers, "device": "cpu"},
        "storage": {"shard_rows": 128},
    }
    real = preparation.build
    preparation.build = lambda spec, dev: (StandIn(flags), {"init": "stand-in"})
    summaries = []
    try:
        wall_cpu = timed(lambda: summaries.append(pipeline.extract(spec, store, progress=False, micro_batch=BATCH)))
    finally:
        preparation.build = real
    assert summaries[0]["complete"], summaries[0]
    return wall_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root / "images", args.images)
        source = FolderSource(root / "images")
        batches = [np.arange(lo, min(len(source), lo + BATCH)) for lo in range(0, len(source), BATCH)]
        ref_jobs = [(source, idx) for idx in batches]
        host_jobs = [(0, 0, idx) for idx in batches]

        def host(unit: int, offset: int, idx: np.ndarray) -> Any:
            return load_batch(source, SIZE, "reference", False, unit, offset, idx)

        time_processes(source, host_jobs[:1], 1)  # warm the page cache and the fork path

        assert torch.equal(  # the same model input, bit for bit
            reference_load_batch(source, batches[0][:4]),
            host(0, 0, batches[0][:4]).pixels.permute(0, 3, 1, 2).float() / 127.5 - 1,
        )
        times: dict[str, list[tuple[float, float]]] = {}
        for rep in range(args.repeats):
            for workers in args.workers:
                times.setdefault(f"reference/{workers}", []).append(time_threads(reference_load_batch, ref_jobs, workers))
                times.setdefault(f"host threads/{workers}", []).append(time_threads(host, host_jobs, workers))
                times.setdefault(f"host processes/{workers}", []).append(time_processes(source, host_jobs, workers))
                store = root / f"s{rep}_{workers}.zarr"
                times.setdefault(f"pipeline processes/{workers}", []).append(time_pipeline(root / "images", workers, store))
            store = root / f"s{rep}_threads.zarr"
            times.setdefault("pipeline 2 threads/2", []).append(time_pipeline(root / "images", 0, store))
        noise_ms = {}
        for rule, fn in (("generator", seeded_noise), ("counter", counter_noise)):
            t0 = time.perf_counter()
            fn(0, list(range(BATCH)), 150, 0, (3, SIZE, SIZE))
            noise_ms[rule] = (time.perf_counter() - t0) / BATCH * 1e3

    results: dict[str, Any] = {"images": args.images, "cpus": cpus, "repeats": args.repeats, "arms": {}}
    print(f"{args.images} JPEGs 500x375 -> {SIZE}x{SIZE}, {cpus} CPUs, median of {args.repeats}, load avg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'arm':<20}{'workers':>8}{'images/s':>11}{'vs 1 worker':>13}{'per CPU-s':>11}")
    for arm in ("reference", "host threads", "host processes", "pipeline processes", "pipeline 2 threads"):
        base = None
        for workers in args.workers if arm != "pipeline 2 threads" else [2]:
            runs = times[f"{arm}/{workers}"]
            rate = args.images / statistics.median(w for w, _ in runs)
            per_cpu_second = args.images / statistics.median(c for _, c in runs)  # images per core-second
            base = base or rate
            results["arms"][f"{arm}/{workers}"] = {
                "images_per_s": rate,
                "images_per_cpu_second": per_cpu_second,
                "scaling": rate / base,
            }
            print(f"{arm:<20}{workers:>8}{rate:>11.1f}{rate / base:>12.2f}x{per_cpu_second:>11.1f}")
    print("noise on this CPU, ms per 3x256x256 image: " + ", ".join(f"{k} {v:.2f}" for k, v in noise_ms.items()))
    results["noise_ms_per_image"] = noise_ms
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
