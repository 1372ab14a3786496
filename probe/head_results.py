"""What training reports per head, and which heads validation selects (`probe.metrics.select_best`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import Any

from probe.evaluation import InputSpec, input_label
from probe.metrics import select_best, selection_rank

__all__ = ["EPOCHS_COUNTED_FROM", "HeadResult", "SweepResult", "select_heads", "shown_epoch"]

# Epochs as logs, tables, results.json and estimators show them: the first epoch is epoch 1. Training loops and
# checkpoints count from 0 internally; `shown_epoch` is the one place that converts.
EPOCHS_COUNTED_FROM = 1


def shown_epoch(index: int | None) -> int | None:
    """The number a reader sees for the 0-based training-loop epoch `index` (None stays None)."""
    return None if index is None else int(index) + EPOCHS_COUNTED_FROM


@dataclasses.dataclass
class HeadResult:
    """The outcome for one head. Epochs are counted from 1 (`shown_epoch`), in `best_epoch` (the epoch whose
    weights the head holds) and in each history row's "epoch"."""

    key: Hashable
    input: InputSpec
    lr: float
    epochs_trained: int
    best_epoch: int | None
    val_accuracy: float | None
    val_loss: float | None
    test_accuracy: float | None
    test_loss: float | None
    diverged: bool
    history: list[dict[str, float | None]]


@dataclasses.dataclass
class SweepResult:
    """Results of `train_many`: per head, plus the selection on validation (`probe.metrics.select_best`).

    `best_per_input` maps each input (the feature name, or for dict inputs the sorted feature names joined by
    "+") to the key of its best head (e.g. the best lr per feature); `best` is the best head overall. Both are
    empty/None without a validation stream: selecting on test data would bias the reported test accuracy.
    """

    heads: dict[Hashable, HeadResult]
    best_per_input: dict[str, Hashable]
    best: Hashable | None
    wall_time_s: float

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per head (for tables and JSON)."""
        return [
            {
                "key": r.key if isinstance(r.key, (str, int, float)) else repr(r.key),
                "input": input_label(r.input),
                "lr": r.lr,
                "best_epoch": r.best_epoch,
                "val_accuracy": r.val_accuracy,
                "test_accuracy": r.test_accuracy,
                "diverged": r.diverged,
                "selected_for_input": self.best_per_input.get(input_label(r.input)) == r.key,
            }
            for r in self.heads.values()
        ]


def select_heads(results: Mapping[Hashable, HeadResult], *, selected: bool, wall_time_s: float) -> SweepResult:
    """The `SweepResult` of `results` (in the caller's order, which decides ties); with `selected`, the best head
    per input and overall on validation."""
    best_per_input: dict[str, Hashable] = {}
    best: Hashable | None = None
    if selected:

        def rank(k: Hashable) -> tuple[float, float]:
            return selection_rank(results[k].val_accuracy, results[k].val_loss)

        by_input: dict[str, list[Hashable]] = {}
        for key, r in results.items():
            by_input.setdefault(input_label(r.input), []).append(key)
        best_per_input = {label: select_best(keys, rank) for label, keys in by_input.items()}
        best = select_best(list(results), rank)
    return SweepResult(dict(results), best_per_input, best, wall_time_s)
