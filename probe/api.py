"""One Python call per probe command: what `diffbank probe ...` runs, and what a researcher calls directly.

Every `run_*` function reads a store (a `FeatureStore` or its URL/path), writes `results.json` into `out_dir`
(exact configuration, recipe, store fingerprint, seeds, split definition, metrics, timings, library versions)
and returns the same dict. Trained heads are saved as safetensors in `out_dir`; training checkpoints live in
`out_dir/checkpoint/`, and a rerun with the same `out_dir` resumes after the last completed epoch.

| function | what |
|---|---|
| `run_linear` | the paper's linear head (SGD, StepLR) on one feature |
| `run_attention` | the attention-pool head on one block map (one lr, or several `lrs` selected on validation) |
| `run_fusion` | DifFormer: blocks x timesteps through one shared transformer (one lr or several `lrs`) |
| `run_logistic` | scikit-learn logistic regression, C swept on validation |
| `run_knn` | cosine kNN, temperature-weighted votes, k swept on validation |
| `run_sweep` | linear heads for every (t, block, pooling) x lr in one pass; heat map over t x block |

Selection is always on the validation split; the test split is only reported.

The trained commands (linear, attention, fusion, sweep) take `recipe="diffbank"` (default) or `"paper"`
(`probe.recipe`); `lr`/`lrs`, `epochs`, `batch_size`, `momentum`, `weight_decay`, `step_size`, `gamma` and
`standardize` left at None take the recipe's value, given ones override it. The full recipe and the names of
the overridden settings are recorded in `results.json` (`recipe`). Bad values raise `ProbeConfigError` (a
`ValueError` naming the parameter) before any data is read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from probe.baselines import DINOV2_C_GRID, KNN_KS, KNN_TEMPERATURE, flatten_features, knn_sweep, logistic_sweep
from probe.features import default_features, fusion_inputs
from probe.heads import AttentionPoolHead, DifFormerHead, LinearHead, seeded_init
from probe.metrics import select_best, selection_rank
from probe.recipe import RECIPES, ProbeConfigError
from probe.report import plot_accuracy_vs_t, plot_heatmap
from probe.runs import Run, RunConflictError, evaluate_head, head_record, save_heads, single_feature, train_heads
from probe.trained import TrainedRun, finish_single

__all__ = [
    "run_linear",
    "run_attention",
    "run_fusion",
    "run_logistic",
    "run_knn",
    "run_sweep",
    "default_features",
    "RunConflictError",
    "ProbeConfigError",
    "SWEEP_LRS",
]

SWEEP_LRS: tuple[float, ...] = tuple(RECIPES["diffbank"]["sweep"]["lrs"])


def run_linear(store: Any, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """The paper's linear probe on one feature (default t090_b24_avg2); weights -> out_dir/head.safetensors.

    Options (keyword; declared once, in `probe.trained.TrainedRun`): `features`, `recipe`, `lr`, `epochs`, `batch_size`,
    `momentum`, `weight_decay`, `step_size`, `gamma`, `standardize`, `batchnorm` (parameter-free BatchNorm
    before the linear layer), `seed`, `subset`, `val_fraction`, `memory_budget`, `device`, `progress`, `resume`,
    `draws` and `eval_draws` (noise draws of a store that keeps them apart: `probe.data`; recorded in results.json
    under "noise_draws").
    """
    job = TrainedRun("linear", store, out_dir, **options)
    run = job.run
    name = single_feature(run)
    with seeded_init(job.seed):
        head = LinearHead(run.data.feature_shapes[name], run.data.num_classes, batchnorm=job.batchnorm)
    return finish_single(run, head, name, job.recipe.lr, job.device, job.progress)


def run_attention(store: Any, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """The attention-pool head on one block map (default t090_b24_tok16).

    Options as in `run_linear`, with `preset` (tiny|small|paper; default small) and `lr` or `lrs` instead of
    `batchnorm`. `lrs` (instead of `lr`) trains
    one head per lr in one pass, all from the same initial weights, and reports the head whose lr is best on
    validation (see `results["lr_sweep"]`).
    """
    job = TrainedRun("attention", store, out_dir, **options)
    name = single_feature(job.run)
    shape, classes = job.run.data.feature_shapes[name], job.run.data.num_classes
    return job.finish(lambda: AttentionPoolHead(shape, classes, **job.sizes), name)


def run_fusion(store: Any, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """DifFormer over a complete timestep x block grid (default blocks {19, 24, 30} x t {90, 150, 300}).

    Options as in `run_attention`.
    """
    job = TrainedRun("fusion", store, out_dir, **options)
    keyed, ts, shapes = fusion_inputs(job.run.store, job.run.features)
    job.run.config["grid"] = {"timesteps": ts, "blocks": list(shapes)}
    classes = job.run.data.num_classes
    return job.finish(lambda: DifFormerHead(shapes, ts, classes, **job.sizes), keyed)


# Options that only some trained commands take (None in the signature: not given).
def run_logistic(
    store: Any,
    out_dir: str | Path,
    *,
    features: Sequence[str] | str | None = None,
    cs: Sequence[float] | None = None,
    max_iter: int = 1000,
    refit: str = "train+val",
    seed: int = 0,
    subset: str | None = None,
    val_fraction: float = 0.1,
    standardize: str = "dim",
    memory_budget: int | str | None = None,
) -> dict[str, Any]:
    """Logistic regression (lbfgs) over a C grid (default DINOv2's 45 values), features concatenated."""
    grid = sorted(float(c) for c in (cs if cs is not None else DINOV2_C_GRID))
    run = Run(
        "logistic",
        store,
        out_dir,
        features,
        {"cs": grid, "max_iter": max_iter, "refit": refit},
        seed=seed,
        subset=subset,
        val_fraction=val_fraction,
        standardize=standardize,
        memory_budget=memory_budget,
        guard=False,
    )
    t0 = time.perf_counter()
    x = {s: flatten_features(run.data.arrays(s), run.features) for s in ("train", "val", "test")}
    run.timings["data_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = logistic_sweep(
        x["train"],
        run.data.labels("train"),
        x["val"],
        run.data.labels("val"),
        x["test"],
        run.data.labels("test"),
        num_classes=run.data.num_classes,
        cs=grid,
        max_iter=max_iter,
        refit=refit,
        class_names=run.data.class_names,
    )
    run.timings["train_s"] = time.perf_counter() - t0
    return run.finish(out)


def run_knn(
    store: Any,
    out_dir: str | Path,
    *,
    features: Sequence[str] | str | None = None,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    batch_size: int = 4096,
    seed: int = 0,
    subset: str | None = None,
    val_fraction: float = 0.1,
    standardize: str = "dim",
    memory_budget: int | str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Weighted cosine kNN (k swept on validation); the train bank is streamed, so it may exceed memory."""
    run = Run(
        "knn",
        store,
        out_dir,
        features,
        {"ks": sorted({int(k) for k in ks}), "temperature": temperature, "batch_size": batch_size, "device": device},
        seed=seed,
        subset=subset,
        val_fraction=val_fraction,
        standardize=standardize,
        memory_budget=memory_budget,
        guard=False,
    )
    t0 = time.perf_counter()
    queries = {s: torch.from_numpy(flatten_features(run.data.arrays(s), run.features)) for s in ("val", "test")}
    run.timings["data_s"] += time.perf_counter() - t0

    def bank() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xs, y in run.stream("train", batch_size, False):
            yield flatten_features(xs, run.features), y

    t0 = time.perf_counter()
    out = knn_sweep(
        bank(),
        len(run.data.rows("train")),
        queries["val"],
        run.data.labels("val"),
        queries["test"],
        run.data.labels("test"),
        num_classes=run.data.num_classes,
        ks=ks,
        temperature=temperature,
        device=device,
        class_names=run.data.class_names,
    )
    run.timings["train_s"] = time.perf_counter() - t0
    return run.finish(out)


def run_sweep(store: Any, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Linear heads for every feature x lr in one pass over the data; selection on validation.

    Options as in `run_linear`, with `lrs` (default: the recipe's; diffbank 1e-3, 1e-2, 1e-1; paper 1e-2)
    instead of `lr` and `batchnorm`. Writes heatmap.png (test top-1 of the validation-selected (pooling, lr)
    per (t, block) cell, the validation-selected cell outlined) and accuracy_vs_t.png, and all heads to
    heads.safetensors.
    """
    job = TrainedRun("sweep", store, out_dir, **options)
    run, rec, seed, device, progress = job.run, job.recipe, job.seed, job.device, job.progress
    heads: dict[str, torch.nn.Module] = {}
    inputs: dict[str, str] = {}
    lr_of: dict[str, float] = {}
    for name in run.features:
        for lr in rec.learning_rates:
            key = f"{name}@lr={lr:g}"
            with seeded_init(seed):  # same start for every lr: the sweep's head equals `run_linear`'s
                heads[key] = LinearHead(run.data.feature_shapes[name], run.data.num_classes)
            inputs[key], lr_of[key] = name, lr
    result = train_heads(run, heads, inputs, lr_of, device=device, progress=progress)
    assert result.best is not None  # a validation split always exists
    best_key = str(result.best)
    metrics = evaluate_head(run, heads[best_key], inputs[best_key], device)
    table = _sweep_table(run, result)
    cells = _best_per_cell(table, result)
    figures = _sweep_figures(run, cells, table, best_key)
    save_heads(run.out / "heads.safetensors", heads, {"command": "sweep", "heads": list(heads)})
    return run.finish(
        {
            "metrics": metrics,
            "selected": {
                "head": best_key,
                "feature": inputs[best_key],
                "lr": lr_of[best_key],
                "epoch": result.heads[best_key].best_epoch,
                "val_accuracy": result.heads[best_key].val_accuracy,
            },
            "sweep": table,
            "grid": [{"t": t, "block": b, **row} for (t, b), row in sorted(cells.items())],
            "figures": figures,
            "weights": "heads.safetensors",
            "training": {k: head_record(r) for k, r in result.heads.items()},
        }
    )


def _sweep_table(run: Run, result: Any) -> list[dict[str, Any]]:
    rows = []
    for key, r in result.heads.items():
        info = run.store.feature_info(r.input)
        rows.append(
            {
                "head": key,
                "feature": r.input,
                "t": info.t,
                "block": info.block,
                "pool": None if info.pool_kind is None else f"{info.pool_kind}{info.pool_size}",
                "lr": r.lr,
                "best_epoch": r.best_epoch,
                "val_top1": r.val_accuracy,
                "test_top1": r.test_accuracy,
                "diverged": r.diverged,
                "selected_for_feature": result.best_per_input.get(r.input) == key,
            }
        )
    return rows


def _best_per_cell(table: Sequence[Mapping[str, Any]], result: Any) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (t, block): the head the selection rule picks among that cell's poolings and lrs.

    The same rule (`probe.metrics.select_best`) picks the sweep's overall head, so the selected head's cell
    always shows that head.
    """
    by_cell: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for row in table:
        if row["t"] is not None and row["block"] is not None and row["val_top1"] is not None:
            by_cell.setdefault((row["t"], row["block"]), []).append(row)

    def rank(row: Mapping[str, Any]) -> tuple[float, float]:
        return selection_rank(row["val_top1"], result.heads[row["head"]].val_loss)

    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for key, rows in by_cell.items():
        row = select_best(rows, rank)
        assert row is not None
        cells[key] = {
            "feature": row["feature"],
            "pool": row["pool"],
            "lr": row["lr"],
            "val_top1": row["val_top1"],
            "test_top1": row["test_top1"],
        }
    return cells


def _sweep_figures(
    run: Run, cells: Mapping[tuple[int, int], Mapping[str, Any]], table: Sequence[Mapping[str, Any]], best_key: str
) -> dict[str, str]:
    if not cells:
        return {}
    best_row = next(r for r in table if r["head"] == best_key)
    best_cell = (best_row["t"], best_row["block"]) if best_row["t"] is not None else None
    test = {k: c["test_top1"] for k, c in cells.items()}
    plot_heatmap(
        test,
        run.out / "heatmap.png",
        labels={k: c["pool"] for k, c in cells.items()},
        best=best_cell,
        title="test top-1 (pooling and lr selected on val)",
    )
    plot_accuracy_vs_t(
        test, run.out / "accuracy_vs_t.png", best=best_cell, title="test top-1 over timestep (selected on val)"
    )
    return {"heatmap": "heatmap.png", "accuracy_vs_t": "accuracy_vs_t.png"}
