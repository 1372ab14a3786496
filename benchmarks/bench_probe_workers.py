"""Probe sweep on dask workers: `diffbank probe sweep` in one process vs `--workers N` on one store.

The store holds 27 features (timesteps 90, 150, 300 x blocks 19, 24, 30 x avg1/avg2/avg4 of --channels
channels), written through the store's own writer (`bench_scale.op_write`: the real layout, checksums and
units; no U-Net). Each run is the CLI in a process of its own, timed from start to exit (imports, the cluster's
start and the merge included); the one-process run keeps torch's default thread count, each worker runs one
thread. Both runs' selections and accuracies are compared, and their weights byte for byte (equal when the
thread counts match: `--one-thread` runs the one-process sweep on one thread too).

    python benchmarks/bench_probe_workers.py [--workers 2] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import op_write  # noqa: E402  (a sibling script, not a package)

POOLS = (1, 2, 4)
FULL = {"rows": 15_000, "channels": 48, "epochs": 10, "classes": 20}
QUICK = {"rows": 1_500, "channels": 16, "epochs": 2, "classes": 10}


def case(rows: int, channels: int, classes: int) -> dict[str, Any]:
    features = [
        [f"t{t:03d}_b{b:02d}_avg{p}", [channels, p, p]] for t in (90, 150, 300) for b in (19, 24, 30) for p in POOLS
    ]
    return {"size": f"sweep_{rows}", "rows": rows, "classes": classes, "features": features}


def run_sweep(store: Path, out: Path, epochs: int, workers: int | None, one_thread: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "diffbank", "probe", "sweep", str(store), "--out", str(out), "--epochs", str(epochs)]
    cmd += ["-q"] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ)
    if one_thread or workers:
        env["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    doc = json.loads((out / "results.json").read_text())
    # The run's own stages, and per part on workers, so a slow run shows where its time went.
    return {
        "seconds": seconds,
        "load_average_1min_at_start": load,
        "timings": doc["timings"],
        **(
            {"parts": [{k: p[k] for k in ("data_s", "train_s", "eval_s")} for p in doc["cluster"]["parts"]]}
            if "cluster" in doc
            else {}
        ),
    }


def weights(path: Path) -> bytes:
    """The tensors' bytes of a safetensors file (its metadata header is written in a per-process order)."""
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def compare(one: Path, many: Path) -> dict[str, Any]:
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, many))
    return {
        "same_selection": a["selected"] == b["selected"],
        "same_table": a["sweep"] == b["sweep"],
        "same_metrics": a["metrics"] == b["metrics"],
        "same_weights": weights(one / "heads.safetensors") == weights(many / "heads.safetensors"),
        "selected": a["selected"]["head"],
        "test_top1": a["metrics"]["test"]["top1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--channels", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--quick", action="store_true", help="a small store (seconds), for tests and development")
    parser.add_argument("--one-thread", action="store_true", help="run the one-process sweep on one torch thread")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    for key in ("rows", "channels", "epochs"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    work = Path(tempfile.mkdtemp(prefix="bench_probe_workers_"))
    try:
        store = work / "store.zarr"
        written = op_write(str(store), case(size["rows"], size["channels"], size["classes"]))
        one = run_sweep(store, work / "one", size["epochs"], None, args.one_thread)
        many = run_sweep(store, work / "many", size["epochs"], args.workers, args.one_thread)
        one_s, many_s = one["seconds"], many["seconds"]
        same = compare(work / "one", work / "many")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "size": size,
        "features": 27,
        "lrs_per_feature": 3,
        "store_bytes": written["bytes"],
        "workers": args.workers,
        "one_process_s": round(one_s, 2),
        "workers_s": round(many_s, 2),
        "speedup": round(one_s / many_s, 3),
        "one_process": one,
        "on_workers": many,
        "one_process_threads": 1 if args.one_thread else "torch default",
        **same,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "quick": args.quick,
    }
    print(f"27 features x 3 lrs, {size['rows']} rows, {size['epochs']} epochs")
    print(f"{'one process':>14}: {one_s:8.1f} s")
    print(f"{f'{args.workers} workers':>14}: {many_s:8.1f} s   speed-up {one_s / many_s:.2f}x")
    print(f"same selection {same['same_selection']}, table {same['same_table']}, weights {same['same_weights']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
