"""How a probe is scored and how one candidate is chosen over another.

- `classification_metrics`: top-1, top-5, per-class accuracy, mean per-class accuracy and the confusion
  matrix of one evaluation, computed by `sklearn.metrics`.
- `selection_rank` / `select_best`: THE selection rule, used for a head's epochs, a sweep's heads, the best
  head per feature and the heat map's selected cell alike: the highest validation top-1, then the lowest
  validation loss, then the earliest candidate (the caller's order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from probe.logits import ScoreFile

__all__ = ["classification_metrics", "selection_rank", "select_best"]

T = TypeVar("T")


def selection_rank(val_accuracy: float | None, val_loss: float | None = None) -> tuple[float, float]:
    """Larger is better. A missing accuracy ranks below every measured one, a missing loss below every loss."""
    return (
        val_accuracy if val_accuracy is not None else -1.0,
        -(val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf),
    )


def select_best(candidates: Iterable[T], rank: Callable[[T], tuple[float, float]]) -> T | None:
    """The candidate with the largest `rank`; the first one wins ties. None for no candidates."""
    best: T | None = None
    best_rank: tuple[float, float] | None = None
    for c in candidates:
        r = rank(c)
        if best_rank is None or r > best_rank:
            best, best_rank = c, r
    return best


def classification_metrics(
    y_true: np.ndarray | Sequence[int],
    scores: np.ndarray | ScoreFile | None = None,
    *,
    y_pred: np.ndarray | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of one evaluation from class scores (N, K) (logits, probabilities, votes; an array or a
    `ScoreFile`, read a block of rows at a time) or predictions.

    `top5` needs scores; with fewer than 5 classes it is top-K (then always 1.0) and says so in `top5_k`.
    Per-class accuracy is recall per class; a class without samples gets `None` (JSON null), not 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if scores is not None:
        if not isinstance(scores, ScoreFile):
            scores = np.asarray(scores)
        if len(scores.shape) != 2 or scores.shape[0] != len(y_true):
            raise ValueError(f"scores must be (N, classes) with N={len(y_true)}, got {scores.shape}")
        num_classes = num_classes or scores.shape[1]
        # ties go to the lowest class index
        y_pred = np.concatenate([np.argmax(b, axis=1) for _, b in _row_blocks(scores)] or [np.empty(0, np.int64)])
    elif y_pred is None:
        raise ValueError("give scores or y_pred")
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    # sklearn.metrics (with scipy) is loaded when a run is scored, not when a probe starts or a head trains
    # (the trainer imports the selection rule here): its import measured 3.6 s on 2 busy cores, ~1 s idle.
    from sklearn.metrics import confusion_matrix, recall_score

    labels = np.arange(num_classes)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    per_class = [float(r) if s else None for r, s in zip(recall, support)]
    present = [a for a in per_class if a is not None]
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "top1": float(np.mean(y_pred == y_true)),
        "top5": None,
        "top5_k": None,
        "mean_per_class_accuracy": float(np.mean(present)) if present else None,
        "per_class_accuracy": per_class,
        "support": support.tolist(),
        "confusion_matrix": cm.tolist(),
    }
    if scores is not None:
        k = min(5, scores.shape[1])
        out["top5"] = _top_k(y_true, scores, k)
        out["top5_k"] = k
    if class_names is not None:
        out["class_names"] = [str(c) for c in class_names]
    return out


TOP_K_BLOCK_VALUES = 1 << 23  # scores ranked at once by _top_k (64 MiB of int64 ranks)


def _row_blocks(scores: np.ndarray | ScoreFile) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block) over `scores`, `TOP_K_BLOCK_VALUES` values a block for arrays."""
    if isinstance(scores, ScoreFile):
        lo = 0
        for block in scores.blocks():
            yield lo, block
            lo += len(block)
        return
    step = max(1, TOP_K_BLOCK_VALUES // max(1, scores.shape[1]))
    for lo in range(0, len(scores), step):
        yield lo, scores[lo : lo + step]


def _top_k(y_true: np.ndarray, scores: np.ndarray | ScoreFile, k: int) -> float:
    if k >= scores.shape[1]:
        return 1.0  # every class is among the top k
    from sklearn.metrics import top_k_accuracy_score  # loaded by classification_metrics already

    # sklearn argsorts the scores into int64: 1 GB for 128,000 rows x 1,000 classes. Hits are per row, so
    # counting them a block of rows at a time gives the same figure in bounded memory.
    labels = np.arange(scores.shape[1])
    hits = 0.0
    for lo, block in _row_blocks(scores):
        # Logistic scores hold -inf for classes absent from train; sklearn wants finite scores, and any finite
        # value below a row's smallest real score ranks those classes last, as -inf does.
        finite = np.isfinite(block)
        if not finite.all():
            floor = float(block[finite].min()) - 1.0 if finite.any() else 0.0
            block = np.where(finite, block, floor)
        y = y_true[lo : lo + len(block)]
        hits += float(top_k_accuracy_score(y, block, k=k, labels=labels, normalize=False))
    return hits / len(y_true)
