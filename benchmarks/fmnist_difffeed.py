"""DifFeed against the attention head at the same block and t, on the embedded Fashion-MNIST model.

Both arms run the same trainer (probe.feedback.train_feedback) with the U-Net in the loop, the same seeded noise
(fresh per epoch, fixed for evaluation), the same recipe and the same initial head; the baseline simply has no
feedback layers. The epoch is selected on a seeded, stratified validation split carved from the training subset;
the test images are scored once, and the two arms are compared on the same images with an exact McNemar test.

CPU time is the constraint, so data size, epochs, t and head size are options. The defaults are the shipped
run (docs/results/fmnist_difffeed.json): 1,350 train + 150 val images, 2 epochs, the first 1,000 test images,
919 s of CPU for both arms (2 threads on 2 shared cores; DifFeed 680 s, the attention head 239 s):

    python benchmarks/fmnist_difffeed.py --out runs/fmnist_difffeed
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from extract.diffusion import NoiseSchedule
from extract.idx import FASHION_MNIST_DIR, load_fashion_mnist
from extract.models.config import embedded_card
from extract.models.registry import build_model
from extract.preprocess import reference
from probe.feedback.images import ImageSet, validation_split
from probe.feedback.network import DifFeed
from probe.feedback.training import train_feedback
from probe.heads import PRESETS, seeded_init
from probe.recipe import FeedbackRecipe
from probe.significance import mcnemar
from probe.splits import stratified_holdout

MODEL = "embedded:fmnist32"
TRAIN_ROWS = 60_000  # test images are keyed after the training split, as a [train, test] source numbers them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=1500, help="stratified subset of the 60,000 training images")
    p.add_argument("--test", type=int, default=1000, help="first N test images (10000 = the full test set)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation share of --train")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--t", type=int, default=FeedbackRecipe().t, help="noise step of both arms (the paper's DifFeed t)")
    p.add_argument("--read-block", type=int, default=None, help="default: the block-24 analogue (15 on this model)")
    p.add_argument("--tokens", type=int, default=8, help="read block average-pooled to at most TOKENS x TOKENS")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="attention head size")
    p.add_argument("--batch-size", type=int, default=FeedbackRecipe().batch_size, help="the paper's DifFeed batch")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-2)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--step-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(FASHION_MNIST_DIR))
    p.add_argument("--out", default="runs/fmnist_difffeed")
    p.add_argument("--restart", action="store_true", help="discard the arms' checkpoints instead of resuming")
    return p.parse_args(argv)


def images(raw: np.ndarray, size: int) -> np.ndarray:
    return np.stack([reference(img, size) for img in raw])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unet, provenance = build_model(MODEL, checkpoint=MODEL)
    card = embedded_card(MODEL.removeprefix("embedded:"))
    schedule = NoiseSchedule.from_flags(card["noise_schedule"], card["diffusion_steps"])
    size = unet.config.image_size

    x_train, y_train = load_fashion_mnist("train", args.data)
    x_test, y_test = load_fashion_mnist("test", args.data)
    fraction = min(1.0, args.train / len(y_train))
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 21]))
    rows = (
        np.arange(len(y_train))
        if fraction >= 1
        else stratified_holdout(np.arange(len(y_train)), y_train, fraction, rng)[1]
    )
    test_rows = np.arange(min(args.test, len(y_test)))
    data = ImageSet.from_array(images(x_train[rows], size), y_train[rows], keys=rows)
    test = ImageSet.from_array(images(x_test[test_rows], size), y_test[test_rows], keys=TRAIN_ROWS + test_rows)
    train, val = validation_split(data, args.val_fraction, args.seed)
    recipe = FeedbackRecipe(
        t=args.t,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        step_size=args.step_size,
        seed=args.seed,
    )

    arms: dict[str, dict] = {}
    for arm, blocks in (("attention", ()), ("difffeed", None)):
        with seeded_init(args.seed):
            model = DifFeed(unet, 10, blocks, args.read_block, args.tokens, **PRESETS[args.preset])
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = train_feedback(
            model,
            schedule,
            train,
            val,
            test,
            recipe=recipe,
            out_dir=out / arm,
            micro_batch=args.micro_batch,
            eval_batch_size=64,
            resume=not args.restart,
        )
        result.update(cpu_seconds=time.process_time() - cpu0, wall_seconds=time.perf_counter() - wall0)
        arms[arm] = result
        print(
            f"{arm}: best epoch {result['best_epoch']}, val {100 * result['val_accuracy']:.2f}%, "
            f"test {100 * result['test_accuracy']:.2f}% ({result['cpu_seconds']:.0f} s CPU)",
            flush=True,
        )

    correct = {arm: np.asarray(r["test_predictions"]) == test.labels for arm, r in arms.items()}
    paired = mcnemar(correct["difffeed"], correct["attention"])
    summary = {
        "model": MODEL,
        "model_provenance": provenance,
        "sizes": {
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "train_subset_of": len(y_train),
            "test_rows": f"first {len(test)} of the {len(y_test)} test images",
        },
        "recipe": recipe.__dict__,
        "head_preset": args.preset,
        "tokens": args.tokens,
        "read_block": arms["difffeed"]["model"]["read_block"],
        "feedback": arms["difffeed"]["model"],
        "arms": {
            arm: {
                k: r[k]
                for k in (
                    "best_epoch",
                    "val_accuracy",
                    "test_accuracy",
                    "history",
                    "cpu_seconds",
                    "wall_seconds",
                    "micro_batch",
                )
            }
            for arm, r in arms.items()
        },
        "mcnemar_difffeed_vs_attention": paired,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(
        f"DifFeed - attention: {paired['diff_points']:+.2f} points on {len(test)} test images "
        f"(only DifFeed right {paired['only_a']}, only attention right {paired['only_b']}; McNemar p = {paired['p_value']:.3g})"
    )
    print(f"results: {out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
