"""Training, evaluating and saving the heads of a trained command (linear, attention, fusion, sweep).

`TrainedRun` turns a command's options into its recipe (checked before any data is read) and its `Job`;
`finish_single` and `TrainedRun.finish` train one head, or one head per lr (selected on validation), evaluate
it on validation and test (logits to out_dir/logits.npz), save its weights as safetensors and write the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import save_file

from extract.provenance import to_jsonable
from probe.data import ProbeData
from probe.errors import ProbeDataError
from probe.evaluation import InputSpec, predict_many, predict_many_to_files
from probe.head_results import HeadResult, SweepResult
from probe.heads import HeadSizes, resolve_preset, seeded_init
from probe.inputs import StoreLike
from probe.job import Job
from probe.logits import ScoreFile, score_file_path
from probe.metrics import classification_metrics
from probe.options import COMPARE_SPLITS, AttentionOptions, LinearOptions, SweepOptions, TrainingOptions
from probe.recipe import ProbeConfigError, Recipe
from probe.report import plot_heatmap
from probe.stream import FeatureStream
from probe.trainer import train_many

__all__ = [
    "TrainedRun",
    "finish_single",
    "train_heads",
    "evaluate_head",
    "split_logits",
    "split_score_files",
    "report_logits",
    "save_heads",
    "head_record",
    "single_feature",
]


GRID_FIGURE = "grid_val.png"
log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


def _recipe(name: str, head: str, **settings: Any) -> Recipe:
    """The named recipe with the caller's settings (None = not given); checked before any data is read."""
    if settings.get("lr") is not None and settings.get("lrs") is not None:
        raise ProbeConfigError("give either lr or lrs, not both")
    return Recipe.named(name, head, **settings)


def _config(recipe: Recipe, lr_keys: bool = True, **settings: Any) -> dict[str, Any]:
    """A training command's configuration: its settings, then the recipe it trains with.

    One lr keeps the key older runs recorded ("lr"), so their out_dirs still resume.
    """
    lr = ({"lr": recipe.lr} if recipe.lrs is None else {"lrs": list(recipe.lrs)}) if lr_keys else {}
    return {
        "recipe": recipe.name,
        "keep": recipe.keep,
        "epochs": recipe.epochs,
        **lr,
        "batch_size": recipe.batch_size,
        **settings,
        "optimizer": recipe.optimizer_label(),
        "schedule": recipe.schedule_label(),
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "step_size": recipe.step_size,
        "gamma": recipe.gamma,
    }


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _lr_key(lr: float) -> str:
    return f"lr={_number(lr)}"


