"""Sweep benchmark: 9 (t, block) features x 3 learning rates as a user runs them.

- Arm A: ONE call of `probe.run.run_sweep(store, out, SweepOptions(lrs=LRS, epochs=E))` over the store's 9 features (one
  statistics pass and one read, all 27 linear heads trained in one pass over the batches).
- Arm B: 27 separate calls of `probe.run.run_linear(store, out_i, LinearOptions(features=[f], lr=lr, epochs=E))`, each with its
  own statistics pass, reads, evaluation and results file, as 27 separate runs are.

Both arms read the same Zarr store written by `extract.store.save_features` (float16, as caches usually are:
10k samples, 9 features of 512-2048 dims with class structure strongest at t=90, block 24), use the same seed
(same splits, same batch order, same initial weights per feature), the same epochs and the same recipe, so both
should select the same (feature, lr) with the same accuracies; the script checks that and prints the time ratio.

- With `--cli`, the same two arms again as commands a user types, each its own process: one
  `diffbank probe sweep` against 27 `diffbank probe linear` (process start-up and imports included, which is
  what separate runs cost in practice).

- With `--sweep-only --repeat R`, arm A alone, R times: the trainer's own figure (min wall and CPU seconds),
  e.g. to compare two versions of the trainer on a busy machine, where CPU seconds vary less than wall.

    python benchmarks/bench_sweep.py [--samples 10000] [--epochs 4] [--classes 10] [--threads 1] [--profile] [--cli]
                                     [--sweep-only] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

TIMESTEPS = (60, 90, 150)
BLOCKS = {19: (512, 2, 2), 24: (256, 2, 2), 30: (128, 2, 2)}  # 2048-, 1024- and 512-d features
LRS = (1e-3, 1e-2, 1e-1)


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """float16 features whose class signal (a random 16-d subspace) is strongest at t=90, block 24."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    feats = {}
    for t in TIMESTEPS:
        for b, shape in BLOCKS.items():
            d = int(np.prod(shape))
            strength = 1.0 / (1 + abs(t - 90) / 60 + abs(b - 24) / 6)
            means = rng.normal(size=(classes, 16)) * strength * 0.35
            basis = np.linalg.qr(rng.normal(size=(d, 16)))[0]
            x = rng.normal(size=(n, d)).astype(np.float32) + (means[y] @ basis.T).astype(np.float32) * 3
            feats[f"t{t:03d}_b{b:02d}_avg2"] = x.reshape(n, *shape).astype(np.float16)
    return feats, y


def _profiled(enabled: bool, label: str):
    if not enabled:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            print(f"---- profile: {label}\n{out.getvalue()}")

    return run()


