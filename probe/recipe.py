"""Every training setting of a probe head, declared, defaulted and validated in one place.

A `Recipe` is frozen and checked when it is built, so whatever holds one (the trainer, the API, the
estimators, the CLI) can trust it without checking again. Recipes have names:

- `paper`: the public code's protocol (../shared/PAPER.md): raw features (no standardisation); SGD without
  momentum or weight decay; StepLR x0.1 every 7 epochs; 28 epochs; batch 128; the LAST epoch is kept.
  lr 1e-2 for linear heads, 5e-2 for the attention and DifFormer heads.
- `diffbank`: the same optimiser and schedule, but features standardised with train statistics (per
  dimension for linear heads, per channel for token heads, which keeps the spatial structure they read) and
  the best validation epoch kept. A linear sweep tries three lrs.
- `attentive`: the attentive probes' optimiser: AdamW (lr 1e-3, decoupled weight decay 1e-3) with a cosine
  schedule to 0 over 20 epochs, as V-JEPA's released ImageNet attentive-probe configuration
  (facebookresearch/jepa, configs/evals/vitl16_in1k.yaml; Bardes et al. 2024), after a one-epoch linear
  warm-up (diffbank's addition); standardised features and the best validation epoch kept, as `diffbank`.

`Recipe.named(name, head, **overrides)` builds one; overrides set to None are "not given", so the CLI and the
API can pass their options straight through. The full settings and the overridden field names go into
results.json (`to_record`), and `Recipe.from_record` rebuilds the recipe from a report alone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "Recipe",
    "ProbeConfigError",
    "RECIPES",
    "HEADS",
    "STANDARDIZE_MODES",
    "KEEP",
    "OPTIMIZERS",
    "SCHEDULES",
    "check_lr",
]

HEADS: tuple[str, ...] = ("linear", "attention", "fusion", "sweep")
STANDARDIZE_MODES: tuple[str, ...] = ("dim", "channel", "none")
# "best": the weights of the best validation epoch (earliest on ties); "last": the final epoch's weights.
KEEP: tuple[str, ...] = ("best", "last")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
# "step": StepLR(step_size, gamma); "cosine": linear warm-up over warmup_epochs, then cosine to 0 at the end.
SCHEDULES: tuple[str, ...] = ("step", "cosine")


class ProbeConfigError(ValueError):
    """A training setting is out of range or of the wrong type; the message starts with the setting's name."""


_OPTIMIZER: dict[str, Any] = {"epochs": 28, "batch_size": 128, "momentum": 0.0, "weight_decay": 0.0, "step_size": 7, "gamma": 0.1}
_LINEAR_LR, _TOKEN_LR = 1e-2, 5e-2
_ATTENTIVE = {
    **_OPTIMIZER,
    "epochs": 20,
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "optimizer": "adamw",
    "schedule": "cosine",
    "warmup_epochs": 1,
    "keep": "best",
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "linear": {**_OPTIMIZER, "lr": _LINEAR_LR, "standardize": "none", "keep": "last"},
        # The paper trains one lr; a sweep under its recipe sweeps features, not lrs.
        "sweep": {**_OPTIMIZER, "lr": _LINEAR_LR, "lrs": (_LINEAR_LR,), "standardize": "none", "keep": "last"},
        "attention": {**_OPTIMIZER, "lr": _TOKEN_LR, "standardize": "none", "keep": "last"},
        "fusion": {**_OPTIMIZER, "lr": _TOKEN_LR, "standardize": "none", "keep": "last"},
    },
    "diffbank": {
        "linear": {**_OPTIMIZER, "lr": _LINEAR_LR, "standardize": "dim", "keep": "best"},
        "sweep": {**_OPTIMIZER, "lr": _LINEAR_LR, "lrs": (1e-3, 1e-2, 1e-1), "standardize": "dim", "keep": "best"},
        "attention": {**_OPTIMIZER, "lr": _TOKEN_LR, "standardize": "channel", "keep": "best"},
        "fusion": {**_OPTIMIZER, "lr": _TOKEN_LR, "standardize": "channel", "keep": "best"},
    },
    "attentive": {
        "linear": {**_ATTENTIVE, "standardize": "dim"},
        "sweep": {**_ATTENTIVE, "lrs": (1e-4, 1e-3, 1e-2), "standardize": "dim"},
        "attention": {**_ATTENTIVE, "standardize": "channel"},
        "fusion": {**_ATTENTIVE, "standardize": "channel"},
    },
}


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ProbeConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    # Integral floats (2.0) are accepted because JSON and YAML round trips produce them.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < 1:
        raise ProbeConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)  # type: ignore[call-overload]  # integral (checked above); typeshed's numbers.Real has no __int__


def check_lr(name: str, value: Any) -> float:
    """A learning rate: a finite number > 0 (the error names `name`)."""
    lr = _real(name, value)
    if lr <= 0.0:
        raise ProbeConfigError(f"{name} must be > 0, got {value!r}")
    return lr


