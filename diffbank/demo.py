"""`diffbank demo`: the method end to end on real images, on any machine, in minutes.

The embedded Fashion-MNIST diffusion model (trained by `diffbank train`, shipped as safetensors) is
run on Fashion-MNIST: a feature bank is extracted to a Zarr store, then the linear sweep (heat map
over timestep x block), the linear head, the attention head and DifFormer fusion are trained from
the cache, each selected on a validation split carved from train and reported on test.

Everything it writes lands in `--out`, and rerunning the same command resumes: finished extraction
units and finished probe epochs are not recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from diffbank.commands.options import quiet
from extract.idx import FASHION_MNIST_DIR, FASHION_MNIST_FILES, find_idx_file
from extract.provenance import to_jsonable

log = logging.getLogger(__name__)

APT_PACKAGE = "dataset-fashion-mnist"
# The demo's spec lives once, with the other shipped specs; the options below override parts of it.
DEMO_SPEC = Path(__file__).resolve().parents[1] / "cache_specs" / "fmnist_demo.yaml"
DEFAULT_TIMESTEPS = (10, 100, 400)
# The middle block (8x8), the last 8x8 decoder block, and the first 16x16 decoder block (after the upsampling
# ResBlock): the decoder side the paper finds best. Blocks past 13 cost 1.4-2.6x more per image on a CPU.
DEFAULT_BLOCKS = (10, 12, 13)
DEFAULT_TOKEN_BLOCK = 13  # 16x16 map -> at most 8x8 tokens for the attention head
# Short CPU schedules: the lr drops once, at ~2/3 of the epochs (the paper's 28 epochs drop every 7). The
# transformer heads get momentum and an lr chosen on validation: without momentum, SGD moves them too
# little in a few hundred steps (measured on the demo's store).
HEAD_LRS = (0.05,)  # the paper's lr; with momentum (measured on a small demo store: 0.05 beat 0.01 and 0.2)
HEAD_MOMENTUM = 0.9


def short_schedule(epochs: int) -> int:
    return max(1, (2 * epochs) // 3)


class DataMissing(click.ClickException):
    pass


def fashion_mnist_present(directory: Path) -> bool:
    try:
        for img, lbl in FASHION_MNIST_FILES.values():
            find_idx_file(directory, img)
            find_idx_file(directory, lbl)
    except FileNotFoundError:
        return False
    return True


def ensure_fashion_mnist(directory: Path, install: bool = True) -> Path:
    """The folder with Fashion-MNIST's IDX files; installs Debian's package when it can."""
    if fashion_mnist_present(directory):
        return directory
    how = (
        f"Point diffbank at Fashion-MNIST's four IDX files with --data FOLDER (train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, from the "
        f"Fashion-MNIST repository), or install Debian's package: sudo apt-get install {APT_PACKAGE}"
    )
    if directory != FASHION_MNIST_DIR:
        raise DataMissing(f"Fashion-MNIST not found in {directory}. {how}")
    apt = shutil.which("apt-get")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not install or apt is None or not is_root:
        reason = (
            "installing is off"
            if not install
            else "this system has no apt-get"
            if apt is None
            else "installing needs root"
        )
        raise DataMissing(f"Fashion-MNIST not found in {directory} and {reason}. {how}")
    log.info(f"Fashion-MNIST not found; installing Debian's {APT_PACKAGE} ...")
    for cmd in (
        [apt, "install", "-y", "-q", APT_PACKAGE],
        [apt, "update", "-q"],
        [apt, "install", "-y", "-q", APT_PACKAGE],
    ):
        done = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if done.returncode == 0 and fashion_mnist_present(directory):
            return directory
    raise DataMissing(
        f"could not install {APT_PACKAGE} ({done.stderr.strip().splitlines()[-1:] or 'no output'}). {how}"
    )


def demo_spec(
    data_dir: Path,
    train: int | None,
    test: int | None,
    timesteps=DEFAULT_TIMESTEPS,
    blocks=DEFAULT_BLOCKS,
    token_block: int = DEFAULT_TOKEN_BLOCK,
) -> dict[str, Any]:
    """cache_specs/fmnist_demo.yaml with the demo's data folder, image counts, timesteps and blocks."""
    import yaml

    spec = yaml.safe_load(DEMO_SPEC.read_text())
    limit = {k: v for k, v in (("train", train), ("test", test)) if v is not None}
    spec["dataset"]["path"] = str(data_dir)
    if limit:
        spec["dataset"]["limit"] = limit
    else:
        spec["dataset"].pop("limit", None)
    spec["features"].update(timesteps=list(timesteps), blocks=list(blocks), tokens={token_block: 8})
    return spec


