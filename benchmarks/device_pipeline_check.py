"""Store-level device checks, run by device_check.py as its `pipeline` section (or alone).

1. noise_and_pixels: uint8 -> [-1, 1] scaling on the device equals the CPU's bit for bit (all 256 values);
   the counter noise rule on the device against the CPU (max abs difference; float32 transcendentals
   differ by an ulp or so) and its batch independence on the device.
2. stores: a tiny extraction (digits, a tiny U-Net) on the device, uninterrupted; again with another
   --batch-size (bytes must be equal); again killed with SIGKILL after its first unit and resumed
   (bytes must be equal).
3. end_to_end: `diffbank extract` as a user runs it on synthetic 500x375 JPEGs: the 256x256 uncond
   U-Net (random weights) to block 24 with the host pipeline included, images/s, and the model's own
   share (CUDA-event time), for the spec's dtype (bf16 on a GPU).
4. sweep: a 27-head linear sweep (9 features x 3 learning rates, one epoch) on the device, reading a
   store of >= 10 GB of synthetic float16 features (136,000 samples x 9 x 4,096; 2,000 x 9 x 256 in
   --quick): wall time, samples/s and GB/s read.

    python benchmarks/device_pipeline_check.py --device cuda --out OUT [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from extract.models.config import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def noise_and_pixels(device: torch.device) -> dict[str, Any]:
    from extract.diffusion import counter_noise
    from extract.preprocess import batch_to_model_range

    every = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()
    scaled_equal = torch.equal(batch_to_model_range(every.to(device)).cpu(), batch_to_model_range(every))
    shape = (3, 64, 64)
    on_device = counter_noise(7, list(range(16)), 150, 0, shape, device)
    on_cpu = counter_noise(7, list(range(16)), 150, 0, shape, "cpu")
    part = counter_noise(7, [9, 3], 150, 0, shape, device)
    batch_independent = torch.equal(part[0], on_device[9]) and torch.equal(part[1], on_device[3])
    diff = float((on_device.cpu() - on_cpu).abs().max())
    return {
        "pixel_scaling_bitwise_equal_to_cpu": scaled_equal,
        "counter_noise_max_abs_diff_vs_cpu": diff,
        "counter_noise_bitwise_equal_to_cpu": bool(torch.equal(on_device.cpu(), on_cpu)),
        "counter_noise_batch_independent": batch_independent,
        "ok": scaled_equal and batch_independent and diff < 1e-4,
    }


def _tiny_spec(device: torch.device) -> dict[str, Any]:
    return {
        "name": "device-check",
        "model": {"flags": dict(TINY_FLAGS), "init_seed": 0},
        "dataset": {"kind": "digits", "splits": ["train", "test"], "limit": {"train": 48, "test": 16}},
        "features": {"timesteps": [10, 90], "blocks": [2, 4], "pooling": [1, 2]},
        "noise": {"seed": 1, "draws": 2},
        "views": {"center": True, "hflip": True},
        "storage": {"shard_rows": 8, "chunk_rows": 4},
        "compute": {"batch_size": 8, "device": str(device)},
    }


def _arrays(path: Path) -> dict[str, bytes]:
    import zarr

    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    return {f"{grp}/{n}": np.asarray(a[:]).tobytes() for grp in ("features", "samples") for n, a in g[grp].arrays()}


def _done_units(path: Path) -> int:
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r", use_consolidated=False)
        return int(np.asarray(g["_progress/done"][:]).all(axis=1).sum())
    except Exception:  # not created yet
        return 0


def stores(device: torch.device, tmp: Path) -> dict[str, Any]:
    from extract.pipeline import extract

    spec_path = tmp / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(_tiny_spec(device)))
    whole = tmp / "whole.zarr"
    t0 = time.perf_counter()
    extract(str(spec_path), whole, progress=False, batch_size=8)
    seconds = time.perf_counter() - t0
    reference = _arrays(whole)
    extract(str(spec_path), tmp / "b3.zarr", progress=False, batch_size=3)
    batch_equal = _arrays(tmp / "b3.zarr") == reference

    killed = tmp / "killed.zarr"
    env = {**os.environ, "DIFFBANK_DEBUG_UNIT_DELAY": "1.0"}
    prog = "from diffbank.cli import main; main()"
    args = ["extract", str(spec_path), "--store", str(killed), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", prog, *args], env=env, cwd=ROOT)
    deadline = time.time() + 300
    while _done_units(killed) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _done_units(killed)
    resumed = subprocess.run([sys.executable, "-c", prog, *args], cwd=ROOT, capture_output=True, text=True)
    resume_equal = resumed.returncode == 0 and _arrays(killed) == reference
    return {
        "uninterrupted_seconds": round(seconds, 2),
        "batch_size_3_vs_8_bitwise_equal": batch_equal,
        "units_done_when_killed": done_at_kill,
        "kill_resume_bitwise_equal": resume_equal,
        "resume_stderr_tail": resumed.stderr[-500:] if resumed.returncode else "",
        "ok": batch_equal and resume_equal and 0 < done_at_kill,
    }


def end_to_end(device: torch.device, tmp: Path, quick: bool) -> dict[str, Any]:
    from bench_host_pipeline import write_jpegs

    count, size = (16, 32) if quick else (4096, 256)
    write_jpegs(tmp / "jpegs", count)
    cuda = device.type == "cuda"
    model = {"flags": dict(TINY_FLAGS, image_size=size)} if quick else {"preset": "256x256_diffusion_uncond"}
    spec = {
        "name": "end-to-end",
        "model": model,
        "dataset": {"kind": "folder", "path": str(tmp / "jpegs"), "image_size": size},
        "features": {"timesteps": [150], "blocks": [4 if quick else 24], "pooling": [2]},
        "noise": {"rule": "counter" if cuda else "generator"},
        "storage": {"shard_rows": 512 if cuda else 8, "chunk_rows": 64 if cuda else 8},
        "compute": {
            "dtype": "bfloat16" if cuda else "float32",
            "batch_size": 256 if cuda else 8,
            "num_workers": max(2, (os.cpu_count() or 2) - 2),
            "device": str(device),
        },
    }
    spec_path = tmp / "e2e.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    loaders = _loader_rates(tmp / "jpegs", size, spec["compute"]["num_workers"], count)
    micro = "128" if cuda else "8"
    cmd = [sys.executable, "-c", "from diffbank.cli import main; main()", "extract", str(spec_path)]
    cmd += ["--store", str(tmp / "e2e.zarr"), "--no-progress", "--json", "--micro-batch", micro]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-2000:], "ok": False}
    summary = json.loads(proc.stdout)
    return {
        "images": summary["images"],
        "images_per_s": summary["images_per_s"],
        "model_seconds": summary["model_seconds"],
        "model_images_per_s": summary["images"] / summary["model_seconds"] if summary["model_seconds"] else None,
        "wall_seconds_with_startup": round(wall, 1),
        "dtype": spec["compute"]["dtype"],
        "noise_rule": spec["noise"]["rule"],
        "loader_processes": spec["compute"]["num_workers"],
        "loader_alone_images_per_s": loaders,
        "ok": summary["complete"],
    }


def sweep(device: torch.device, tmp: Path, quick: bool) -> dict[str, Any]:
    from extract.store import save_features
    from probe.options import SweepOptions
    from probe.run import run_sweep

    n, dim, classes = (2_000, 256, 10) if quick else (136_000, 4_096, 100)
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=gen, device=device)
    feats = {}
    t0 = time.perf_counter()
    for t in (90, 150, 300):
        for b in (19, 24, 30):
            means = torch.randn(classes, dim, generator=gen, device=device) * (0.5 if (t, b) == (150, 24) else 0.2)
            out = np.empty((n, dim // 4, 2, 2), dtype=np.float16)
            for lo in range(0, n, 8192):
                rows = torch.randn(min(8192, n - lo), dim, generator=gen, device=device) + means[y[lo : lo + 8192]]
                out[lo : lo + len(rows)] = rows.half().reshape(-1, dim // 4, 2, 2).cpu().numpy()
            feats[f"t{t:03d}_b{b:02d}_avg2"] = out
    labels = y.cpu().numpy()
    rows = np.arange(n)
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    splits = {"train": rows[:n_train], "val": rows[n_train : n_train + n_val], "test": rows[n_train + n_val :]}
    store = tmp / "sweep.zarr"
    save_features(store, feats, labels, splits)
    written = time.perf_counter() - t0
    gigabytes = sum(a.nbytes for a in feats.values()) / 1e9
    del feats
    t0 = time.perf_counter()
    result = run_sweep(str(store), tmp / "sweep", SweepOptions(epochs=1, device=str(device), progress=False))
    wall = time.perf_counter() - t0
    return {
        "samples": n,
        "store_gb": round(gigabytes, 2),
        "write_seconds": round(written, 1),
        "sweep_seconds": round(wall, 1),
        "train_samples_per_s": n_train / wall,
        "gb_per_s_read": gigabytes * 0.8 / wall,  # the epoch reads the train rows of every feature
        "selected": result.get("selected"),
        "test_top1": result.get("metrics", {}).get("test", {}).get("top1"),
        "ok": True,
    }


def _loader_rates(folder: Path, size: int, workers: int, count: int) -> dict[str, float]:
    """The host pipeline alone (decode + preprocess into uint8 batches): N threads against N processes."""
    from extract.loader import Loader
    from extract.overlap import prefetch
    from extract.sources import FolderSource

    source = FolderSource(folder)
    jobs = [(0, lo, np.arange(lo, min(lo + 64, count))) for lo in range(0, count, 64)]
    rates = {}
    for label, processes in (("threads", 0), ("processes", workers)):
        with Loader(source, size, "reference", processes=processes, threads=workers) as loader:
            list(prefetch(loader.submit, jobs[:2], 2))  # start-up and page cache
            t0 = time.perf_counter()
            for _ in prefetch(loader.submit, jobs, 2 * workers):
                pass
            rates[f"{workers} {label}"] = round(count / (time.perf_counter() - t0), 1)
    return rates


def run_all(device: torch.device, quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (
            ("noise_and_pixels", lambda: noise_and_pixels(device)),
            ("stores", lambda: stores(device, Path(tmp))),
            ("end_to_end", lambda: end_to_end(device, Path(tmp), quick)),
            ("sweep", lambda: sweep(device, Path(tmp), quick)),
        ):
            try:
                out[name] = fn()
            except Exception:
                out[name] = {"error": traceback.format_exc()[-2000:], "ok": False}
    out["ok"] = all(section.get("ok") for section in out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    report = run_all(torch.device(args.device), args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_pipeline_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
