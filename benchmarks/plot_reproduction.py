"""Figures for docs/results.md from the reproduction's JSON: accuracy over training progress, and over t.

    python benchmarks/plot_reproduction.py docs/results/reproduction_gpu.json docs/results/reproduction_t_curve.json \
        [docs/results/reproduction_cpu_full.json]

The third file (the CPU run from the cached grid) adds the final model's point, which the GPU run's time box
left out, on the same grid and protocol.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = json.loads(Path(sys.argv[1]).read_text())
    curve = json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else None
    cpu = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else {}
    progress = gpu["run_2_progress_t_5"]["progress"]
    progress = progress + [p for p in cpu.get("progress", []) if p["model"] == "final" and p not in progress]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    trained = sorted((p for p in progress if p["model"] != "random"), key=lambda p: p["epochs"])
    ax.plot([p["epochs"] for p in trained], [p["selected"]["test"] for p in trained], "o-", label="trained (EMA)")
    random = next(p for p in progress if p["model"] == "random")["selected"]["test"]
    ax.axhline(random, color="gray", ls="--", label=f"random init ({random:.2f})")
    pixels = gpu["run_2_progress_t_5"]["pixels"]["test"]
    ax.axhline(pixels, color="tab:red", ls=":", label=f"pixels ({pixels:.2f})")
    ax.set_xscale("log")
    ax.set_xticks([0.5, 1, 2, 5, 10], ["0.5", "1", "2", "5", "10"])
    ax.minorticks_off()
    ax.set_xlabel("epochs of diffusion training")
    ax.set_ylabel("linear probe test top-1 (%)")
    ax.set_title("Fashion-MNIST, t=5, blocks 10/12/13, selected on val", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("docs/fmnist_progress.png", dpi=120)
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        rows = curve["t_curve"]
        ax.plot([max(r["t"], 0.5) for r in rows], [r["test"] for r in rows], "o-")
        ax.set_xscale("log")
        ticks = [max(r["t"], 0.5) for r in rows]
        ax.set_xticks(ticks, [str(r["t"]) for r in rows], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("t (of 1000; 0 plotted at 0.5)")
        ax.set_ylabel("linear probe test top-1 (%)")
        ax.set_title(f"final model, block {rows[0]['block']} {rows[0]['pool']}, L2 selected on val", fontsize=9)
        fig.tight_layout()
        fig.savefig("docs/fmnist_t_curve.png", dpi=120)


if __name__ == "__main__":
    main()