def _separate_selection(results: dict[tuple[str, float], dict[str, Any]]) -> tuple[str, float]:
    """The best of the separate runs, by the rule that picks a sweep's head (`probe.metrics.select_best`)."""
    from probe.metrics import select_best, selection_rank

    def rank(key: tuple[str, float]) -> tuple[float, float]:
        tr = results[key]["training"]
        loss = tr["history"][tr["best_epoch"]]["val_loss"] if tr["best_epoch"] is not None else None
        return selection_rank(tr["val_accuracy"], loss)

    best = select_best(results, rank)  # features sorted, lrs ascending: the sweep's head order
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of both arms")
    parser.add_argument("--cli", action="store_true", help="also time both arms as separate CLI processes")
    parser.add_argument("--sweep-only", action="store_true", help="time arm A (run_sweep) only")
    parser.add_argument("--repeat", type=int, default=1, help="runs of arm A; the minimum is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    from extract.store import save_features
    from probe.options import LinearOptions, SweepOptions
    from probe.run import run_linear, run_sweep

    n = args.samples
    feats, y = synthetic(n, args.classes)
    names = sorted(feats)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    rows = np.arange(n)
    splits = {"train": rows[:n_train], "val": rows[n_train : n_train + n_val], "test": rows[n_train + n_val :]}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store_path = os.path.join(tmp, "bench.zarr")
        save_features(store_path, feats, y, splits)
        write_s = time.perf_counter() - t0
        del feats
        dims = sorted({int(np.prod(s)) for s in BLOCKS.values()})
        print(
            f"store: Zarr, float16, {n} samples ({n_train} train / {n_val} val / {n - n_train - n_val} test), "
            f"{len(names)} features of {dims} dims, {args.classes} classes (written in {write_s:.1f}s)"
        )
        print(
            f"recipe: {len(LRS)} lrs {LRS}, {args.epochs} epochs, batch {args.batch_size}, "
            f"{args.threads} thread(s), seed 0"
        )

        # Warm-up outside the timings (imports incl. matplotlib, torch's first optimizer step): tiny runs of
        # both commands on one feature, so neither arm pays one-off process costs.
        run_linear(store_path, os.path.join(tmp, "warm"), LinearOptions(features=[names[0]], epochs=1, progress=False))
        run_sweep(
            store_path,
            os.path.join(tmp, "warm_sweep"),
            SweepOptions(features=[names[0]], lrs=LRS[:2], epochs=1, progress=False),
        )

        common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=0, progress=False)
        walls, cpus = [], []
        for i in range(max(1, args.repeat)):
            t0, c0 = time.perf_counter(), time.process_time()
            with _profiled(args.profile, "arm A (run_sweep)"):
                sweep = run_sweep(
                    store_path, os.path.join(tmp, f"sweep{i}"), SweepOptions(features=names, lrs=LRS, **common)
                )
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        time_a, cpu_a = min(walls), min(cpus)
        if args.sweep_only:
            print(
                f"A: 1 x run_sweep (27 heads): wall {time_a:.2f}s, cpu {cpu_a:.2f}s (min of {len(walls)}; walls "
                f"{', '.join(f'{w:.2f}' for w in walls)}); selected {sweep['selected']['feature']} "
                f"lr={sweep['selected']['lr']} val {sweep['metrics']['val']['top1']:.4f} "
                f"test {sweep['metrics']['test']['top1']:.4f}"
            )
            return

        separate: dict[tuple[str, float], dict[str, Any]] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        with _profiled(args.profile, "arm B (27 x run_linear)"):
            for i, name in enumerate(names):
                for j, lr in enumerate(sorted(LRS)):
                    separate[(name, lr)] = run_linear(
                        store_path,
                        os.path.join(tmp, f"linear_{i}_{j}"),
                        LinearOptions(features=[name], lr=lr, **common),
                    )
        time_b, cpu_b = time.perf_counter() - t0, time.process_time() - c0
        cli_times = _cli_arms(store_path, tmp, names, args) if args.cli else None

    sel_a = (sweep["selected"]["feature"], sweep["selected"]["lr"])
    sel_b = _separate_selection(separate)
    acc_a = (sweep["metrics"]["val"]["top1"], sweep["metrics"]["test"]["top1"])
    acc_b = (separate[sel_b]["metrics"]["val"]["top1"], separate[sel_b]["metrics"]["test"]["top1"])
    print()
    print(
        f"{'arm':34s} {'wall s':>8s} {'cpu s':>7s}  {'selected (feature, lr)':28s} {'epoch':>5s} {'val top1':>8s} {'test top1':>9s}"
    )
    print(
        f"{'A: 1 x run_sweep (27 heads)':34s} {time_a:8.1f} {cpu_a:7.1f}  {str(sel_a):28s} "
        f"{sweep['selected']['epoch']:5d} {acc_a[0]:8.4f} {acc_a[1]:9.4f}"
    )
    print(
        f"{'B: 27 x run_linear':34s} {time_b:8.1f} {cpu_b:7.1f}  {str(sel_b):28s} "
        f"{separate[sel_b]['selected']['epoch']:5d} {acc_b[0]:8.4f} {acc_b[1]:9.4f}"
    )
    print(f"speed-up B/A: {time_b / time_a:.2f}x (target >= 5x)")
    if cli_times:
        c, d = cli_times
        print(f"{'C: 1 x diffbank probe sweep':34s} {c:8.1f}")
        print(f"{'D: 27 x diffbank probe linear':34s} {d:8.1f}")
        print(f"speed-up D/C (separate processes): {d / c:.2f}x")

    # Per head: the sweep's head against the separate run with the same (feature, lr).
    table = {(r["feature"], r["lr"]): r for r in sweep["sweep"]}
    same_val = sum(table[k]["val_top1"] == separate[k]["training"]["val_accuracy"] for k in separate)
    same_test = sum(table[k]["test_top1"] == separate[k]["training"]["test_accuracy"] for k in separate)
    same_epoch = sum(table[k]["best_epoch"] == separate[k]["training"]["best_epoch"] for k in separate)
    print(
        f"per head, sweep vs separate run: same best epoch {same_epoch}/27, same val top-1 {same_val}/27, "
        f"same test top-1 {same_test}/27"
    )
    print(f"same selection: {sel_a == sel_b}; same selected accuracies: {acc_a == acc_b}")
    best_lr = {}
    for r in sweep["sweep"]:
        if r["selected_for_feature"]:
            best_lr[r["feature"]] = (r["lr"], round(r["val_top1"], 4))
    print("sweep, best (lr, val top-1) per feature:", best_lr)


def _cli_arms(store: str, tmp: str, names: list[str], args: argparse.Namespace) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", "0"]

    def run(argv: list[str]) -> None:
        subprocess.run(
            [sys.executable, "-m", "diffbank.cli", *argv],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    t0 = time.perf_counter()
    lr_args = [a for lr in LRS for a in ("--lr", str(lr))]
    run(["probe", "sweep", store, "--out", os.path.join(tmp, "cli_sweep"), *lr_args, *common])
    c = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        for j, lr in enumerate(sorted(LRS)):
            run(
                [
                    "probe",
                    "linear",
                    store,
                    "--out",
                    os.path.join(tmp, f"cli_linear_{i}_{j}"),
                    "--feature",
                    name,
                    "--lr",
                    str(lr),
                    *common,
                ]
            )
    return c, time.perf_counter() - t0


if __name__ == "__main__":
    main()
