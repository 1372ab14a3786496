"""Training-free and convex baselines on cached features: logistic regression with a C sweep, cosine kNN.

Both follow DINOv2's evaluation protocol, with the one change the paper's setting asks for: the
hyperparameter (C, k) is selected on a validation split and the test split is only used for the report.

- `logistic_sweep`: scikit-learn `LogisticRegression` (lbfgs, multinomial, L2) over a log-spaced C grid
  (DINOv2: 45 values, 10^-6 .. 10^5), warm-started from the previous C so the sweep costs little more than
  the hardest fit; the best C on validation is refit on train+val (DINOv2's choice) and reported on test.
- `knn_sweep`: cosine similarity on L2-normalised features, the k nearest train samples vote with weights
  exp(sim / T), T = 0.07 (Wu et al. 2018, InstDisc; DINOv2). The train bank is streamed chunk by chunk and
  queries are processed in chunks, keeping only a running top-k: the memory is O(queries x k), never N x N.
  All k values come from one pass (the top-k list is sorted, so every smaller k is a prefix).

Inputs are 2-D float arrays (N, D) (flatten and concatenate features first: `flatten_features`). Both return
(record, {"val": scores, "test": scores}): the JSON-able record and the selected model's per-image class
scores, which a run saves to logits.npz.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from probe.errors import ProbeDataError
from probe.metrics import classification_metrics
from probe.options import KNN_KS, KNN_TEMPERATURE, REFIT_CHOICES

DINOV2_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))


def flatten_features(xs: Mapping[str, np.ndarray | torch.Tensor], order: Sequence[str] | None = None):
    """(N, D) from a dict of (N, ...) arrays or tensors: each flattened channel-major, concatenated in `order`."""
    names = list(order) if order is not None else list(xs)
    parts = [xs[n].reshape(len(xs[n]), -1) for n in names]
    if isinstance(parts[0], torch.Tensor):  # then all are: one store's features come as one kind
        return parts[0] if len(parts) == 1 else torch.cat(cast(list[torch.Tensor], parts), dim=1)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def c_grid(n: int = 45, low: float = -6.0, high: float = 5.0) -> tuple[float, ...]:
    """`n` values of C log-spaced over [10^low, 10^high] (n=45 with the defaults is DINOv2's grid)."""
    return tuple(float(c) for c in np.logspace(low, high, n))


# --------------------------------------------------------------------------------------------- logistic


def _fit_logistic(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, bool, float]:
    from sklearn.exceptions import ConvergenceWarning  # loaded with LogisticRegression (see logistic_sweep)

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged, time.perf_counter() - start


def logistic_sweep(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    cs: Sequence[float] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    refit: str = "train+val",
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sweep C on validation, refit the best, report on test. Returns (record, {split: class scores}).

    `refit="train+val"` refits the selected C on train and validation together (DINOv2); `"train"` keeps the
    model that was selected. Candidates run in ascending C with warm starts (deterministic: lbfgs has no
    randomness). Ties on validation go to the smaller C, the more regularised model.
    """
    # sklearn.linear_model (with scipy) is loaded when a logistic probe runs, not by every probe: its import
    # measured 6.4 s cold on 2 busy cores.
    from sklearn.linear_model import LogisticRegression

    if refit not in REFIT_CHOICES:
        raise ValueError(f"refit must be one of {', '.join(REFIT_CHOICES)}, got {refit!r}")
    cs = sorted(float(c) for c in (cs if cs is not None else DINOV2_C_GRID))
    if not cs or cs[0] <= 0:
        raise ValueError("the C grid must be non-empty and positive")
    x_train, x_val, x_test = (np.asarray(a, dtype=np.float32) for a in (x_train, x_val, x_test))
    model = LogisticRegression(C=cs[0], solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=True)
    sweep: list[dict[str, Any]] = []
    best, best_state = None, None
    for c in cs:
        model.set_params(C=c)
        model, converged, seconds = _fit_logistic(model, x_train, y_train)
        val_top1 = float(np.mean(model.predict(x_val) == y_val))
        sweep.append(
            {
                "C": c,
                "val_top1": val_top1,
                "n_iter": int(np.max(model.n_iter_)),
                "converged": converged,
                "seconds": round(seconds, 4),
            }
        )
        if best is None or val_top1 > best["val_top1"]:
            best = sweep[-1]
            best_state = (model.coef_.copy(), model.intercept_.copy(), model.classes_.copy())
    assert best is not None and best_state is not None
    selected = LogisticRegression(C=best["C"], solver="lbfgs", max_iter=max_iter, tol=tol)
    selected.coef_, selected.intercept_, selected.classes_ = best_state
    scores = {"val": _logistic_scores(selected, x_val, num_classes)}
    refit_seconds = 0.0
    if refit == "train+val":
        # Warm start from the selected solution: the same optimum, found in fewer iterations.
        final = LogisticRegression(C=best["C"], solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=True)
        final.coef_, final.intercept_, final.classes_ = (a.copy() for a in best_state)
        final, converged, refit_seconds = _fit_logistic(
            final, np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
        )
    else:
        final, converged = selected, best["converged"]
    scores["test"] = _logistic_scores(final, x_test, num_classes)
    metrics = {
        split: classification_metrics(y, scores[split], num_classes=num_classes, class_names=class_names)
        for split, y in (("val", y_val), ("test", y_test))
    }
    record = {
        "method": "logistic",
        "solver": "lbfgs",
        "max_iter": max_iter,
        "tol": tol,
        "grid": cs,
        "sweep": sweep,
        "selected": {"C": best["C"], "val_top1": best["val_top1"]},
        "refit_on": refit,
        "refit_converged": converged,
        "refit_seconds": round(refit_seconds, 4),
        "metrics": metrics,
    }
    return record, scores


def _logistic_scores(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    # Classes absent from train have no column: scatter the scores into the full class range.
    raw = model.decision_function(x)
    if raw.ndim == 1:  # binary problems give one margin
        raw = np.stack([-raw, raw], axis=1)
    scores = np.full((len(x), num_classes), -np.inf, dtype=np.float64)
    scores[:, np.asarray(model.classes_, dtype=np.int64)] = raw
    return scores


# -------------------------------------------------------------------------------------------------- kNN


def knn_neighbours(
    bank: Iterable[tuple[torch.Tensor, torch.Tensor]],
    queries: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    normalize: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most cosine-similar bank rows of every query, in one streamed pass over the bank.

    `bank` yields (x: (B, D), y: (B,)) chunks (e.g. a `ProbeData` train stream, unshuffled). Returns
    (similarities, labels, bank indices), each (Q, k), sorted by decreasing similarity. Memory: the queries,
    one bank chunk, one (query_chunk x B) similarity block and the running (Q x k) lists.
    """
    device = torch.device(device)
    q = queries.to(device=device, dtype=torch.float32)
    if normalize:
        q = F.normalize(q, dim=1)
    n_q = q.shape[0]
    best_sim = torch.full((n_q, k), -torch.inf, device=device)
    best_idx = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    best_lab = torch.full((n_q, k), -1, dtype=torch.int64, device=device)
    offset = 0
    for xb, yb in bank:
        xb = xb.reshape(len(xb), -1).to(device=device, dtype=torch.float32)
        if normalize:
            xb = F.normalize(xb, dim=1)
        yb = yb.to(device=device, dtype=torch.int64)
        kk = min(k, len(xb))
        for s in range(0, n_q, query_chunk):
            e = min(s + query_chunk, n_q)
            sim = q[s:e] @ xb.T
            top_sim, top_pos = sim.topk(kk, dim=1)
            # Merge the chunk's top-k into the running top-k: the k best of the union of both lists are
            # the k best of everything seen so far.
            cand_sim = torch.cat([best_sim[s:e], top_sim], dim=1)
            cand_idx = torch.cat([best_idx[s:e], top_pos + offset], dim=1)
            cand_lab = torch.cat([best_lab[s:e], yb[top_pos]], dim=1)
            merged_sim, pos = cand_sim.topk(k, dim=1)
            best_sim[s:e] = merged_sim
            best_idx[s:e] = cand_idx.gather(1, pos)
            best_lab[s:e] = cand_lab.gather(1, pos)
        offset += len(xb)
    if offset < k:
        raise ProbeDataError(
            f"kNN with k={k} needs at least {k} train samples but the bank has {offset}; "
            f"use a smaller k or a larger train split"
        )
    return best_sim, best_lab, best_idx


def knn_vote(
    similarities: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int, temperature: float = KNN_TEMPERATURE
) -> torch.Tensor:
    """Class scores (Q, classes) from the first k neighbours: sum of exp(sim / T) per class."""
    weights = (similarities[:, :k] / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, labels[:, :k], weights)


def knn_sweep(
    bank: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_bank: int,
    x_val: torch.Tensor,
    y_val: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    query_chunk: int = 1024,
    device: str | torch.device = "cpu",
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Weighted cosine kNN for every k in `ks` in one pass over the bank; k selected on validation.

    Validation and test queries share the pass (they are concatenated), so the bank is read once.
    Ties on validation go to the smaller k.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_min_samples(n_bank, ks[-1], f"kNN with k={ks[-1]} (train split)")
    start = time.perf_counter()
    queries = torch.cat(
        [torch.as_tensor(x_val).reshape(len(x_val), -1), torch.as_tensor(x_test).reshape(len(x_test), -1)]
    )
    sims, labs, _ = knn_neighbours(bank, queries, ks[-1], query_chunk=query_chunk, device=device)
    n_val = len(x_val)
    per_k: list[dict[str, Any]] = []
    scores_by_k = {}
    for k in ks:
        scores = knn_vote(sims, labs, k, num_classes, temperature).cpu().numpy()
        scores_by_k[k] = scores
        per_k.append(
            {
                "k": k,
                "val_top1": float(np.mean(scores[:n_val].argmax(1) == y_val)),
                "test_top1": float(np.mean(scores[n_val:].argmax(1) == y_test)),
            }
        )
    best = max(per_k, key=lambda r: (r["val_top1"], -r["k"]))
    scores = scores_by_k[best["k"]]
    record = {
        "method": "knn",
        "similarity": "cosine",
        "temperature": temperature,
        "ks": ks,
        "sweep": per_k,
        "selected": {"k": best["k"], "val_top1": best["val_top1"]},
        "seconds": round(time.perf_counter() - start, 4),
        "metrics": {
            "val": classification_metrics(y_val, scores[:n_val], num_classes=num_classes, class_names=class_names),
            "test": classification_metrics(y_test, scores[n_val:], num_classes=num_classes, class_names=class_names),
        },
    }
    return record, {"val": scores[:n_val], "test": scores[n_val:]}


def check_min_samples(n_available: int, k: int, what: str) -> None:
    """Raise when a method needs k samples but only n are there (e.g. kNN's k against the train split)."""
    if n_available < k:
        raise ProbeDataError(
            f"{what} needs at least {k} samples but only {n_available} are available; use a smaller k or a larger split"
        )
