"""The miniature reproduction on the full Fashion-MNIST: what diffusion training adds, measured.

For every model (the guided-diffusion-initialised random network, each EMA snapshot of a training run,
and its final EMA weights) the same feature grid is extracted for all 70,000 images, in memory, with the
project's own pieces: the reference preprocessing, the seeded per-sample noise rule of the store
(`extract.diffusion.seeded_noise`, keyed by (seed, row, t, draw), rows 0-59,999 train and 60,000-69,999 test,
as `diffbank extract` numbers them), `ADMUNet.features` and `extract.pooling`. Linear probes are exact
multinomial logistic regressions (`probe.exact_logistic`, L-BFGS) over an L2 grid on standardised features.

Protocol: a seeded, stratified 6,000 of the 60,000 training images are the validation split; every choice
(t, block, pooling, L2; head epochs are the paper's 28) is made there; the 10,000 test images are scored once
per selected model. Paired comparisons use the exact McNemar test on the same test images.

    python benchmarks/fmnist_reproduction.py --run runs/train-gpu --out runs/repro --device cuda

`--limit-train/--limit-test` shrink the data for a smoke run on the CPU. Writes reproduction.json to --out.

On a CPU the features come from the cache instead: `diffbank extract cache_specs/fmnist_full.yaml` (and
`fmnist_full_random.yaml`) writes the same grid (float32, the same noise rule and row numbering) into
stores, and each stage runs as its own process, so two cores work at once:

    python benchmarks/fmnist_reproduction.py --out runs/full/linear --stages pixels,progress \
        --models random,final --grid-timesteps 5 \
        --store final=runs/full/fmnist_full.zarr --store random=runs/full/fmnist_full_random.zarr
    python benchmarks/fmnist_reproduction.py --out runs/full/attention --stages heads --head-kinds attention \
        --attention-input 5,10,tok8 --store final=runs/full/fmnist_full.zarr --head-dim 128 --head-depth 2
    python benchmarks/fmnist_reproduction.py --out runs/full --stages tests \
        --merge runs/full/linear --merge runs/full/attention
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
from probe.evaluation import predict_logits
from probe.exact_logistic import L2_GRID, logistic_path
from probe.heads import AttentionPoolHead, DifFormerHead, seeded_init
from probe.significance import mcnemar
from probe.splits import carve_validation
from probe.stats import array_stats
from probe.stream import ArrayStream
from probe.trainer import train

NOISE_SEED = 0
WEIGHTS = Path(__file__).resolve().parents[1] / "extract" / "models" / "weights"
HEAD_SIZES = {"dim": 256, "heads": 4, "depth": 2}  # ~4x the 64-wide tiny preset; paper: 1024/8/2 on ImageNet
STAGES = ("pixels", "progress", "curve", "heads", "tests")


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
    """Exact logistic over every feature in `keys` x L2: selection on val, test scored for the selected only."""
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
        correct = (fit.logits(x[rows["test"]]).argmax(1) == y[rows["test"]]).cpu().numpy()
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
    }


def head_run(
    kind: str,
    feats: Mapping,
    keys,
    y: np.ndarray,
    rows: dict,
    seed: int,
    epochs: int,
    device,
    sizes: dict = HEAD_SIZES,
    checkpoint_dir: Path | None = None,
    momentum: float = 0.0,
) -> dict:
    """Attention (one map) or DifFormer (blocks x timesteps) head, the paper's SGD recipe, best epoch on val.

    With `checkpoint_dir` the head checkpoints every epoch and a rerun resumes it (CPU runs take hours).
    """
    arrays = {f"t{t}_b{b}_{p}": feats[(t, b, p)].cpu().numpy() for t, b, p in keys}
    names = list(arrays)
    split = {s: {n: a[rows[s].cpu().numpy()] for n, a in arrays.items()} for s in ("fit", "val", "test")}
    ys = {s: y[rows[s].cpu().numpy()] for s in ("fit", "val", "test")}
    stats = {n: array_stats(n, split["fit"][n], "channel") for n in names}  # per channel, the probes' own rule
    norm = {s: {n: stats[n].apply(split[s][n].astype(np.float32)) for n in names} for s in split}
    with seeded_init(seed):
        if kind == "attention":
            head = AttentionPoolHead(arrays[names[0]].shape[1:], 10, **sizes)
            spec = names[0]
        else:
            shapes = {b: arrays[f"t{keys[0][0]}_b{b}_{keys[0][2]}"].shape[1:] for b in sorted({k[1] for k in keys})}
            ts = sorted({k[0] for k in keys})
            head = DifFormerHead(shapes, ts, 10, **sizes)
            spec = {(t, b): f"t{t}_b{b}_{p}" for t, b, p in keys}
    stream = lambda s, shuffle: ArrayStream(norm[s], ys[s], batch_size=128, shuffle=shuffle, seed=seed)  # noqa: E731
    t0 = time.perf_counter()
    # The paper's optimiser for these heads: SGD lr 5e-2, no momentum or weight decay, StepLR(7, 0.1), batch 128
    # (`momentum` > 0 is the one change offered: the demo's heads train with 0.9).
    res = train(
        head,
        stream("fit", True),
        stream("val", False),
        None,
        input=spec,
        lr=5e-2,
        epochs=epochs,
        step_size=7,
        gamma=0.1,
        momentum=momentum,
        progress=False,
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=checkpoint_dir is not None,
        on_epoch_end=lambda e, rows_: log(f"  {kind} seed {seed} epoch {e + 1}/{epochs}: {rows_['head']}"),
    )
    logits = predict_logits(head, stream("test", False), spec, device=device)
    correct = logits.argmax(1).numpy() == ys["test"]
    return {
        "kind": kind,
        "seed": seed,
        "momentum": momentum,
        "epochs": epochs,
        "best_epoch": res.best_epoch,
        "val": round(100 * res.val_accuracy, 2),
        "test": round(100 * correct.mean(), 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "inputs": [list(k) for k in keys],
        "sizes": sizes,
        "parameters": sum(p.numel() for p in head.parameters()),
        "optimizer": f"SGD lr 5e-2, momentum {momentum:g}, no wd, StepLR(7, 0.1), batch 128; per-channel "
        "standardised inputs; epoch selected on val",
        "_correct": correct,
    }


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


def _key(text: str) -> tuple[int, int, str]:
    t, b, p = text.split(",")
    return int(t), int(b), p


def head_key(kind: str, seed: int, momentum: float) -> str:
    """A head run's name in the results, e.g. 'attention0' (the paper's recipe) or 'fusion1_m0.9'."""
    return f"{kind}{seed}" + (f"_m{momentum:g}" if momentum else "")


def merge_runs(dirs: list[Path], result: dict, correct: dict[str, np.ndarray]) -> None:
    """Earlier stages' results (reproduction.json) and per-image test outcomes (test_correct.npz), merged."""
    for d in dirs:
        part = json.loads((d / "reproduction.json").read_text())
        if "pixels" in part:
            result["pixels"] = part["pixels"]
        result.setdefault("store_fingerprints", {}).update(part.get("store_fingerprints", {}))
        for k in ("progress", "t_curve", "heads"):
            result.setdefault(k, []).extend(part.get(k, []))
        with np.load(d / "test_correct.npz") as z:
            correct.update({k: z[k] for k in z.files})


