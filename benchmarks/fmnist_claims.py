"""The paper's claims measured on real data: the embedded model on the full Fashion-MNIST.

60,000 training images (a stratified 10% of them held out for validation) and the full 10,000-image test
set. Every choice (timestep, block, pooling, learning rate, C) is made on validation; test is only reported.

1. A feature bank over timesteps x blocks from the embedded model (the demo's spec, all images).
2. The linear sweep over every (t, block, pooling) x lr: the best feature, and accuracy over t per block.
3. Baselines: logistic regression and the same linear head on raw pixels; the same U-Net with random
   weights (same spec, `checkpoint: null`) at the selected timestep.
4. The attention head (tokens <= 8x8 of the selected block) against linear; DifFormer fusion over
   blocks x timesteps against attention.

    python benchmarks/fmnist_claims.py --out runs/claims [--timesteps 10,50,150,400] [--epochs 15]

Rerunning resumes every stage (stores and probes). Writes claims.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffbank.demo import DEFAULT_BLOCKS, HEAD_LRS, HEAD_MOMENTUM, demo_spec, ensure_fashion_mnist, short_schedule
from extract.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from extract.pipeline import extract
from extract.spec import load_spec
from extract.store import open_store, save_features
from probe import api


def pixel_store(url: Path, data_dir: Path) -> str:
    """Raw 28x28 pixels (scaled to [0, 1]) as a store, so the baselines run through the same probe code."""
    if (url / "zarr.json").exists():
        return str(url)
    train_x, train_y = load_fashion_mnist("train", data_dir)
    test_x, test_y = load_fashion_mnist("test", data_dir)
    x = np.concatenate([train_x, test_x]).astype(np.float32)[:, None] / 255.0
    y = np.concatenate([train_y, test_y])
    rows = np.arange(len(y))
    save_features(
        url, {"pixels": x}, y, {"train": rows[:60_000], "test": rows[60_000:]}, class_names=list(FASHION_MNIST_CLASSES)
    )
    return str(url)


def timed(label: str, fn, *args, **kwargs):
    print(f"--- {label}", flush=True)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/claims"))
    ap.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    ap.add_argument("--timesteps", default="10,50,150,400")
    ap.add_argument("--blocks", default=",".join(map(str, DEFAULT_BLOCKS)))
    ap.add_argument("--epochs", type=int, default=15, help="linear sweep / linear heads")
    ap.add_argument("--head-epochs", type=int, default=6, help="attention / fusion heads")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--train", type=int, default=None, help="limit (default: all 60,000)")
    ap.add_argument("--test", type=int, default=None, help="limit (default: all 10,000)")
    ap.add_argument("--stages", default="extract,sweep,pixels,random,attention,fusion")
    args = ap.parse_args()
    stages = set(args.stages.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_fashion_mnist(args.data)
    timesteps = [int(v) for v in args.timesteps.split(",")]
    blocks = [int(v) for v in args.blocks.split(",")]
    claims_path = out / "claims.json"
    claims: dict = json.loads(claims_path.read_text()) if claims_path.exists() else {}

    def save() -> None:
        claims_path.write_text(json.dumps(claims, indent=1, default=str))

    spec_dict = demo_spec(data_dir, args.train, args.test, timesteps, blocks, name="fmnist_full")
    spec_dict["features"]["tokens"] = {"default": 8}
    store_url = str(out / "features.zarr")
    if "extract" in stages:
        summary, secs = timed("extract (embedded model)", extract, load_spec(spec_dict), store_url)
        claims["extract"] = {
            "seconds": secs,
            **{
                k: summary.get(k)
                for k in ("images", "images_per_s", "forwards", "model_seconds", "write_seconds", "failures")
            },
        }
        save()

    # The sweep covers the average pools (2x2, 4x4); 8x8 token maps (4096-d each) feed the attention head.
    avg = [n for n in open_store(store_url).feature_names() if "_avg" in n]
    if "sweep" in stages:
        sweep, secs = timed(
            "linear sweep",
            api.run_sweep,
            store_url,
            out / "sweep",
            features=avg,
            epochs=args.epochs,
            step_size=short_schedule(args.epochs),
        )
        claims["sweep"] = {
            "seconds": secs,
            "selected": sweep["selected"],
            "test": sweep["metrics"]["test"]["top1"],
            "grid": sweep["grid"],
        }
        save()
    selected = claims["sweep"]["selected"]
    best_t, best_block = int(selected["feature"][1:4]), int(selected["feature"][6:8])
    curve = {row["t"]: row["test_top1"] for row in claims["sweep"]["grid"] if row["block"] == best_block}
    claims["accuracy_over_t_at_best_block"] = {"block": best_block, "test_top1_by_t": curve}
    save()

    if "pixels" in stages:
        pix = pixel_store(out / "pixels.zarr", data_dir)
        logi, secs = timed(
            "logistic regression on raw pixels",
            api.run_logistic,
            pix,
            out / "pixels_logistic",
            cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0],
            max_iter=300,
        )
        claims["pixels_logistic"] = {
            "seconds": secs,
            "test": logi["metrics"]["test"]["top1"],
            "val": logi["metrics"].get("val", {}).get("top1"),
        }
        lin, secs = timed(
            "linear head on raw pixels",
            api.run_linear,
            pix,
            out / "pixels_linear",
            features=["pixels"],
            lr=selected["lr"],
            epochs=args.epochs,
            step_size=short_schedule(args.epochs),
        )
        claims["pixels_linear"] = {"seconds": secs, "test": lin["metrics"]["test"]["top1"]}
        save()

    if "random" in stages:
        rnd = dict(spec_dict, name="fmnist_random")
        rnd["model"] = {"preset": "embedded:fmnist32", "checkpoint": None, "init_seed": 0}
        rnd["features"] = {"timesteps": [best_t], "blocks": blocks, "pooling": {"default": [2, 4]}}
        rnd_url = str(out / "random.zarr")
        summary, secs = timed("extract (random weights)", extract, load_spec(rnd), rnd_url)
        rsweep, secs2 = timed(
            "linear sweep (random weights)",
            api.run_sweep,
            rnd_url,
            out / "random_sweep",
            epochs=args.epochs,
            step_size=short_schedule(args.epochs),
        )
        claims["random_weights"] = {
            "seconds": secs + secs2,
            "selected": rsweep["selected"],
            "test": rsweep["metrics"]["test"]["top1"],
        }
        save()

    head_opts = {
        "preset": args.preset,
        "epochs": args.head_epochs,
        "lrs": HEAD_LRS,
        "momentum": HEAD_MOMENTUM,
        "step_size": short_schedule(args.head_epochs),
    }
    if "attention" in stages:
        tok = f"t{best_t:03d}_b{best_block:02d}_tok8"
        att, secs = timed(
            f"attention head on {tok}", api.run_attention, store_url, out / "attention", features=[tok], **head_opts
        )
        claims["attention"] = {
            "seconds": secs,
            "feature": tok,
            "test": att["metrics"]["test"]["top1"],
            "val": att["metrics"]["val"]["top1"],
        }
        save()

    if "fusion" in stages:
        fts = [t for t in timesteps if t != max(timesteps)] if len(timesteps) > 3 else timesteps
        feats = [f"t{t:03d}_b{b:02d}_avg4" for t in fts for b in blocks]
        fus, secs = timed(
            f"DifFormer fusion over blocks {blocks} x t {fts}",
            api.run_fusion,
            store_url,
            out / "fusion",
            features=feats,
            **head_opts,
        )
        claims["fusion"] = {
            "seconds": secs,
            "features": feats,
            "test": fus["metrics"]["test"]["top1"],
            "val": fus["metrics"]["val"]["top1"],
        }
        save()

    if "tok8" in stages:  # larger pooled maps (8x8 tokens, 4096-d) for the linear head, at the selected t
        toks = [f"t{best_t:03d}_b{b:02d}_tok8" for b in blocks]
        tsweep, secs = timed(
            "linear sweep on 8x8 maps",
            api.run_sweep,
            store_url,
            out / "sweep_tok8",
            features=toks,
            epochs=args.epochs,
            step_size=short_schedule(args.epochs),
        )
        claims["sweep_tok8"] = {
            "seconds": secs,
            "selected": tsweep["selected"],
            "test": tsweep["metrics"]["test"]["top1"],
            "grid": tsweep["grid"],
        }
        save()

    print(
        json.dumps(
            {k: v for k, v in claims.items() if k != "sweep"}
            | {"sweep_selected": claims["sweep"]["selected"], "sweep_test": claims["sweep"]["test"]},
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
