"""The miniature reproduction on the full Fashion-MNIST: what diffusion training adds, measured.

For every model (the guided-diffusion-initialised random network, each EMA snapshot of a training run,
and its final EMA weights) the same feature grid is extracted for all 70,000 images, in memory, with the
project's own pieces: the reference preprocessing, the seeded per-sample noise rule of the store
(`extract.diffusion.seeded_noise`, keyed by (seed, row, t, draw), rows 0-59,999 train and 60,000-69,999 test,
as `diffbank extract` numbers them), `ADMUNet.features` and `extract.pooling`. Linear probes are exact
multinomial logistic regressions (`probe.exact_logistic`, L-BFGS) over an L2 grid on standardised features
(`probe.stats`, the probes' own standardiser).

Protocol: a seeded, stratified 10% of the training images (`probe.splits.carve_validation`, seed 0) are the
validation split; every choice (t, block, pooling, L2) is made there; the test images are scored once per
selected model. Each run records its own sizes and selections in `protocol` and `sizes`.

    python benchmarks/fmnist_reproduction.py --run runs/train-gpu --out runs/repro --device cuda

`--limit-train/--limit-test` shrink the data for a smoke run on the CPU. Writes reproduction.json to --out.

This script keeps what `diffbank` commands cannot do: the training-progress loop over a run's snapshots
(`progress`), the timestep curve (`curve`) and the raw-pixels arm (`pixels`), which also writes a run
directory in the probes' format (results.json + logits.npz, with a store's sample ids) so that
`diffbank probe compare` pairs it with store probes. The README's figures from the cached stores (exact
linear probes, heads, paired tests) come from `diffbank` commands: benchmarks/reproduce_fmnist.py.

On a CPU the features come from the cache instead: `diffbank extract cache_specs/fmnist_full.yaml` (and
`fmnist_full_random.yaml`) writes the same grid (float32, the same noise rule and row numbering) into
stores:

    python benchmarks/fmnist_reproduction.py --out runs/full/linear --stages pixels,progress \
        --models random,final --grid-timesteps 5 \
        --store final=runs/full/fmnist_full.zarr --store random=runs/full/fmnist_full_random.zarr
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from extract.diffusion import NoiseSchedule, seeded_noise
from extract.features import feature_name
from extract.idx import FASHION_MNIST_DIR, load_fashion_mnist
from extract.models import fmnist
from extract.models.adm import ADMUNet
from extract.models.checkpoints import read_state_dict
from extract.models.training import load_run
from extract.pooling import pool
from extract.preprocess import reference
from extract.store import open_store
from probe.exact_logistic import L2_GRID, logistic_path
from probe.logits import LOGITS_FILE, RESULTS_FILE, SplitScores, write_logits
from probe.splits import carve_validation
from probe.stats import array_stats

NOISE_SEED = 0
WEIGHTS = Path(__file__).resolve().parents[1] / "extract" / "models" / "weights"
STAGES = ("pixels", "progress", "curve")
PIXELS_FEATURE = "pixels"  # the pixels run's feature name in its results.json


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_images(data: Path, limit_train: int | None, limit_test: int | None):
    xs, ys = [], []
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist(split, data)
        xs.append(images[:limit])
        ys.append(labels[:limit].astype(np.int64))
    n_train = len(xs[0])
    images = np.concatenate(xs)
    x0 = np.stack([reference(img, fmnist.FLAGS["image_size"]) for img in images])
    return torch.from_numpy(x0), np.concatenate(ys), n_train


def all_noise(n: int, t: int, workers: int) -> torch.Tensor:
    """The store's noise rule for rows 0..n-1 at t (one seeded stream per row), drawn in parallel chunks."""
    out = torch.empty((n, 3, 32, 32))
    chunks = [range(i, min(n, i + 2048)) for i in range(0, n, 2048)]

    def fill(rows: range) -> None:
        out[rows.start : rows.stop] = seeded_noise(NOISE_SEED, rows, t, 0, (3, 32, 32))

    with ThreadPoolExecutor(workers) as pool_:
        list(pool_.map(fill, chunks))
    return out


class Features:
    """Pooled features of one model: {(t, block, pool): (N, C, h, w) float32 on the device}."""

    def __init__(
        self,
        model: ADMUNet,
        x0: torch.Tensor,
        noise: dict[int, torch.Tensor],
        schedule: NoiseSchedule,
        timesteps,
        blocks,
        pools,
        device: torch.device,
        batch: int = 2048,
    ):
        self.maps: dict[tuple[int, int, str], torch.Tensor] = {}
        model = model.to(device).eval()
        for t in timesteps:
            parts: dict[tuple[int, str], list[torch.Tensor]] = {}
            for i in range(0, len(x0), batch):
                x = x0[i : i + batch].to(device)
                x_t = schedule.q_sample(x, t, noise[t][i : i + batch].to(device))
                with torch.inference_mode():
                    feats = model.features(x_t, torch.full((len(x),), t, device=device), blocks)
                for b in blocks:
                    for p in pools:
                        parts.setdefault((b, p), []).append(pool(feats[b].float(), p))
            for (b, p), chunks in parts.items():
                self.maps[(t, b, p)] = torch.cat(chunks)