def paired_tests(result: dict, correct: dict[str, np.ndarray]) -> dict:
    """Exact McNemar tests of each headline comparison whose two arms were scored in these runs."""
    pairs = [("final_vs_pixels", "final", "pixels"), ("final_vs_random", "final", "random")]
    for head in result.get("heads", []):
        run = head_key(head["kind"], head["seed"], head.get("momentum", 0.0))
        pairs.append((f"{run}_vs_linear", run, "final"))
        if head["kind"] == "fusion":  # against the attention head of the same seed and recipe
            twin = head_key("attention", head["seed"], head.get("momentum", 0.0))
            pairs.append((f"{run}_vs_{twin}", run, twin))
    return {name: mcnemar(correct[a], correct[b]) for name, a, b in pairs if a in correct and b in correct}


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
    ap.add_argument("--stages", default=",".join(STAGES[:-1]), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="take MODEL's grid (random, final, a snapshot) from a diffbank store instead of extracting it",
    )
    ap.add_argument("--merge", action="append", type=Path, default=[], help="an earlier stage's --out (tests)")
    ap.add_argument("--grid-timesteps", default="5,10,25")
    ap.add_argument("--curve-timesteps", default="0,2,5,10,25,50,100,150,250,400")
    ap.add_argument("--blocks", default="10,12,13")
    ap.add_argument("--head-epochs", type=int, default=28)
    ap.add_argument("--head-seconds", type=float, default=150, help="time box for the heads (seeds run in turn)")
    ap.add_argument("--head-kinds", default="attention,fusion")
    ap.add_argument("--head-seeds", default="0,1,2")
    ap.add_argument("--head-dim", type=int, default=HEAD_SIZES["dim"])
    ap.add_argument("--head-heads", type=int, default=HEAD_SIZES["heads"])
    ap.add_argument("--head-depth", type=int, default=HEAD_SIZES["depth"])
    ap.add_argument("--head-momentum", type=float, default=0.0, help="SGD momentum of the heads (paper: 0)")
    ap.add_argument(
        "--attention-input",
        type=_key,
        default=None,
        metavar="T,BLOCK,POOL",
        help="the attention head's map when this run has no linear selection (default: the selected t and block, tok8)",
    )
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--pools", default="avg4,tok8")
    ap.add_argument("--skip-pixels", action="store_true", help="no raw-pixel baseline (and no McNemar against it)")
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
    if {"curve", "heads"} & stages and args.models and "final" not in args.models.split(","):
        raise SystemExit("--stages curve and heads read the final model: --models must include final")
    if "heads" in stages and args.attention_input is None and "progress" not in stages:
        raise SystemExit("--stages heads without the progress stage needs --attention-input T,BLOCK,POOL")
    if "heads" in stages and "fusion" in args.head_kinds.split(",") and "avg4" not in args.pools.split(","):
        raise SystemExit("the fusion head reads the avg4 maps, and --pools leaves them out")
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
    sizes = {"dim": args.head_dim, "heads": args.head_heads, "depth": args.head_depth}
    result: dict = {
        "code_commit": _commit(),
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "l2_grid": L2_GRID,
        "grid": {"timesteps": grid_t, "blocks": blocks, "pools": pools},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "stages": sorted(stages, key=STAGES.index),
    }
    correct: dict[str, np.ndarray] = {}

    def save() -> None:
        clean = json.loads(json.dumps(result, default=lambda o: None))
        (args.out / "reproduction.json").write_text(json.dumps(clean, indent=1))
        np.savez_compressed(args.out / "test_correct.npz", **correct)

    if stages == {"tests"}:  # nothing to compute but the paired tests of earlier stages
        merge_runs(args.merge, result, correct)
        result["tests"] = paired_tests(result, correct)
        save()
        log(json.dumps(result["tests"], indent=1))
        return

    x0, labels, n_train = load_images(args.data, args.limit_train, args.limit_test)
    n = len(labels)
    fit_rows, val_rows = carve_validation(np.arange(n_train), labels[:n_train], 0.1, seed=0)
    rows = {
        "train": np.sort(fit_rows),
        "fit": np.sort(fit_rows),
        "val": np.sort(val_rows),
        "test": np.arange(n_train, n),
    }
    rows_t = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
    y = torch.from_numpy(labels).to(device)
    models = [("random", None, 0)] + (trained_models(args.run) if args.run else shipped_models())
    if args.models:
        models = [m for m in models if m[0] in args.models.split(",")]
    extracts = (
        ("progress" in stages and any(m[0] not in stores for m in models))
        or "curve" in stages
        or ("heads" in stages and "final" not in stores)
    )
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

    # Pixels: the same exact solver on the raw pixels (32x32 after the reference resize).
    if "pixels" in stages:
        pixels = {(0, 0, "pixels"): x0[:, :1].to(device)}
        res = probe_grid(pixels, y, rows_t, list(pixels))
        correct["pixels"] = res.pop("_correct")
        result["pixels"] = res["selected"]
        log(f"pixels: test {res['selected']['test']}")
        save()

    # Training progress: random init, each snapshot, the final EMA weights; the same grid and selection.
    final_maps = final_model = final = None
    if "progress" in stages:
        result["progress"] = []
        for name, path, seen in models:
            maps, model, t_extract = features_of(name, path)
            res = probe_grid(maps, y, rows_t, sorted(maps))
            correct[name] = res.pop("_correct")
            result["progress"].append(
                {
                    "model": name,
                    "images_seen": seen,
                    "epochs": round(seen / 60000, 3),
                    "source": stores.get(name, "extracted in memory"),
                    "extract_seconds": round(t_extract, 1),
                    **res,
                }
            )
            log(f"{name} ({seen / 60000:.2f} epochs): {res['selected']}")
            if name == "final":
                final_maps, final_model, final = maps, model, res["selected"]
            save()
        result["tests"] = paired_tests(result, correct)
        by_model = {p["model"]: p["selected"] for p in result["progress"]}
        if "final" in by_model and "random" in by_model:
            result["summary"] = {
                "final": by_model["final"],
                "random": by_model["random"],
                "pixels": result.get("pixels"),
                "gain_over_random_points": round(by_model["final"]["test"] - by_model["random"]["test"], 2),
            }
        save()
    if final_maps is None and ({"curve", "heads"} & stages):
        final_path = next(m[1] for m in models if m[0] == "final")
        final_maps, final_model, _ = features_of("final", final_path)

    # Timestep curve at the final model's selected block, both poolings, every t.
    if "curve" in stages:
        curve_feats = Features(
            final_model, x0, noise, schedule, [t for t in curve_t if t not in grid_t], [final["block"]], pools, device
        )
        curve_feats.maps.update({k: v for k, v in final_maps.items() if k[1] == final["block"]})
        result["t_curve"] = []
        for t in curve_t:
            res = probe_grid(curve_feats.maps, y, rows_t, [(t, final["block"], p) for p in pools])
            res.pop("_correct")
            result["t_curve"].append({"t": t, **res["selected"]})
            log(f"t={t}: {res['selected']}")
        save()

    # Heads with capacity, the paper's 28 epochs: attention on the selected 8x8 map; DifFormer on
    # the three blocks x the grid's timesteps (4x4 maps), seeds in turn while the time box lasts.
    if "heads" in stages:
        result["heads"] = []
        att_keys = [args.attention_input or (final["t"], final["block"], "tok8")]
        fus_keys = [(t, b, "avg4") for t in grid_t for b in blocks]
        kinds = args.head_kinds.split(",")
        head_start = time.perf_counter()
        for seed in [int(v) for v in args.head_seeds.split(",")]:
            for kind, keys in (("attention", att_keys), ("fusion", fus_keys)):
                if kind not in kinds or time.perf_counter() - head_start > args.head_seconds:
                    continue
                ckpt = args.out / "checkpoints" / head_key(kind, seed, args.head_momentum)
                res = head_run(
                    kind,
                    final_maps,
                    keys,
                    labels,
                    rows_t,
                    seed,
                    args.head_epochs,
                    device,
                    sizes,
                    ckpt,
                    args.head_momentum,
                )
                correct[head_key(kind, seed, args.head_momentum)] = res.pop("_correct")
                result["heads"].append(res)
                log(f"{kind} seed {seed}: val {res['val']} test {res['test']} ({res['seconds']} s)")
                result["tests"] = paired_tests(result, correct)
                save()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    save()
    log(json.dumps(result.get("summary") or result.get("tests"), default=str))


if __name__ == "__main__":
    main()