def _choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ProbeConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a head is trained. Defaults are the `diffbank` recipe of a linear head.

    `lrs` (a grid, one head per lr, selected on validation) replaces `lr` when set.
    """

    name: str = "diffbank"
    lr: float = _LINEAR_LR
    lrs: tuple[float, ...] | None = None
    epochs: int = _OPTIMIZER["epochs"]
    batch_size: int = _OPTIMIZER["batch_size"]
    momentum: float = _OPTIMIZER["momentum"]
    weight_decay: float = _OPTIMIZER["weight_decay"]
    step_size: int = _OPTIMIZER["step_size"]
    gamma: float = _OPTIMIZER["gamma"]
    standardize: str = "dim"
    keep: str = "best"
    optimizer: str = "sgd"
    schedule: str = "step"
    warmup_epochs: int = 0
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731  (frozen)
        set_("lr", check_lr("lr", self.lr))
        if self.lrs is not None:
            if isinstance(self.lrs, (str, bytes, numbers.Number)) or not isinstance(self.lrs, Iterable):
                raise ProbeConfigError(f"lrs must be a sequence of learning rates, got {self.lrs!r}")
            values = tuple(sorted({check_lr("lrs", v) for v in self.lrs}))
            if not values:
                raise ProbeConfigError("lrs must hold at least one learning rate")
            set_("lrs", values)
        for field in ("epochs", "batch_size", "step_size"):
            set_(field, _count(field, getattr(self, field)))
        momentum = _real("momentum", self.momentum)
        if not 0.0 <= momentum < 1.0:
            raise ProbeConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        set_("momentum", momentum)
        weight_decay = _real("weight_decay", self.weight_decay)
        if weight_decay < 0.0:
            raise ProbeConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        set_("weight_decay", weight_decay)
        gamma = _real("gamma", self.gamma)
        if not 0.0 < gamma <= 1.0:
            raise ProbeConfigError(f"gamma must be in (0, 1], got {self.gamma!r}")
        set_("gamma", gamma)
        _choice("standardize", self.standardize, STANDARDIZE_MODES)
        _choice("keep", self.keep, KEEP)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        if self.optimizer == "adamw" and momentum != 0.0:
            raise ProbeConfigError(f"momentum is SGD's; AdamW takes none, got {self.momentum!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, numbers.Integral):
            raise ProbeConfigError(f"warmup_epochs must be an integer, got {self.warmup_epochs!r}")
        if not 0 <= int(self.warmup_epochs) < self.epochs:
            raise ProbeConfigError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ProbeConfigError("warmup_epochs needs schedule='cosine'")
        set_("warmup_epochs", int(self.warmup_epochs))
        set_("overrides", tuple(sorted(set(self.overrides))))

    @classmethod
    def named(cls, name: str, head: str = "linear", **overrides: Any) -> Recipe:
        """The recipe `name` for `head` (linear, attention, fusion, sweep), with overrides; None = not given."""
        base = RECIPES.get(name)
        if base is None:
            raise ProbeConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
        _choice("head", head, HEADS)
        given = {k: v for k, v in overrides.items() if v is not None}
        _check_settings(given)
        return cls(name=name, **{**base[head], **given}, overrides=tuple(given))

    def replace(self, **changes: Any) -> Recipe:
        """A copy with `changes` applied and recorded as overrides (None = not given)."""
        given = {k: v for k, v in changes.items() if v is not None}
        _check_settings(given)
        return dataclasses.replace(self, **given, overrides=self.overrides + tuple(given))

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.lrs if self.lrs is not None else (self.lr,)

    def optimizer_label(self) -> str:
        """The optimiser as results.json has always spelled it, e.g. 'SGD(momentum=0, weight_decay=0)'."""
        if self.optimizer == "adamw":
            return f"AdamW(weight_decay={_fmt(self.weight_decay)})"
        return f"SGD(momentum={_fmt(self.momentum)}, weight_decay={_fmt(self.weight_decay)})"

    def schedule_label(self) -> str:
        if self.schedule == "cosine":
            return f"cosine(warmup_epochs={self.warmup_epochs}, epochs={self.epochs})"
        return f"StepLR(step_size={self.step_size}, gamma={_fmt(self.gamma)})"

    def lr_factor(self, epoch: int) -> float:
        """The cosine schedule's lr factor for (0-based) `epoch`: a linear warm-up to 1 over `warmup_epochs`,
        then half a cosine, reaching 0 at `epochs` (the last epoch still trains with a small lr)."""
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = self.epochs - self.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))

    def to_record(self) -> dict[str, Any]:
        """Every setting (JSON-able): enough to train the same way again (`from_record`)."""
        record = dataclasses.asdict(self)
        record["lrs"] = list(self.lrs) if self.lrs is not None else None
        record["overrides"] = list(self.overrides)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Recipe:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        if values.get("lrs") is not None:
            values["lrs"] = tuple(values["lrs"])
        values["overrides"] = tuple(values.get("overrides") or ())
        return cls(**values)


def _check_settings(given: Mapping[str, Any]) -> None:
    settings = {f.name for f in dataclasses.fields(Recipe)} - {"name", "overrides"}
    unknown = sorted(set(given) - settings)
    if unknown:
        raise ProbeConfigError(f"{unknown[0]} is not a training setting; settings: {', '.join(sorted(settings))}")


def _fmt(value: float) -> str:
    """0.0 -> '0', 0.1 -> '0.1', 7 -> '7': exact (repr) and equal to the strings older runs recorded."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


@dataclasses.dataclass(frozen=True)
class FeedbackRecipe:
    """Everything that decides DifFeed's numbers (probe.feedback); the defaults are the paper's DifFeed
    recipe: its heads' optimiser, with the effective batch of 16 and lr 1e-2, at t = 150."""

    t: int = 150
    epochs: int = _OPTIMIZER["epochs"]
    batch_size: int = 16  # the effective batch: micro-batches accumulate up to it
    lr: float = _LINEAR_LR
    momentum: float = _OPTIMIZER["momentum"]
    weight_decay: float = _OPTIMIZER["weight_decay"]
    step_size: int = _OPTIMIZER["step_size"]
    gamma: float = _OPTIMIZER["gamma"]
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