class StoreFeatures(Mapping):
    """The same {(t, block, pool): (N, C, h, w) float32} maps, read one at a time from a diffbank store.

    A CPU cannot hold a model's whole grid as float32 next to the fits (12 GB for fmnist_full.yaml), so
    each map is read when a probe asks for it and dropped after.
    """

    def __init__(self, url: str, labels: np.ndarray, timesteps, blocks, pools, device: torch.device):
        self.store = open_store(url)
        if not np.array_equal(self.store.labels, labels):
            raise ValueError(f"{url}: its labels are not Fashion-MNIST's train+test in order (rows 0-69,999)")
        self.device = device
        self.keys = [(t, b, p) for t in timesteps for b in blocks for p in pools]
        stored = set(self.store.feature_names())
        missing = [feature_name(*k) for k in self.keys if feature_name(*k) not in stored]
        if missing:
            raise ValueError(f"{url} lacks {', '.join(missing)} (extract cache_specs/fmnist_full.yaml into it)")

    def __getitem__(self, key: tuple[int, int, str]) -> torch.Tensor:
        return torch.from_numpy(self.store.read(feature_name(*key))).to(self.device)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def standardised(x: torch.Tensor, train_rows: torch.Tensor) -> torch.Tensor:
    """x flattened, standardised per dimension with the train rows' statistics: the probes' own (`probe.stats`)."""
    flat = x.flatten(1).float().cpu().numpy()
    stats = array_stats("x", flat[train_rows.cpu().numpy()], "dim")
    return torch.from_numpy(stats.apply(flat.copy())).to(x.device)


def probe_grid(feats: dict, y: torch.Tensor, rows: dict[str, torch.Tensor], keys) -> dict:
    """Exact logistic over every feature in `keys` x L2: selection on val, test scored for the selected only.

    Ties on validation go to the earliest (feature, L2) in `keys` order and L2_GRID's order.
    """
    table = []
    best = None
    for key in keys:
        x = standardised(feats[key], rows["train"])
        path = logistic_path(x[rows["fit"]], y[rows["fit"]], x[rows["val"]], y[rows["val"]], 10, L2_GRID)
        for fit, val_acc in path:
            table.append(
                {
                    "t": key[0],
                    "block": key[1],
                    "pool": key[2],
                    "l2": fit.l2,
                    "val": round(100 * val_acc, 2),
                    "iterations": fit.iterations,  # 300 = L-BFGS stopped at max_iter, not at its tolerance
                    "loss": round(fit.loss, 6),
                }
            )
            if best is None or val_acc > best[0]:
                best = (val_acc, key, fit, x)
        log(f"  {key}: best val {max(a for _, a in path) * 100:.2f}")
    val_acc, key, fit, x = best
    with torch.no_grad():
        logits = {s: fit.logits(x[rows[s]]).cpu().numpy() for s in ("val", "test")}
    correct = logits["test"].argmax(1) == y[rows["test"]].cpu().numpy()
    return {
        "selected": {
            "t": key[0],
            "block": key[1],
            "pool": key[2],
            "l2": fit.l2,
            "val": round(100 * val_acc, 2),
            "test": round(100 * correct.mean(), 2),
        },
        "grid": table,
        "_correct": correct,
        "_logits": logits,
        "_fit": fit,
    }


def run_protocol(sizes: dict[str, int], n_train: int, choices: str) -> str:
    """The protocol of this run, from its own sizes: what was fitted, selected on what, and scored once."""
    return (
        f"{sizes['fit']:,} fit / {sizes['val']:,} val (seeded stratified 10% of the first {n_train:,} training images, "
        f"probe.splits.carve_validation seed 0) / {sizes['test']:,} test images; {choices} selected on val; "
        "test scored once per selected model"
    )