def _weight_decays(values: Any) -> tuple[float, ...]:
    """A weight-decay grid: sorted, distinct, each >= 0 (checked before any data is read)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ProbeConfigError(f"weight_decays must be a non-empty sequence of numbers, got {values!r}")
    grid = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) >= 0.0:
            raise ProbeConfigError(f"weight_decays must hold numbers >= 0, got {v!r}")
        grid.add(float(v))
    return tuple(sorted(grid))


class TrainedRun:
    """What the trained commands (linear, attention, fusion, sweep) share: the recipe their options make, checked
    before any data is read, and one config layout (so all record and resume alike)."""

    def __init__(
        self, command: str, store: StoreLike, out_dir: str | Path, options: TrainingOptions, read_data: bool = True
    ) -> None:
        lr = options.lr if isinstance(options, (LinearOptions, AttentionOptions)) else None
        lrs = options.lrs if isinstance(options, (AttentionOptions, SweepOptions)) else None
        self.recipe = _recipe(
            options.recipe,
            command,
            lr=lr,
            lrs=lrs,
            epochs=options.epochs,
            batch_size=options.batch_size,
            standardize=options.standardize,
            momentum=options.momentum,
            weight_decay=options.weight_decay,
            step_size=options.step_size,
            gamma=options.gamma,
        )
        self.options = options
        self.seed, self.device, self.progress = options.seed, options.device, options.progress
        self.sizes: HeadSizes = {}
        self.positions = "none"
        self.weight_decays: tuple[float, ...] | None = None
        settings: dict[str, Any] = {}
        if isinstance(options, LinearOptions):
            settings = {"batchnorm": bool(options.batchnorm)}
        elif isinstance(options, AttentionOptions):
            if options.weight_decays is not None:
                if options.weight_decay is not None:
                    raise ProbeConfigError("give either weight_decay or weight_decays, not both")
                self.weight_decays = _weight_decays(options.weight_decays)
            preset = options.preset or "small"
            self.sizes = resolve_preset(preset)
            self.positions = options.positions
            settings = {"preset": preset, **self.sizes, "positions": self.positions}
            if self.weight_decays is not None:
                settings["weight_decays"] = list(self.weight_decays)
        draws, eval_draws = options.draws, options.eval_draws
        self.job = Job(
            command,
            store,
            out_dir,
            options,
            _config(self.recipe, **settings, device=options.device, draws=draws, eval_draws=eval_draws),
            standardize=self.recipe.standardize,
            resume=options.resume,
            recipe=self.recipe,
            draws=draws,
            eval_draws=eval_draws,
            read_data=read_data,
        )

    def finish(self, make_head: Callable[[], torch.nn.Module], input: InputSpec) -> dict[str, Any]:
        """Train the head `make_head` builds (one per lr of the recipe's `lrs` x `weight_decays`), evaluate,
        save, report."""
        return _finish_transformer(
            self.job, make_head, input, self.seed, self.device, self.progress, self.weight_decays
        )


def _finish_transformer(
    job: Job,
    make_head: Callable[[], torch.nn.Module],
    input: InputSpec,
    seed: int,
    device: str,
    progress: bool,
    weight_decays: Sequence[float] | None = None,
) -> dict[str, Any]:
    rec = job.recipe
    assert rec is not None
    if rec.lrs is None and weight_decays is None:
        with seeded_init(seed):
            head = make_head()
        return finish_single(job, head, input, rec.lr, device, progress)
    heads: dict[str, torch.nn.Module] = {}
    lr_of: dict[str, float] = {}
    wd_of: dict[str, float] = {}
    for value in rec.learning_rates:
        for wd in weight_decays if weight_decays is not None else (rec.weight_decay,):
            key = _lr_key(value) if weight_decays is None else f"{_lr_key(value)},wd={_number(wd)}"
            with seeded_init(seed):  # same start for every head: each equals the single run's head
                heads[key] = make_head()
            lr_of[key], wd_of[key] = value, wd
    footprint = _grid_footprint(heads, rec)
    log.info(
        "training %d heads in one pass: %d parameters each, %.1f MiB of weights, gradients, optimiser state and "
        "kept best-epoch weights, next to the data",
        len(heads),
        footprint["parameters_per_head"],
        footprint["state_bytes"] / 2**20,
    )
    result = train_heads(
        job,
        heads,
        {k: input for k in heads},
        lr_of,
        device=device,
        progress=progress,
        weight_decays=wd_of if weight_decays is not None else None,
    )
    assert result.best is not None  # a validation split always exists
    best = str(result.best)
    chosen = result.heads[best]
    metrics = evaluate_head(job, heads[best], input, device)
    save_heads(
        job.out / "head.safetensors",
        {"": heads[best]},
        {"command": job.command, "features": job.features, "config": job.config, "lr": chosen.lr},
    )
    save_heads(
        job.out / "heads.safetensors",
        heads,
        {"command": job.command, "features": job.features, "config": job.config, "heads": list(heads)},
    )
    table = [
        {
            "head": k,
            "lr": r.lr,
            "weight_decay": wd_of[str(k)],
            "best_epoch": r.best_epoch,
            "epochs_trained": r.epochs_trained,
            "val_accuracy": r.val_accuracy,
            "test_accuracy": r.test_accuracy,
            "diverged": r.diverged,
            "selected": k == best,
            "history": r.history,
        }
        for k, r in result.heads.items()
    ]
    grid: dict[str, Any] = {}
    if weight_decays is not None:
        # plot_heatmap takes any sortable (row, column) keys; here (lr, weight decay)
        val: dict[Any, Any] = {(lr_of[str(k)], wd_of[str(k)]): r.val_accuracy for k, r in result.heads.items()}
        corner: Any = (chosen.lr, wd_of[best])
        plot_heatmap(
            val,
            job.out / GRID_FIGURE,
            title="val top-1 over lr x weight decay (selected outlined)",
            xlabel="weight decay",
            ylabel="lr",
            best=corner,
        )
        grid = {"grid": {"lrs": list(rec.learning_rates), "weight_decays": list(weight_decays), **footprint}}
        grid["figures"] = {"grid_val": GRID_FIGURE}
    return job.finish(
        {
            "metrics": metrics,
            "selected": {
                "lr": chosen.lr,
                "weight_decay": wd_of[best],
                "epoch": chosen.best_epoch,
                "val_accuracy": chosen.val_accuracy,
            },
            "training": head_record(chosen),
            "lr_sweep": table,
            **grid,
            "weights": "head.safetensors",
            "all_weights": "heads.safetensors",
        }
    )


def _grid_footprint(heads: Mapping[str, torch.nn.Module], recipe: Recipe) -> dict[str, int]:
    """What the heads of one pass hold: float32 weights, gradients, the kept best-epoch copy and, with momentum,
    SGD's buffer, per head."""
    head = next(iter(heads.values()))
    params = sum(p.numel() for p in head.parameters())
    copies = 3 + (1 if recipe.momentum else 0)
    return {
        "heads": len(heads),
        "parameters_per_head": int(params),
        "state_bytes": int(len(heads) * params * 4 * copies),
    }


def finish_single(
    job: Job, head: torch.nn.Module, input: InputSpec, lr: float, device: str, progress: bool
) -> dict[str, Any]:
    result = train_heads(job, {"head": head}, {"head": input}, {"head": lr}, device=device, progress=progress).heads[
        "head"
    ]
    metrics = evaluate_head(job, head, input, device)
    save_heads(
        job.out / "head.safetensors",
        {"": head},
        {"command": job.command, "features": job.features, "config": job.config},
    )
    return job.finish(
        {
            "metrics": metrics,
            "selected": {"epoch": result.best_epoch, "lr": lr, "val_accuracy": result.val_accuracy},
            "training": head_record(result),
            "weights": "head.safetensors",
        }
    )


def train_heads(
    job: Job,
    heads: Mapping[str, torch.nn.Module],
    inputs: Mapping[str, InputSpec],
    lrs: Mapping[str, float],
    *,
    device: str,
    progress: bool,
    weight_decays: Mapping[str, float] | None = None,
) -> SweepResult:
    """Train `heads` with the run's recipe on its train split, validating every epoch; checkpoints resume."""
    assert job.recipe is not None
    batch_size = job.recipe.batch_size
    t0 = time.perf_counter()
    result = train_many(
        heads,
        inputs,
        job.stream("train", batch_size, True),
        job.stream("val", batch_size, False),
        job.stream("test", batch_size, False),
        lrs=dict(lrs),
        weight_decays=None if weight_decays is None else dict(weight_decays),
        recipe=job.recipe,
        checkpoint_dir=job.out / "checkpoint",
        resume=True,
        progress=progress,
        device=device,
    )
    job.timings["train_s"] = time.perf_counter() - t0
    return result


def evaluate_head(job: Job, head: torch.nn.Module, input: InputSpec, device: str) -> dict[str, Any]:
    """Metrics of one head on the validation and test splits (`report_logits`)."""
    t0 = time.perf_counter()
    # The logits go to disk batch by batch and are scored and saved from there: held in memory they grew with
    # the splits (0.97 GB for ImageNet's val and test at 1,000 classes).
    scores = split_score_files(job.data, {"": (head, input)}, job.recipe, device, job.out)[""]
    try:
        metrics = report_logits(job, scores)
    finally:
        for file in scores.values():
            file.remove()
    job.timings["eval_s"] = time.perf_counter() - t0
    return metrics


def split_logits(
    data: ProbeData, heads: Mapping[K, tuple[torch.nn.Module, InputSpec]], recipe: Recipe | None, device: str
) -> dict[K, dict[str, np.ndarray]]:
    """Every head's logits on the validation and test splits ({key: {split: (N, classes)}}), one pass per split."""
    assert recipe is not None
    out: dict[K, dict[str, np.ndarray]] = {k: {} for k in heads}
    for split in COMPARE_SPLITS:
        logits = predict_many(heads, FeatureStream(data, split, recipe.batch_size, shuffle=False), device)
        for k, v in logits.items():
            out[k][split] = v.numpy()
    return out


def split_score_files(
    data: ProbeData,
    heads: Mapping[K, tuple[torch.nn.Module, InputSpec]],
    recipe: Recipe | None,
    device: str,
    directory: Path,
) -> dict[K, dict[str, ScoreFile]]:
    """`split_logits` written batch by batch to `ScoreFile`s in `directory` (one per head and split, hidden
    names), so memory does not grow with the splits; the caller removes them. On error none is left behind."""
    assert recipe is not None
    names = {k: i for i, k in enumerate(heads)}
    out: dict[K, dict[str, ScoreFile]] = {k: {} for k in heads}
    try:
        for split in COMPARE_SPLITS:
            paths = {k: score_file_path(directory, names[k], split) for k in heads}
            files = predict_many_to_files(
                heads, FeatureStream(data, split, recipe.batch_size, shuffle=False), paths, device
            )
            for k, file in files.items():
                out[k][split] = file
    except BaseException:
        for per_split in out.values():
            for file in per_split.values():
                file.remove()
        raise
    return out


def report_logits(job: Job, logits: Mapping[str, np.ndarray | ScoreFile]) -> dict[str, Any]:
    """Metrics of the selected head's {split: logits} (arrays, or `ScoreFile`s scored a block of rows at a time)
    on validation and test; the logits (and the store rows they belong to) go to out_dir/logits.npz, so two runs
    can be compared image by image (e.g. McNemar)."""
    out = {
        split: classification_metrics(
            job.data.labels(split), logits[split], num_classes=job.data.num_classes, class_names=job.data.class_names
        )
        for split in COMPARE_SPLITS
    }
    job.save_logits(logits)
    return out


def save_heads(path: Path, heads: Mapping[str, torch.nn.Module], metadata: Mapping[str, Any]) -> None:
    """Heads' weights as one safetensors file (keys prefixed by the head's name), metadata as JSON strings."""
    tensors = {
        f"{prefix}.{k}" if prefix else k: v.detach().cpu().contiguous()
        for prefix, head in heads.items()
        for k, v in head.state_dict().items()
    }
    save_file(tensors, str(path), metadata={k: json.dumps(to_jsonable(v)) for k, v in metadata.items()})


def head_record(result: HeadResult) -> dict[str, Any]:
    return {
        "lr": result.lr,
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "test_accuracy": result.test_accuracy,
        "diverged": result.diverged,
        "history": result.history,
    }


def single_feature(job: Job) -> str:
    if len(job.features) != 1:
        raise ProbeDataError(
            f"{job.command} trains a head on one feature, got {len(job.features)} "
            f"({', '.join(job.features)}); use `sweep` for many features or `fusion` to combine them"
        )
    return job.features[0]
