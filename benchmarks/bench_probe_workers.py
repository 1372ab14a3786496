"""Probe sweep on dask workers: `diffbank probe sweep` in one process vs `--workers N` on one store.

The store holds 27 features (timesteps 90, 150, 300 x blocks 19, 24, 30 x avg1/avg2/avg4 of --channels
channels), written through the store's own writer (`bench_scale.op_write`: the real layout, checksums and
units; no U-Net), each with a class signal (class means in a 16-d subspace, strongest at t=90, block 24), so
the sweep has something to select. Each run is the CLI in a process of its own, timed from start to exit
(imports, the cluster's start, the merge and the cluster's close included), with the CPU seconds of its whole
process tree (getrusage of the children: the client, the nannies and the workers).

Thread policy, stated in the JSON:
- "one process, 1 thread" (OMP_NUM_THREADS=1) against "--workers N", one thread each: N workers vs 1;
  selections, tables, metrics and weights must be identical (bit for bit at one thread per process);
- "one process, 2 threads" (OMP_NUM_THREADS=2): a second reference, torch using both cores in one process.

Each run's results.json records its phases (wall and CPU seconds: setup, train, evaluate, report; on workers
the client's wait for the cluster and for the parts, and each part's start-up, data, training and evaluation),
copied into the JSON; CPU seconds stay meaningful on a busy machine, where wall times do not. The load
average is recorded before and after the whole benchmark and at each run's start.

Repeats: the speed of a shared 2-core machine drifts by up to 20% over minutes (the same training measured 38 to
54 CPU s within half an hour), more than the effect measured. The one-thread process and the workers therefore
run --repeats times, alternating, so that each pair meets the same conditions; the speed-up is the median of the
pairs' ratios, with the pairs listed. Results are compared between the first pair's runs.

    python benchmarks/bench_probe_workers.py [--workers 2] [--repeats 3] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import op_write  # noqa: E402  (a sibling script, not a package)

TIMESTEPS, BLOCKS, POOLS = (90, 150, 300), (19, 24, 30), (1, 2, 4)
# Sized for ~120-180 s of the one-process, one-thread sweep on an idle 2-core machine (from CPU seconds measured
# at 6,000 rows x 2 epochs: ~1.9e-4 s per row-epoch of training for the 27 features x 3 lrs, ~135 s at this size).
FULL = {"rows": 30_000, "channels": 48, "epochs": 20, "classes": 20}
QUICK = {"rows": 1_500, "channels": 16, "epochs": 2, "classes": 10}
ONE_THREAD, TWO_THREADS, WORKERS = "one_process_1_thread", "one_process_2_threads", "workers"


def case(rows: int, channels: int, classes: int) -> dict[str, Any]:
    features = [[f"t{t:03d}_b{b:02d}_avg{p}", [channels, p, p]] for t in TIMESTEPS for b in BLOCKS for p in POOLS]
    return {"size": f"sweep_{rows}", "rows": rows, "classes": classes, "features": features}


def signal(name: str) -> float:
    """Class-signal strength of a feature: strongest at t=90 and at block 24, as in the paper's sweeps."""
    return 0.3 + 0.5 * ("t090" in name) + 0.3 * ("_b24_" in name)


def run_sweep(store: Path, out: Path, epochs: int, workers: int | None, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "diffbank", "probe", "sweep", str(store), "--out", str(out), "--epochs", str(epochs)]
    cmd += ["-q"] + (["--workers", str(workers)] if workers else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = json.loads((out / "results.json").read_text())
    return {
        "seconds": round(seconds, 3),
        # every process of the run, waited for: the CLI, and on workers the nannies and workers too
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3),
        "torch_threads_per_process": threads if not workers else 1,
        "load_average_1min_at_start": round(load, 2),
        "timings": doc["timings"],
        "phases": doc["phases"],
        **({"cluster": doc["cluster"]} if "cluster" in doc else {}),
    }


def weights(path: Path) -> bytes:
    """The tensors' bytes of a safetensors file (its metadata header is written in a per-process order)."""
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def compare(one: Path, other: Path) -> dict[str, Any]:
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, other))
    return {
        "same_selection": a["selected"] == b["selected"],
        "same_table": a["sweep"] == b["sweep"],
        "same_metrics": a["metrics"] == b["metrics"],
        "same_weights": weights(one / "heads.safetensors") == weights(other / "heads.safetensors"),
    }


