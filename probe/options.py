"""Every probe command's options, declared once: one frozen dataclass per command, shared by the CLI and the API.

`probe.run.run_linear(store, out_dir, LinearOptions(epochs=5))` and `diffbank probe linear --epochs 5` build the
same options; a misspelt option is a `TypeError` naming it. Training settings left at None take the named
recipe's value (`probe.recipe`), given ones override it. Declarations only (no torch), so the CLI can show the
defaults in `--help` without importing the probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DataOptions",
    "TrainingOptions",
    "LinearOptions",
    "AttentionOptions",
    "FusionOptions",
    "SweepOptions",
    "LogisticOptions",
    "KnnOptions",
    "COMPARE_SPLITS",
    "LOGISTIC_SOLVERS",
    "REFIT_CHOICES",
    "KNN_KS",
    "KNN_TEMPERATURE",
]

KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """What every probe command reads: which features (None: `probe.defaults`), the seed of splits, subsets,
    order and initial weights, a label subset of train ('1%', '5-shot'), the validation fraction carved from
    train when the store has no validation split, and the memory budget (bytes, '2GiB', '25%'; None: 25% of RAM)."""

    features: Sequence[str] | str | None = None
    seed: int = 0
    subset: str | None = None
    val_fraction: float = 0.1
    memory_budget: int | str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainingOptions(DataOptions):
    """The trained heads' options: the recipe ('diffbank' or 'paper') and the settings that override it (None:
    the recipe's), the device, per-epoch progress, resuming a checkpoint in out_dir, and the noise draws of a
    store that keeps them apart (`draws`: train on the first K, default all; `eval_draws`: 'first' | 'mean')."""

    recipe: str = "diffbank"
    epochs: int | None = None
    batch_size: int | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    step_size: int | None = None
    gamma: float | None = None
    standardize: str | None = None
    device: str = "cpu"
    progress: bool = True
    resume: bool = True
    draws: int | None = None
    eval_draws: str = "first"


@dataclass(frozen=True, kw_only=True)
class LinearOptions(TrainingOptions):
    """`run_linear`: one lr, and `batchnorm` (parameter-free BatchNorm before the linear layer)."""

    lr: float | None = None
    batchnorm: bool = False


@dataclass(frozen=True, kw_only=True)
class AttentionOptions(TrainingOptions):
    """`run_attention`: a size `preset` (tiny | small | paper), token `positions` (none | learned, see
    probe.heads) and one `lr`, or several `lrs`; with
    `weight_decays` (instead of `weight_decay`) every lr x weight decay. Several heads train in one pass from the
    same initial weights (each its own parameter group, one summed loss), the one best on validation reported."""

    preset: str = "small"
    positions: str = "none"
    lr: float | None = None
    lrs: Sequence[float] | None = None
    weight_decays: Sequence[float] | None = None


@dataclass(frozen=True, kw_only=True)
class FusionOptions(AttentionOptions):
    """`run_fusion`: as `run_attention`'s."""


@dataclass(frozen=True, kw_only=True)
class SweepOptions(TrainingOptions):
    """`run_sweep`: the lrs every feature is trained with (None: the recipe's); `workers` (a local dask cluster
    of N processes) or `scheduler` (an existing dask scheduler's address) trains the features on dask workers
    (`probe.sweep_workers`), with the results of one process."""

    lrs: Sequence[float] | None = None
    workers: int | None = None
    scheduler: str | None = None


# How a transformer head knows where a token lies: "none" (the paper's head) or "learned" (an embedding per place).
POSITIONS: tuple[str, ...] = ("none", "learned")
COMPARE_SPLITS: tuple[str, ...] = ("val", "test")  # the splits a run saves per-image scores for
LOGISTIC_SOLVERS: tuple[str, ...] = ("torch", "sklearn")
REFIT_CHOICES: tuple[str, ...] = ("train+val", "train")


@dataclass(frozen=True, kw_only=True)
class LogisticOptions(DataOptions):
    """`run_logistic`: the solver ('torch': exact full-batch L-BFGS on `device`, default grid the L2 strengths
    1e-2..1e-5; 'sklearn': scikit-learn's lbfgs on the CPU, default grid DINOv2's 45 C values), the grid as L2
    strengths (`l2s`) or as C values (`cs`; C = 1 / (l2 * n_train)), lbfgs iterations (None: the solver's
    default, 300 for torch, 1000 for sklearn) and what the selected model is refit on ('train+val' or 'train')."""

    standardize: str = "dim"
    solver: str = "torch"
    l2s: Sequence[float] | None = None
    cs: Sequence[float] | None = None
    max_iter: int | None = None
    refit: str = "train+val"
    device: str = "cpu"


@dataclass(frozen=True, kw_only=True)
class KnnOptions(DataOptions):
    """`run_knn`: the k values swept, the vote temperature, bank rows per similarity chunk, the device."""

    standardize: str = "dim"
    ks: Sequence[int] = KNN_KS
    temperature: float = KNN_TEMPERATURE
    batch_size: int = 4096
    device: str = "cpu"