def write_pixels_run(
    out: Path, res: dict, rows: dict[str, np.ndarray], labels: np.ndarray, store_url: str | None, protocol: str
) -> None:
    """The pixels arm as a probe run directory (results.json + logits.npz as `probe.logits` writes them).

    Sample ids come from `store_url` (a store of the same images in the same rows, e.g. fmnist_full.zarr), so
    `diffbank probe compare` pairs this run with that store's probes image by image.
    """
    ids = None
    if store_url is not None:
        store = open_store(store_url)
        if len(store.labels) != len(labels) or not np.array_equal(store.labels, labels):
            raise ValueError(f"{store_url}: its rows are not these {len(labels)} images (other labels or count)")
        ids = np.asarray(store.sample_ids)
    out.mkdir(parents=True, exist_ok=True)
    scores = {
        s: SplitScores(res["_logits"][s], rows[s], labels[rows[s]], None if ids is None else ids[rows[s]])
        for s in ("val", "test")
    }
    record = write_logits(out / LOGITS_FILE, scores, None)
    fit = res["_fit"]
    selected = res["selected"]
    results = {
        "command": "benchmarks/fmnist_reproduction.py --stages pixels",
        "features": [PIXELS_FEATURE],
        "method": "logistic",
        "solver": "torch-lbfgs (probe.exact_logistic)",
        "protocol": protocol,
        "split_definition": {"splits": {s: {"n": int(len(rows[s]))} for s in ("train", "val", "test")}},
        "sweep": [
            {"l2": r["l2"], "iterations": r["iterations"], "loss": r["loss"], "val_top1": r["val"] / 100}
            for r in res["grid"]
        ],
        "selected": {"l2": fit.l2, "val_top1": selected["val"] / 100},
        "refit_on": "train",
        "metrics": {s: {"n": int(len(rows[s])), "top1": float(sc.correct.mean())} for s, sc in scores.items()},
        "ids_from": store_url,
        "logits": record,
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))


def trained_models(run: Path) -> list[tuple[str, object, int]]:
    """(name, weights, images seen) of a training run's snapshots and its final EMA weights."""
    final_weights, record = load_run(run)
    models = [(s["file"], run / "snapshots" / s["file"], s["mark_images"]) for s in record.get("snapshots", [])]
    return models + [("final", final_weights, record["step"] * record["config"]["batch_size"])]


