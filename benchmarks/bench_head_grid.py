"""A head grid in one pass against the same heads trained one by one, as commands a user types.

- Arm A: ONE `diffbank probe attention` (or `fusion`) with every `--lr` x `--weight-decay`: one read of the data
  per epoch, a parameter group per head, one summed loss.
- Arm B: one `diffbank probe attention` per (lr, weight decay), each its own process.

Every run is its own process, timed (wall and CPU seconds) with its peak RSS from `os.wait4`, so the arms are
measured side by side in the same script on the same machine state. Both arms use the same seed (same splits,
batch order and initial weights), so each head of the grid should end with the validation accuracy it has
alone; the script checks that and prints both tables, then the ratios.

    python benchmarks/bench_head_grid.py STORE --feature t005_b10_tok8 --lr 3e-4 --lr 1e-3 \\
        --weight-decay 1e-3 --weight-decay 5e-2 --epochs 2 --recipe attentive --preset tiny --threads 1 \\
        [--head attention] [--subset 10%] [--positions learned] [--out DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def timed_process(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `cmd` to completion; its wall seconds, CPU seconds (user + system) and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=False)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{stderr[-3000:]}")
    # ru_maxrss is in KiB on Linux.
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def head_table(results: dict[str, Any]) -> dict[tuple[float, float], dict[str, Any]]:
    """(lr, weight decay) -> the head's validation record, from a grid's or a single run's results.json."""
    if "lr_sweep" in results:
        return {(r["lr"], r["weight_decay"]): r for r in results["lr_sweep"]}
    sel = results["selected"]
    return {(sel["lr"], results["config"]["weight_decay"]): {"val_accuracy": sel["val_accuracy"], "best_epoch": sel["epoch"]}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--head", choices=("attention", "fusion"), default="attention")
    ap.add_argument("--feature", action="append", default=[])
    ap.add_argument("--lr", type=float, action="append", required=True)
    ap.add_argument("--weight-decay", type=float, action="append", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--recipe", default="attentive")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--positions", default="none")
    ap.add_argument("--subset", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="run directories (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if len(args.lr) * len(args.weight_decay) < 2:
        ap.error("a grid needs at least two heads: give --lr or --weight-decay more than once")

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = [
        *(f"--feature={f}" for f in args.feature),
        f"--epochs={args.epochs}",
        f"--recipe={args.recipe}",
        f"--preset={args.preset}",
        f"--positions={args.positions}",
        f"--seed={args.seed}",
        *([f"--subset={args.subset}"] if args.subset else []),
    ]
    base = [sys.executable, "-m", "diffbank", "-q", "probe", args.head, args.store]
    grid = list(itertools.product(args.lr, args.weight_decay))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        out_grid = root / "grid"
        cmd = [*base, "--out", str(out_grid), *common]
        cmd += [f"--lr={lr}" for lr in args.lr] + [f"--weight-decay={wd}" for wd in args.weight_decay]
        print("grid:", " ".join(cmd[2:]), flush=True)
        grid_cost = timed_process(cmd, env)
        grid_heads = head_table(json.loads((out_grid / "results.json").read_text()))
        single_costs, single_heads = [], {}
        for i, (lr, wd) in enumerate(grid):
            out_i = root / f"single_{i}"
            cmd = [*base, "--out", str(out_i), *common, f"--lr={lr}", f"--weight-decay={wd}"]
            print(f"one by one {i + 1}/{len(grid)}:", " ".join(cmd[2:]), flush=True)
            single_costs.append(timed_process(cmd, env))
            single_heads.update(head_table(json.loads((out_i / "results.json").read_text())))

    one_by_one = {
        "wall_s": sum(c["wall_s"] for c in single_costs),
        "cpu_s": sum(c["cpu_s"] for c in single_costs),
        "peak_rss_mib": max(c["peak_rss_mib"] for c in single_costs),
    }
    heads = [
        {
            "lr": lr,
            "weight_decay": wd,
            "val_grid": grid_heads[(lr, wd)]["val_accuracy"],
            "val_alone": single_heads[(lr, wd)]["val_accuracy"],
        }
        for lr, wd in grid
    ]
    print(f"\n{'arm':<28}{'wall s':>10}{'CPU s':>10}{'peak RSS MiB':>14}")
    print(f"{'grid, one process':<28}{grid_cost['wall_s']:>10.1f}{grid_cost['cpu_s']:>10.1f}{grid_cost['peak_rss_mib']:>14.0f}")
    print(f"{f'{len(grid)} runs one by one':<28}{one_by_one['wall_s']:>10.1f}{one_by_one['cpu_s']:>10.1f}"
          f"{one_by_one['peak_rss_mib']:>14.0f}  (peak of the largest)")
    for c in single_costs:
        print(f"{'  one run':<28}{c['wall_s']:>10.1f}{c['cpu_s']:>10.1f}{c['peak_rss_mib']:>14.0f}")
    print(f"\n{'lr':>8}{'wd':>8}{'val % grid':>12}{'val % alone':>13}")
    for h in heads:
        print(f"{h['lr']:>8g}{h['weight_decay']:>8g}{100 * h['val_grid']:>12.2f}{100 * h['val_alone']:>13.2f}")
    same = all(abs(h["val_grid"] - h["val_alone"]) < 1e-9 for h in heads)
    print(f"\nwall: one by one / grid = {one_by_one['wall_s'] / grid_cost['wall_s']:.2f}x; "
          f"CPU: {one_by_one['cpu_s'] / grid_cost['cpu_s']:.2f}x; every head's validation accuracy equal: {same}")
    report = {
        "benchmark": "bench_head_grid",
        "protocol": {
            "store": args.store,
            "head": args.head,
            "features": args.feature,
            "grid": {"lr": args.lr, "weight_decay": args.weight_decay},
            "epochs": args.epochs,
            "recipe": args.recipe,
            "preset": args.preset,
            "positions": args.positions,
            "subset": args.subset,
            "seed": args.seed,
            "threads": args.threads,
            "measured": "each run its own process; wall and CPU seconds and peak RSS from os.wait4",
        },
        "grid": grid_cost,
        "one_by_one": {**one_by_one, "runs": single_costs},
        "heads": heads,
        "same_validation_accuracy": same,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
