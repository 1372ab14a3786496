"""Peak RSS of `diffbank probe linear` and `diffbank probe sweep` against `--memory-budget`.

Writes (once) a float16 store about `--factor` x the budget with `extract.store.save_features`, then runs each
command as its own process and reads that process's peak RSS from the OS (`os.wait4`'s rusage, ru_maxrss):
the counter `/usr/bin/time -v` prints. A baseline run of the same command on a tiny store gives the fixed part
(Python, torch, zarr, the model); the claim checked is

    peak RSS <= budget + constant,  constant = baseline RSS + reader scratch (8 MiB x decode threads)
                                               + statistics blocks (~80 MiB, see probe/data.py)

    python benchmarks/bench_probe_memory.py [--budget 100MB] [--factor 4] [--dims 4096] [--epochs 1]
                                            [--store /tmp/diffbank-mem.zarr] [--sweep-features 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURE = "t090_b24_avg2"
MiB = 2**20


def _parse_bytes(text: str) -> int:
    from probe.budget import parse_memory

    return parse_memory(text)


def write_store(path: Path, rows: int, dims: int, n_features: int, classes: int = 10) -> None:
    from extract.store import save_features

    rng = np.random.default_rng(0)
    y = np.arange(rows) % classes
    names = [FEATURE] + [f"t{90 + 30 * i:03d}_b24_avg2" for i in range(1, n_features)]
    centers = rng.standard_normal((classes, dims)).astype(np.float32)
    feats = {}
    for name in names:
        x = np.empty((rows, dims // 4, 2, 2), np.float16)
        for lo in range(0, rows, 4096):  # class structure plus noise, written in slabs to stay small here too
            hi = min(rows, lo + 4096)
            slab = rng.standard_normal((hi - lo, dims), dtype=np.float32) + centers[y[lo:hi]] * 0.3
            x[lo:hi] = slab.reshape(hi - lo, dims // 4, 2, 2)
        feats[name] = x
    save_features(path, feats, y, None, class_names=[f"c{i}" for i in range(classes)])


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    """(peak RSS bytes, wall seconds, exit status) of one command, from the OS's own counter.

    `/usr/bin/time -v` runs the command: a child forked from this (large) process would inherit its RSS
    high-water mark in ru_maxrss, while one forked from `time` starts from time's few MB.
    """
    t0 = time.perf_counter()
    timer = shutil.which("time", path="/usr/bin:/bin")
    if timer is None:  # pragma: no cover - then wait4 on a direct child (an upper bound: see above)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        return usage.ru_maxrss * 1024, time.perf_counter() - t0, os.waitstatus_to_exitcode(status)
    proc = subprocess.run([timer, "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kib = [int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line]
    if proc.returncode:
        sys.stderr.write(proc.stderr[-2000:])
    return (kib[-1] * 1024 if kib else -1), time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="100MB")
    ap.add_argument("--factor", type=float, default=4.0, help="store bytes (float16) / budget")
    ap.add_argument("--dims", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sweep-features", type=int, default=1, help="features of the store (the sweep reads all)")
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "diffbank-mem.zarr"))
    args = ap.parse_args()
    budget = _parse_bytes(args.budget)
    rows = int(args.factor * budget / (2 * args.dims * args.sweep_features))
    store = Path(args.store)
    tiny = store.with_name(store.name + ".tiny")
    marker = store / ".bench-shape"
    shape = f"{rows} {args.dims} {args.sweep_features}"
    if not marker.exists() or marker.read_text() != shape:
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        write_store(store, rows, args.dims, args.sweep_features)
        marker.write_text(shape)
        print(
            f"wrote {store}: {rows} rows x {args.dims} dims x {args.sweep_features} feature(s), "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    if not tiny.exists():
        write_store(tiny, 2000, args.dims, args.sweep_features)
    fp16 = rows * args.dims * 2 * args.sweep_features
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    reader = 8 * MiB * workers
    stats_blocks = 80 * MiB
    print(
        f"store: {fp16 / 1e6:.0f} MB float16 ({fp16 * 2 / 1e6:.0f} MB as float32), budget {budget / 1e6:.0f} MB "
        f"({fp16 / budget:.1f}x); reader scratch {reader / MiB:.0f} MiB ({workers} threads)"
    )
    # the console script next to this Python first: the benchmark may run from a venv that is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env_cmd = [shutil.which("diffbank", path=path) or "diffbank"]
    rows_out = []
    for command in ("linear", "sweep"):
        with tempfile.TemporaryDirectory() as tmp:
            base_cmd = [*env_cmd, "probe", command, "--epochs", str(args.epochs), "--quiet"]
            if command == "linear":
                base_cmd += ["--feature", FEATURE]
            base, _, rc0 = peak_rss([*base_cmd, str(tiny), "--out", f"{tmp}/tiny", "--memory-budget", args.budget])
            big, wall, rc = peak_rss([*base_cmd, str(store), "--out", f"{tmp}/big", "--memory-budget", args.budget])
        constant = base + reader + stats_blocks
        ok = rc == 0 and rc0 == 0 and big <= budget + constant
        rows_out.append((command, big, base, constant, wall, ok))
        print(
            f"probe {command:6s}: peak RSS {big / MiB:7.0f} MiB   baseline (tiny store) {base / MiB:5.0f} MiB   "
            f"budget + constant = {budget / MiB:.0f} + {constant / MiB:.0f} = {(budget + constant) / MiB:.0f} MiB   "
            f"data above baseline {(big - base) / MiB:5.0f} MiB   {wall:5.0f} s   "
            f"{'OK' if ok else 'OVER' if rc == rc0 == 0 else f'FAILED (exit {rc0}, {rc})'}",
            flush=True,
        )
    sys.exit(0 if all(r[-1] for r in rows_out) else 1)


if __name__ == "__main__":
    main()