def shipped_models() -> list[tuple[str, object, int]]:
    """The embedded model's history snapshots (float16) and its final weights, as its card lists them."""
    card = json.loads((WEIGHTS / "fmnist32.json").read_text())
    models = [(Path(h["file"]).name, WEIGHTS / h["file"], int(h["epochs"] * 60000)) for h in card.get("history", [])]
    return models + [("final", WEIGHTS / "fmnist32.safetensors", int(card["images_seen"]))]


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _stores(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, url = v.partition("=")
        if not sep or not name or not url:
            raise SystemExit(f"--store {v!r}: expected MODEL=PATH, e.g. final=runs/full/fmnist_full.zarr")
        out[name] = url
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run",
        type=Path,
        default=None,
        help="training run directory (its state and snapshots/); default: the shipped weights and their history",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="take MODEL's grid (random, final, a snapshot) from a diffbank store instead of extracting it",
    )
    ap.add_argument(
        "--pixels-run",
        type=Path,
        default=None,
        help="where the pixels stage writes its probe run directory (default: OUT/pixels)",
    )
    ap.add_argument(
        "--ids-store",
        default=None,
        help="store whose sample ids the pixels run records (same images, same rows; default: --store final=)",
    )
    ap.add_argument("--grid-timesteps", default="5,10,25")
    ap.add_argument("--curve-timesteps", default="0,2,5,10,25,50,100,150,250,400")
    ap.add_argument("--blocks", default="10,12,13")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--pools", default="avg4,tok8")
    ap.add_argument("--skip-pixels", action="store_true", help="no raw-pixel baseline")
    ap.add_argument("--models", default=None, help="comma-separated subset: random, final, snapshot file names")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    if stages - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(stages - set(STAGES))}; choose from {', '.join(STAGES)}")
    if args.skip_pixels:
        stages.discard("pixels")
    stores = _stores(args.store)
    # Settled before any image is loaded: what a stage needs from the others.
    if "curve" in stages and ("progress" not in stages or "final" in stores):
        raise SystemExit("--stages curve needs the progress stage's final selection, extracted in memory")
    if "curve" in stages and args.models and "final" not in args.models.split(","):
        raise SystemExit("--stages curve reads the final model: --models must include final")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    grid_t = [int(v) for v in args.grid_timesteps.split(",")]
    curve_t = [int(v) for v in args.curve_timesteps.split(",")]
    blocks = [int(v) for v in args.blocks.split(",")]
    pools = args.pools.split(",")
    result: dict = {
        "code_commit": _commit(),
        "l2_grid": L2_GRID,
        "grid": {"timesteps": grid_t, "blocks": blocks, "pools": pools},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "stages": sorted(stages, key=STAGES.index),
    }

    def save() -> None:
        clean = json.loads(json.dumps(result, default=lambda o: None))
        (args.out / "reproduction.json").write_text(json.dumps(clean, indent=1))

    x0, labels, n_train = load_images(args.data, args.limit_train, args.limit_test)
    n = len(labels)
    fit_rows, val_rows = carve_validation(np.arange(n_train), labels[:n_train], 0.1, seed=0)
    rows = {
        "train": np.sort(fit_rows),
        "fit": np.sort(fit_rows),
        "val": np.sort(val_rows),
        "test": np.arange(n_train, n),
    }
    sizes = {k: int(len(rows[k])) for k in ("fit", "val", "test")}
    result["sizes"] = sizes
    result["protocol"] = run_protocol(sizes, n_train, "per model: t, block, pooling and L2 (pixels: L2)")
    rows_t = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
    y = torch.from_numpy(labels).to(device)
    models = [("random", None, 0)] + (trained_models(args.run) if args.run else shipped_models())
    if args.models:
        models = [m for m in models if m[0] in args.models.split(",")]
    extracts = ("progress" in stages and any(m[0] not in stores for m in models)) or "curve" in stages
    need_t = sorted(set(grid_t + (curve_t if "curve" in stages else []))) if extracts else []
    log(f"{n_train} train ({len(val_rows)} val) + {n - n_train} test images; noise for {need_t}")
    noise = {t: all_noise(n, t, args.workers) for t in need_t}
    schedule = NoiseSchedule.from_flags("linear", 1000)

    def features_of(name: str, path) -> tuple[Mapping, ADMUNet | None, float]:
        if name in stores:
            feats = StoreFeatures(stores[name], labels, grid_t, blocks, pools, device)
            result.setdefault("store_fingerprints", {})[name] = feats.store.fingerprint
            return feats, None, 0.0
        torch.manual_seed(0)
        model = ADMUNet.from_flags(**fmnist.FLAGS)
        if path is not None:
            model.load_state_dict(path if isinstance(path, dict) else read_state_dict(path))
        t0 = time.perf_counter()
        feats = Features(model, x0, noise, schedule, grid_t, blocks, pools, device)
        return feats.maps, model, time.perf_counter() - t0

    # Pixels: the same exact solver on the raw pixels (32x32 after the reference resize), also written as a
    # probe run directory for `diffbank probe compare`.
    if "pixels" in stages:
        pixels = {(0, 0, "pixels"): x0[:, :1].to(device)}
        res = probe_grid(pixels, y, rows_t, list(pixels))
        result["pixels"] = res["selected"]
        run_dir = args.pixels_run or args.out / "pixels"
        ids_store = args.ids_store or stores.get("final")
        write_pixels_run(run_dir, res, rows, labels, ids_store, run_protocol(sizes, n_train, "L2"))
        log(f"pixels: test {res['selected']['test']} (run directory {run_dir}, ids from {ids_store})")
        save()

    # Training progress: random init, each snapshot, the final EMA weights; the same grid and selection.
    final_maps = final_model = final = None
    if "progress" in stages:
        result["progress"] = []
        for name, path, seen in models:
            maps, model, t_extract = features_of(name, path)
            res = probe_grid(maps, y, rows_t, sorted(maps))
            result["progress"].append(
                {
                    "model": name,
                    "images_seen": seen,
                    "epochs": round(seen / 60000, 3),
                    "source": stores.get(name, "extracted in memory"),
                    "extract_seconds": round(t_extract, 1),
                    "selected": res["selected"],
                    "grid": res["grid"],
                }
            )
            log(f"{name} ({seen / 60000:.2f} epochs): {res['selected']}")
            if name == "final":
                final_maps, final_model, final = maps, model, res["selected"]
            save()
        by_model = {p["model"]: p["selected"] for p in result["progress"]}
        if "final" in by_model and "random" in by_model:
            result["summary"] = {
                "final": by_model["final"],
                "random": by_model["random"],
                "pixels": result.get("pixels"),
                "gain_over_random_points": round(by_model["final"]["test"] - by_model["random"]["test"], 2),
            }
        save()

    # Timestep curve at the final model's selected block, both poolings, every t.
    if "curve" in stages:
        assert final_model is not None and final_maps is not None and final is not None  # checked before loading
        curve_feats = Features(
            final_model, x0, noise, schedule, [t for t in curve_t if t not in grid_t], [final["block"]], pools, device
        )
        curve_feats.maps.update({k: v for k, v in final_maps.items() if k[1] == final["block"]})
        result["t_curve_protocol"] = run_protocol(sizes, n_train, f"per t at block {final['block']}: pooling and L2")
        result["t_curve"] = []
        for t in curve_t:
            res = probe_grid(curve_feats.maps, y, rows_t, [(t, final["block"], p) for p in pools])
            result["t_curve"].append({"t": t, **res["selected"]})
            log(f"t={t}: {res['selected']}")
        save()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    save()
    log(json.dumps(result.get("summary") or result.get("pixels"), default=str))


if __name__ == "__main__":
    main()