def _row(name: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    metrics = result.get("metrics", {})
    test = metrics.get("test", metrics)
    val = metrics.get("val", {})
    feature = result.get("selected", {}).get("feature") or ", ".join(result.get("features", []))
    if len(feature) > 48:
        feature = f"{len(result.get('features', []))} features"
    return {
        "probe": name,
        "feature": feature,
        "val_top1": val.get("top1"),
        "test_top1": test.get("top1"),
        "seconds": round(seconds, 1),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    fmt = "{:<12} {:<48} {:>8} {:>9} {:>8}"
    click.echo(fmt.format("probe", "feature(s)", "val top1", "test top1", "seconds"))
    for r in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        click.echo(fmt.format(r["probe"], r["feature"], pct(r["val_top1"]), pct(r["test_top1"]), r["seconds"]))


def run_demo(
    out: Path,
    data_dir: Path,
    *,
    train: int | None = 10_000,
    test: int | None = 2_000,
    timesteps=DEFAULT_TIMESTEPS,
    blocks=DEFAULT_BLOCKS,
    token_block: int = DEFAULT_TOKEN_BLOCK,
    epochs: int = 10,
    head_epochs: int = 6,
    lrs=(1e-3, 1e-2, 1e-1),
    preset: str = "tiny",
    install: bool = True,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Extract, sweep, and train the linear, attention and fusion heads; returns the summary it writes.

    The demo's extraction is one process with the whole machine to itself, so it computes with a torch
    thread per core unless `threads` says otherwise (`diffbank extract` defaults to one per process, so
    that its bytes never depend on the machine; the store records the count either way).
    """
    # Imported when the demo runs, not when the CLI starts: `import probe.run` (torch, the store reader)
    # measured 4.7-8.3 s on 2 busy cores, the CLI without it 0.4 s.
    from extract.pipeline import extract
    from extract.spec import load_spec
    from probe.options import AttentionOptions, FusionOptions, LinearOptions, SweepOptions
    from probe.run import run_attention, run_fusion, run_linear, run_sweep

    started = time.perf_counter()
    data_dir = ensure_fashion_mnist(Path(data_dir), install=install)
    if token_block not in blocks:
        token_block = max(blocks)  # tokens from the deepest requested block, the paper's choice for its head
    out.mkdir(parents=True, exist_ok=True)
    spec_dict = demo_spec(data_dir, train, test, timesteps, blocks, token_block)
    spec = load_spec(spec_dict)  # every problem reported before any work
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    store_url = str(out / "features.zarr")
    log.info(
        f"[1/5] extracting {spec.known_num_samples() or '?'} images x {len(spec.features())} features -> {store_url}"
    )
    t0 = time.perf_counter()
    summary = extract(spec, store_url, progress=progress, threads=threads or os.cpu_count() or 1)
    timings = {"extract_s": time.perf_counter() - t0}
    rows = []

    log.info(f"[2/5] linear sweep: {len(lrs)} learning rates x every (t, block, pooling), one pass")
    t0 = time.perf_counter()
    sweep = run_sweep(
        store_url,
        out / "sweep",
        SweepOptions(lrs=lrs, epochs=epochs, step_size=short_schedule(epochs), progress=progress),
    )
    rows.append(_row("sweep", sweep, time.perf_counter() - t0))
    best = sweep["selected"]
    log.info(f"      selected on val: {best['feature']} lr={best['lr']:g}")

    log.info("[3/5] linear head on the selected feature (paper recipe, selected lr)")
    t0 = time.perf_counter()
    linear = run_linear(
        store_url,
        out / "linear",
        LinearOptions(
            features=[best["feature"]],
            lr=best["lr"],
            epochs=epochs,
            step_size=short_schedule(epochs),
            progress=progress,
        ),
    )
    rows.append(_row("linear", linear, time.perf_counter() - t0))

    best_t = int(best["feature"][1:4])
    tok_feature = f"t{best_t:03d}_b{token_block:02d}_tok8"
    log.info(f"[4/5] attention head on {tok_feature}")
    t0 = time.perf_counter()
    head_opts: dict[str, Any] = {
        "preset": preset,
        "epochs": head_epochs,
        "lrs": HEAD_LRS,
        "momentum": HEAD_MOMENTUM,
        "step_size": short_schedule(head_epochs),
        "progress": progress,
    }
    attention = run_attention(store_url, out / "attention", AttentionOptions(features=[tok_feature], **head_opts))
    rows.append(_row("attention", attention, time.perf_counter() - t0))

    fusion_features = [f"t{t:03d}_b{b:02d}_avg4" for t in spec.grid.timesteps for b in spec.grid.blocks]
    log.info(
        f"[5/5] DifFormer fusion over blocks {list(spec.grid.blocks)} x t {list(spec.grid.timesteps)} "
        f"(4x4 tokens per block)"
    )
    t0 = time.perf_counter()
    fusion = run_fusion(store_url, out / "fusion", FusionOptions(features=fusion_features, **head_opts))
    rows.append(_row("fusion", fusion, time.perf_counter() - t0))

    timings["total_s"] = time.perf_counter() - started
    result = {
        "store": store_url,
        "extraction": {
            k: summary.get(k)
            for k in (
                "images",
                "units_computed",
                "units_already_done",
                "seconds",
                "model_seconds",
                "images_per_s",
                "failures",
            )
        },
        "probes": rows,
        "heatmap": str(out / "sweep" / "heatmap.png"),
        "accuracy_vs_t": str(out / "sweep" / "accuracy_vs_t.png"),
        "timings": timings,
    }
    (out / "demo.json").write_text(json.dumps(to_jsonable(result), indent=1))
    click.echo("")
    _print_table(rows)
    click.echo(f"\nheat map (test top-1 over t x block): {result['heatmap']}")
    click.echo(f"total {timings['total_s'] / 60:.1f} min; results in {out}/ (demo.json, */results.json)")
    return result


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=FASHION_MNIST_DIR,
    show_default=True,
    help="Folder with Fashion-MNIST's IDX files.",
)
@click.option(
    "--train",
    "train_n",
    type=int,
    default=10_000,
    show_default=True,
    help="Training images to extract (0: all 60,000).",
)
@click.option(
    "--test", "test_n", type=int, default=2_000, show_default=True, help="Test images to extract (0: all 10,000)."
)
@click.option("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)), show_default=True)
@click.option("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)), show_default=True)
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs of the linear sweep and head.")
@click.option("--head-epochs", type=int, default=6, show_default=True, help="Epochs of the attention/fusion heads.")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "paper"]),
    default="tiny",
    show_default=True,
    help="Size of the attention and fusion heads.",
)
@click.option("--no-install", is_flag=True, help="Never try to install Debian's dataset package.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads for the extraction (default: one per core).",
)
def demo_command(
    out, data_dir, train_n, test_n, timesteps, blocks, epochs, head_epochs, preset, no_install, threads
):
    """Real images end to end: embedded Fashion-MNIST diffusion model -> feature store -> probes."""
    try:
        run_demo(
            out,
            data_dir,
            train=train_n or None,
            test=test_n or None,
            timesteps=_ints(timesteps),
            blocks=_ints(blocks),
            epochs=epochs,
            head_epochs=head_epochs,
            preset=preset,
            install=not no_install,
            progress=not quiet(),
            threads=threads,
        )
    except KeyboardInterrupt:
        log.warning(f"interrupted; rerun the same command to resume from {out}")
        sys.exit(130)