def load_average() -> dict[str, float]:
    return dict(zip(("1min", "5min", "15min"), (round(x, 2) for x in os.getloadavg())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--channels", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of one process and workers")
    parser.add_argument("--quick", action="store_true", help="a small store (seconds), for tests and development")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    for key in ("rows", "channels", "epochs"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench_probe_workers_"))
    try:
        store = work / "store.zarr"
        sweep = case(size["rows"], size["channels"], size["classes"])
        written = op_write(str(store), sweep, {name: signal(name) for name, _ in sweep["features"]})
        pairs = []
        for i in range(max(1, args.repeats)):
            pairs.append(
                {
                    ONE_THREAD: run_sweep(store, work / f"{ONE_THREAD}_{i}", size["epochs"], None, 1),
                    WORKERS: run_sweep(store, work / f"{WORKERS}_{i}", size["epochs"], args.workers, 1),
                }
            )
        two_run = run_sweep(store, work / TWO_THREADS, size["epochs"], None, 2)
        same = compare(work / f"{ONE_THREAD}_0", work / f"{WORKERS}_0")
        # two threads sum in another order: the same selection and metrics are expected, not the same bits
        same_two = {
            k: v for k, v in compare(work / f"{ONE_THREAD}_0", work / TWO_THREADS).items() if k != "same_weights"
        }
        picked = json.loads((work / f"{ONE_THREAD}_0" / "results.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [p[ONE_THREAD]["seconds"] / p[WORKERS]["seconds"] for p in pairs]
    speedup = statistics.median(ratios)
    one, many = (statistics.median(p[k]["seconds"] for p in pairs) for k in (ONE_THREAD, WORKERS))
    two = two_run["seconds"]
    runs = {ONE_THREAD: pairs[0][ONE_THREAD], WORKERS: pairs[0][WORKERS], TWO_THREADS: two_run}
    report = {
        "size": size,
        "features": len(sweep["features"]),
        "lrs_per_feature": 3,
        "store_bytes": written["bytes"],
        "class_signal": "class means in a random 16-d subspace per feature, strength 0.3 + 0.5 (t=90) + 0.3 (block 24)",
        "workers": args.workers,
        "thread_policy": (
            f"{ONE_THREAD}: one process, OMP_NUM_THREADS=1; {WORKERS}: --workers {args.workers}, one thread each "
            f"(the comparison); {TWO_THREADS}: one process, OMP_NUM_THREADS=2 (a second reference)"
        ),
        "repeats": len(pairs),
        "speedup": round(speedup, 3),
        "speedup_pairs": [round(r, 3) for r in ratios],
        "median_seconds": {ONE_THREAD: one, WORKERS: many},
        "speedup_vs_2_threads": round(two / many, 3),
        **same,
        "two_threads_same": same_two,
        "selected": picked["selected"]["head"],
        "val_top1": picked["metrics"]["val"]["top1"],
        "test_top1": picked["metrics"]["test"]["top1"],
        "runs": runs,
        "pairs": [
            {
                k: {
                    "seconds": r["seconds"],
                    "cpu_s": r["cpu_s"],
                    "load_average_1min_at_start": r["load_average_1min_at_start"],
                }
                for k, r in p.items()
            }
            for p in pairs
        ],
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "quick": args.quick,
    }
    print(f"{report['features']} features x 3 lrs, {size['rows']} rows, {size['epochs']} epochs")
    print(f"load average before {load_before['1min']}, after {report['load_average_after']['1min']} (1 min)")
    for i, p in enumerate(pairs):
        print(
            f"pair {i}: one process, 1 thread {p[ONE_THREAD]['seconds']:7.1f} s (cpu {p[ONE_THREAD]['cpu_s']:6.1f}), "
            f"{args.workers} workers {p[WORKERS]['seconds']:6.1f} s (cpu {p[WORKERS]['cpu_s']:6.1f}): {ratios[i]:.2f}x"
        )
    print(f"one process, 2 threads {two:7.1f} s (cpu {two_run['cpu_s']:6.1f})")
    print(
        f"speed-up of {args.workers} workers: median {speedup:.2f}x over {len(pairs)} pairs "
        f"(median times {one:.1f} s vs {many:.1f} s; vs 2 threads {two / many:.2f}x)"
    )
    print(f"same selection {same['same_selection']}, table {same['same_table']}, weights {same['same_weights']}")
    print(f"selected {report['selected']}, test top-1 {report['test_top1']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
