"""A trained command's run (linear, attention, fusion, sweep): its options, declared once; the recipe they make,
checked before any data is read; one config layout, so all record and resume alike; and the training and
report of one head or of one head per lr (selected on validation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from probe.heads import resolve_preset, seeded_init
from probe.recipe import ProbeConfigError, Recipe
from probe.runs import Run, evaluate_head, head_record, save_heads, train_heads

__all__ = ["TrainedRun", "finish_single"]


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


def _lr_key(lr: float) -> str:
    value = float(lr)
    return f"lr={int(value) if value.is_integer() else repr(value)}"


# ------------------------------------------------------------------------------------------- commands


_ONLY = {
    "batchnorm": ("linear",),
    "preset": ("attention", "fusion"),
    "lr": ("linear", "attention", "fusion"),
    "lrs": ("attention", "fusion", "sweep"),
}


class TrainedRun:
    """What the trained commands (linear, attention, fusion, sweep) share: their options (declared once, here),
    the settings checked before any data is read, one config layout (so all record and resume alike)."""

    def __init__(
        self,
        command: str,
        store: Any,
        out_dir: str | Path,
        *,
        features: Sequence[str] | str | None = None,
        recipe: str = "diffbank",
        lr: float | None = None,
        lrs: Sequence[float] | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        step_size: int | None = None,
        gamma: float | None = None,
        standardize: str | None = None,
        preset: str | None = None,
        batchnorm: bool | None = None,
        seed: int = 0,
        subset: str | None = None,
        val_fraction: float = 0.1,
        memory_budget: int | str | None = None,
        device: str = "cpu",
        progress: bool = True,
        resume: bool = True,
        draws: int | None = None,
        eval_draws: str = "first",
    ) -> None:
        given = {"batchnorm": batchnorm, "preset": preset, "lr": lr, "lrs": lrs}
        for option, commands in _ONLY.items():
            if given[option] is not None and command not in commands:
                raise TypeError(f"run_{command}() got an unexpected keyword argument {option!r}")
        self.recipe = _recipe(
            recipe,
            command,
            lr=lr,
            lrs=lrs,
            epochs=epochs,
            batch_size=batch_size,
            standardize=standardize,
            momentum=momentum,
            weight_decay=weight_decay,
            step_size=step_size,
            gamma=gamma,
        )
        self.seed, self.device, self.progress = seed, device, progress
        self.batchnorm = bool(batchnorm)
        self.sizes: dict[str, int] = {}
        if command == "linear":
            settings: dict[str, Any] = {"batchnorm": self.batchnorm}
        elif command == "sweep":
            settings = {}
        else:
            preset = preset or "small"
            self.sizes = resolve_preset(preset)
            settings = {"preset": preset, **self.sizes}
        self.run = Run(
            command,
            store,
            out_dir,
            features,
            _config(self.recipe, **settings, device=device, draws=draws, eval_draws=eval_draws),
            seed=seed,
            subset=subset,
            val_fraction=val_fraction,
            standardize=self.recipe.standardize,
            memory_budget=memory_budget,
            resume=resume,
            recipe=self.recipe,
            draws=draws,
            eval_draws=eval_draws,
        )

    def finish(self, make_head: Callable[[], torch.nn.Module], input: Any) -> dict[str, Any]:
        return _finish_transformer(self.run, make_head, input, self.seed, self.device, self.progress)


def _finish_transformer(
    run: Run, make_head: Callable[[], torch.nn.Module], input: Any, seed: int, device: str, progress: bool
) -> dict[str, Any]:
    rec = run.recipe
    assert rec is not None
    if rec.lrs is None:
        with seeded_init(seed):
            head = make_head()
        return finish_single(run, head, input, rec.lr, device, progress)
    heads: dict[str, torch.nn.Module] = {}
    lr_of: dict[str, float] = {}
    for value in rec.lrs:
        key = _lr_key(value)
        with seeded_init(seed):  # same start for every lr: each head equals the single-lr run's head
            heads[key] = make_head()
        lr_of[key] = value
    result = train_heads(run, heads, {k: input for k in heads}, lr_of, device=device, progress=progress)
    assert result.best is not None  # a validation split always exists
    best = str(result.best)
    chosen = result.heads[best]
    metrics = evaluate_head(run, heads[best], input, device)
    save_heads(
        run.out / "head.safetensors",
        {"": heads[best]},
        {"command": run.command, "features": run.features, "config": run.config, "lr": chosen.lr},
    )
    save_heads(
        run.out / "heads.safetensors",
        heads,
        {"command": run.command, "features": run.features, "config": run.config, "heads": list(heads)},
    )
    table = [
        {
            "head": k,
            "lr": r.lr,
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
    return run.finish(
        {
            "metrics": metrics,
            "selected": {"lr": chosen.lr, "epoch": chosen.best_epoch, "val_accuracy": chosen.val_accuracy},
            "training": head_record(chosen),
            "lr_sweep": table,
            "weights": "head.safetensors",
            "all_weights": "heads.safetensors",
        }
    )


def finish_single(
    run: Run, head: torch.nn.Module, input: Any, lr: float, device: str, progress: bool
) -> dict[str, Any]:
    result = train_heads(run, {"head": head}, {"head": input}, {"head": lr}, device=device, progress=progress).heads[
        "head"
    ]
    metrics = evaluate_head(run, head, input, device)
    save_heads(
        run.out / "head.safetensors",
        {"": head},
        {"command": run.command, "features": run.features, "config": run.config},
    )
    return run.finish(
        {
            "metrics": metrics,
            "selected": {"epoch": result.best_epoch, "lr": lr, "val_accuracy": result.val_accuracy},
            "training": head_record(result),
            "weights": "head.safetensors",
        }
    )
