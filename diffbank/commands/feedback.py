"""`diffbank probe feedback SPEC`: DifFeed with the U-Net in the loop (all training logic is in probe.feedback).

The spec gives the model and the dataset; its feature grid, storage and noise draws are not used (nothing is
cached). Its `noise.seed` is the default --seed, so the evaluation noise equals what the spec's store holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from diffbank.commands.options import device_option, quiet, seed_option, spec_device
from probe.recipe import FeedbackRecipe  # declarations only (no torch): the defaults shown in --help

PAPER = FeedbackRecipe()

TRAIN_SPLITS = ("train", "training")
TEST_SPLITS = ("test", "testing", "val", "valid", "validation")


def _pick(available: list[str], wanted: str | None, preferred: tuple[str, ...], role: str) -> str | None:
    if wanted is not None:
        if wanted not in available:
            raise click.UsageError(f"--{role}-split {wanted!r}: the dataset has splits {', '.join(available)}")
        return wanted
    return next((s for s in preferred if s in available), None)


def _image_sets(spec: Any, train_split: str | None, test_split: str | None) -> tuple[Any, Any, dict[str, Any]]:
    # Imported when the command runs, not when the CLI starts: `import probe.feedback` (torch, the U-Net)
    # measured 10.1 s on 2 busy cores, the CLI without it 0.4 s.
    from extract.preprocess import preprocess
    from extract.sources import open_source
    from probe.feedback.images import ImageSet

    source = open_source(spec.dataset)
    size, method = spec.dataset.image_size, spec.dataset.preprocess

    def load(keys: np.ndarray) -> np.ndarray:
        out = np.empty((len(keys), 3, size, size), dtype=np.float32)
        for row, key in enumerate(keys):
            item = source.load(int(key))
            if item.error is not None:
                raise click.ClickException(f"sample {item.sample_id!r} cannot be read: {item.error}")
            out[row] = preprocess(item.image, size, method)
        return out

    available = list(source.splits)
    train = _pick(available, train_split, TRAIN_SPLITS, "train") or available[0]
    test = _pick(available, test_split, TEST_SPLITS, "test")
    if test == train:
        test = None
    labels = source.labels

    def image_set(split: str) -> Any:
        rows = source.splits[split]
        keep = rows[labels[rows] >= 0]  # unlabelled rows cannot train or score
        return ImageSet(labels[keep], keep, load)

    info = {
        "train_split": train,
        "test_split": test,
        "class_names": list(source.class_names),
        "dataset_manifest_sha256": source.manifest_hash(),
    }
    return image_set(train), image_set(test) if test else None, info


@click.command("feedback")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="directory for results.json, weights.safetensors and checkpoint/ (a rerun resumes)",
)
@click.option("--epochs", default=PAPER.epochs, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batch-size",
    default=PAPER.batch_size,
    show_default=True,
    type=click.IntRange(min=1),
    help="effective batch (the paper's); micro-batches accumulate up to it",
)
@click.option(
    "--micro-batch",
    default=None,
    type=click.IntRange(min=1),
    help="samples per forward/backward (default: sized to the free memory); one BatchNorm batch",
)
@click.option("--lr", default=PAPER.lr, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--momentum", default=PAPER.momentum, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--step-size", default=PAPER.step_size, show_default=True, type=click.IntRange(min=1), help="StepLR period (epochs)"
)
@click.option("--gamma", default=PAPER.gamma, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--t",
    "timestep",
    default=PAPER.t,
    show_default=True,
    type=click.IntRange(min=0),
    help="the noise step of both passes (the paper's)",
)
@seed_option(None, "seed of val split, order, noise and init (default: the spec's noise seed)")
@device_option(None, spec_device, "torch device (default: the spec's compute.device; auto picks CUDA)")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "paper"]),
    default="paper",
    show_default=True,
    help="attention head size",
)
@click.option(
    "--tokens",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="the read block is average-pooled to at most TOKENS x TOKENS",
)
@click.option(
    "--feedback-block",
    "feedback_blocks",
    multiple=True,
    type=int,
    help="decoder block to feed back (repeatable; default: one per resolution level, the paper's on 256 models)",
)
@click.option("--no-feedback", is_flag=True, help="the plain attention head on live features (the baseline)")
@click.option(
    "--read-block", default=None, type=int, help="block the head reads (default: the paper's 24 or its analogue)"
)
@click.option(
    "--val-fraction",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="stratified fraction of train held out for epoch selection",
)
@click.option("--train-split", default=None, help="dataset split to train on (default: train)")
@click.option("--test-split", default=None, help="dataset split to report (default: test, else val)")
@click.option("--restart", is_flag=True, help="discard OUT/checkpoint instead of resuming from it")
def feedback_command(
    spec_path: str,
    out_dir: str,
    timestep: int,
    seed: int | None,
    device: str | None,
    no_feedback: bool,
    restart: bool,
    **opts: Any,
) -> None:
    """DifFeed on SPEC's model and dataset: train feedback layers + attention head, the U-Net frozen in the loop.

    \b
    Pass 1 (no grad) reads the decoder's feedback blocks; each goes through Conv1x1+BN+ReLU and is added
    to its skip partner in the encoder (block N+1-b) in pass 2; the attention head reads the read block.
    Selection is on a validation split carved from train; the report is on test.
    """
    import torch

    # Imported when the command runs (torch and the U-Net: see _image_sets).
    from extract.compute import ExtractionError, resolve_device
    from extract.diffusion import NoiseSchedule
    from extract.models.registry import build_model
    from extract.prepare import checkpoint_path
    from extract.spec import SpecError, load_spec
    from probe.feedback.images import validation_split
    from probe.feedback.network import DifFeed
    from probe.feedback.training import train_feedback
    from probe.heads import resolve_preset, seeded_init

    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        raise click.ClickException(f"{spec_path}:\n  " + "\n  ".join(exc.problems)) from exc
    seed = spec.noise.seed if seed is None else seed
    try:
        recipe = FeedbackRecipe(
            t=timestep,
            epochs=opts["epochs"],
            batch_size=opts["batch_size"],
            lr=opts["lr"],
            momentum=opts["momentum"],
            step_size=opts["step_size"],
            gamma=opts["gamma"],
            seed=seed,
        )
        schedule = NoiseSchedule.from_flags(spec.model.noise_schedule, spec.model.diffusion_steps)
        schedule.check_timesteps([timestep])
        dev = resolve_device(device or spec.compute.device)
        checkpoint = None if spec.model.checkpoint is None else str(checkpoint_path(spec))
        unet, provenance = build_model(spec.model.preset, dict(spec.model.flags), checkpoint, spec.model.init_seed)
        data, test, data_info = _image_sets(spec, opts["train_split"], opts["test_split"])
        train, val = validation_split(data, opts["val_fraction"], seed)
        num_classes = max(
            len(data_info["class_names"]),
            int(data.labels.max()) + 1,
            int(test.labels.max()) + 1 if test is not None and len(test) else 0,
        )
        blocks = () if no_feedback else (list(opts["feedback_blocks"]) or None)
        with seeded_init(seed):
            model = DifFeed(unet, num_classes, blocks, opts["read_block"], opts["tokens"], **resolve_preset(opts["preset"]))
        results = train_feedback(
            model,
            schedule,
            train,
            val,
            test,
            recipe=recipe,
            out_dir=out_dir,
            device=dev,
            micro_batch=opts["micro_batch"],
            resume=not restart,
            progress=not quiet(),
        )
    except (ValueError, FileNotFoundError, ExtractionError, torch.cuda.OutOfMemoryError) as exc:
        raise click.ClickException(str(exc)) from exc
    results.update(
        spec=spec_path,
        spec_fingerprint=spec.fingerprint,
        model_provenance=provenance,
        head_preset=opts["preset"],
        val_fraction=opts["val_fraction"],
        **data_info,
    )
    tmp = Path(out_dir, "results.json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(Path(out_dir, "results.json"))
    test_text = f", test top-1 {100 * results['test_accuracy']:.2f}%" if "test_accuracy" in results else ""
    click.echo(
        f"{results['method']}: best epoch {results['best_epoch']}, "
        f"val top-1 {100 * results['val_accuracy']:.2f}%{test_text}"
    )
    click.echo(f"results: {out_dir}/results.json")
