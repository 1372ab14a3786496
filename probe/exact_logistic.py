"""Multinomial logistic regression solved exactly (full-batch L-BFGS), in torch, on any device.

The linear probe without a learning rate to tune: for each L2 strength the solution is the unique
optimum of a convex problem, so a sweep over features x L2 is a sweep over models, not over
optimiser luck. On a GPU a fit of 54k x 4096 features takes a fraction of a second, so whole feature
grids can be probed exactly. The objective is scikit-learn's `LogisticRegression(C)` with
C = 1 / (l2 * n): mean cross-entropy + l2/2 * ||W||^2, intercept unpenalised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class LogisticFit:
    l2: float
    weight: torch.Tensor  # (d, K)
    bias: torch.Tensor  # (K,)
    loss: float
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 300,
    tol: float = 1e-5,
    init: LogisticFit | None = None,
) -> LogisticFit:
    """Minimise mean CE + l2/2 ||W||^2 over (W, b). `x` float (n, d), `y` int64 (n,), same device."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    d = x.shape[1]
    # The weight is optimised as (K, d) and applied with F.linear: its gradient is then grad.T @ x, which
    # BLAS runs ~15x faster than the x.T @ grad that a (d, K) weight's `x @ w` asks for (54k x 4096 on
    # one CPU thread: 0.15 s vs 2.3 s per evaluation, measured).
    wt = (
        init.weight.T.clone(memory_format=torch.contiguous_format)
        if init is not None
        else torch.zeros(num_classes, d, device=x.device, dtype=x.dtype)
    ).requires_grad_()
    b = (
        init.bias.clone() if init is not None else torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    ).requires_grad_()
    opt = torch.optim.LBFGS(
        [wt, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return F.cross_entropy(F.linear(x, wt, b), y) + 0.5 * l2 * (wt * wt).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(objective())
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LogisticFit(l2, wt.detach().T.contiguous(), b.detach(), loss, iterations)


def logistic_path(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    l2_grid: Sequence[float],
    **kw,
) -> list[tuple[LogisticFit, float]]:
    """Fits along `l2_grid` (strongest first, each warm-started from the previous), with val accuracy."""
    out = []
    fit = None
    for l2 in sorted(l2_grid, reverse=True):
        fit = fit_logistic(x_train, y_train, num_classes, l2, init=fit, **kw)
        with torch.no_grad():
            acc = float((fit.logits(x_val).argmax(1) == y_val).float().mean())
        out.append((fit, acc))
    return out
