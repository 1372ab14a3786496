"""One Python call per probe command: what `diffbank probe ...` runs, and what a researcher calls directly.

Every `run_*` function reads a store (a `FeatureStore` or its URL/path) with the command's options (one frozen
dataclass per command, `probe.options`: a misspelt option is a `TypeError`), writes `results.json` into `out_dir`
(exact configuration, recipe, store fingerprint, seeds, split definition, metrics, timings, library versions)
and returns the same dict. Trained heads are saved as safetensors in `out_dir`; training checkpoints live in
`out_dir/checkpoint/`, and a rerun with the same `out_dir` resumes after the last completed epoch.

| function | what |
|---|---|
| `run_linear` | the paper's linear head (SGD, StepLR) on one feature |
| `run_attention` | the attention-pool head on one block map (one lr, or several `lrs` selected on validation) |
| `run_fusion` | DifFormer: blocks x timesteps through one shared transformer (one lr or several `lrs`) |
| `run_logistic` | exact multinomial logistic regression (torch L-BFGS; or scikit-learn), L2 selected on validation |
| `run_knn` | cosine kNN, temperature-weighted votes, k swept on validation |
| `run_sweep` | linear heads for every (t, block, pooling) x lr in one pass; heat map over t x block |

Selection is always on the validation split; the test split is only reported.

The trained commands (linear, attention, fusion, sweep) take `recipe="diffbank"` (default) or `"paper"`
(`probe.recipe`); `lr`/`lrs`, `epochs`, `batch_size`, `momentum`, `weight_decay`, `step_size`, `gamma` and
`standardize` left at None take the recipe's value, given ones override it. The steps they share are
`probe.fitting` (train, evaluate, save a head) and `probe.job` (store, data, out_dir, results.json). The full recipe and the names of
the overridden settings are recorded in `results.json` (`recipe`). Bad values raise `ProbeConfigError` (a
`ValueError` naming the parameter) before any data is read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from extract.dask_client import StartingClient, require_distributed
from probe.baselines import DINOV2_C_GRID, flatten_features, knn_sweep, logistic_sweep
from probe.exact_logistic import L2_GRID, MAX_ITER, exact_logistic_sweep
from probe.fitting import (
    TrainedRun,
    evaluate_head,
    finish_single,
    head_record,
    report_logits,
    save_heads,
    single_feature,
    train_heads,
)
from probe.head_results import SweepResult
from probe.heads import AttentionPoolHead, DifFormerHead, LinearHead, seeded_init
from probe.inputs import StoreLike, fusion_inputs
from probe.job import Job
from probe.metrics import select_best, selection_rank
from probe.options import (
    LOGISTIC_SOLVERS,
    REFIT_CHOICES,
    AttentionOptions,
    FusionOptions,
    KnnOptions,
    LinearOptions,
    LogisticOptions,
    SweepOptions,
)
from probe.phase_clock import PhaseClock
from probe.recipe import ProbeConfigError
from probe.report import plot_accuracy_vs_t, plot_heatmap
from probe.sweep_cluster import sweep_cluster
from probe.sweep_workers import sweep_heads, train_on_workers

__all__ = ["run_linear", "run_attention", "run_fusion", "run_logistic", "run_knn", "run_sweep"]


def run_linear(store: StoreLike, out_dir: str | Path, options: LinearOptions | None = None) -> dict[str, Any]:
    """The paper's linear probe on one feature (default t090_b24_avg2); weights -> out_dir/head.safetensors.

    Options: `probe.options.LinearOptions` (the noise draws of a store that keeps them apart are recorded in
    results.json under "noise_draws").
    """
    options = options or LinearOptions()
    trained = TrainedRun("linear", store, out_dir, options)
    job = trained.job
    name = single_feature(job)
    with seeded_init(options.seed):
        head = LinearHead(job.data.feature_shapes[name], job.data.num_classes, batchnorm=bool(options.batchnorm))
    return finish_single(job, head, name, trained.recipe.lr, options.device, options.progress)


def run_attention(store: StoreLike, out_dir: str | Path, options: AttentionOptions | None = None) -> dict[str, Any]:
    """The attention-pool head on one block map (default t090_b24_tok16).

    Options: `probe.options.AttentionOptions`. `lrs` (instead of `lr`) trains one head per lr in one pass, all
    from the same initial weights, and reports the head whose lr is best on validation (`results["lr_sweep"]`).
    """
    trained = TrainedRun("attention", store, out_dir, options or AttentionOptions())
    name = single_feature(trained.job)
    shape, classes = trained.job.data.feature_shapes[name], trained.job.data.num_classes
    return trained.finish(lambda: AttentionPoolHead(shape, classes, **trained.sizes, positions=trained.positions), name)


def run_fusion(store: StoreLike, out_dir: str | Path, options: FusionOptions | None = None) -> dict[str, Any]:
    """DifFormer over a complete timestep x block grid (default blocks {19, 24, 30} x t {90, 150, 300}).

    Options: `probe.options.FusionOptions` (as `run_attention`'s).
    """
    trained = TrainedRun("fusion", store, out_dir, options or FusionOptions())
    keyed, ts, shapes = fusion_inputs(trained.job.store, trained.job.features)
    trained.job.config["grid"] = {"timesteps": ts, "blocks": list(shapes)}
    classes = trained.job.data.num_classes
    return trained.finish(lambda: DifFormerHead(shapes, ts, classes, **trained.sizes, positions=trained.positions), keyed)


def run_logistic(store: StoreLike, out_dir: str | Path, options: LogisticOptions | None = None) -> dict[str, Any]:
    """Multinomial logistic regression, features concatenated: the L2 (or C) grid selected on validation, the
    selected model refit on train+val (`refit`), test scored once; the selected scores go to logits.npz.

    `solver="torch"` (default) is the exact full-batch L-BFGS probe (`probe.exact_logistic`, CPU or CUDA; each
    fit's iterations and final loss in results.json); `"sklearn"` is scikit-learn's lbfgs (`logistic_sweep`).
    """
    options = options or LogisticOptions()
    _check_logistic(options)
    sklearn = options.solver == "sklearn"
    max_iter = options.max_iter if options.max_iter is not None else (1000 if sklearn else MAX_ITER)
    grid = {"l2s": None if options.l2s is None else sorted(float(v) for v in options.l2s)}
    grid["cs"] = None if options.cs is None else sorted(float(c) for c in options.cs)
    if grid["l2s"] is None and grid["cs"] is None:
        grid["cs" if sklearn else "l2s"] = sorted(DINOV2_C_GRID if sklearn else L2_GRID)
    job = Job(
        "logistic",
        store,
        out_dir,
        options,
        {"solver": options.solver, **grid, "max_iter": max_iter, "refit": options.refit, "device": options.device},
        standardize=options.standardize,
        guard=False,
    )
    t0 = time.perf_counter()
    x = {s: flatten_features(job.data.arrays(s), job.features) for s in ("train", "val", "test")}
    y = {s: job.data.labels(s) for s in ("train", "val", "test")}
    job.timings["data_s"] += time.perf_counter() - t0
    n = len(y["train"])  # C = 1 / (l2 * n): the two solvers' grids are one grid
    data = (x["train"], y["train"], x["val"], y["val"], x["test"], y["test"])
    classes, names = job.data.num_classes, job.data.class_names
    t0 = time.perf_counter()
    if sklearn:
        cs = grid["cs"] if grid["cs"] is not None else [1.0 / (v * n) for v in grid["l2s"] or ()]
        out, scores = logistic_sweep(
            *data, num_classes=classes, cs=cs, max_iter=max_iter, refit=options.refit, class_names=names
        )
    else:
        l2s = grid["l2s"] if grid["l2s"] is not None else [1.0 / (c * n) for c in grid["cs"] or ()]
        out, scores = exact_logistic_sweep(
            *data,
            num_classes=classes,
            l2s=l2s,
            max_iter=max_iter,
            refit=options.refit,
            device=options.device,
            class_names=names,
        )
    job.timings["train_s"] = time.perf_counter() - t0
    job.save_logits(scores)
    return job.finish(out)


def _check_logistic(options: LogisticOptions) -> None:
    """Bad logistic options, named, before any data is read."""
    if options.solver not in LOGISTIC_SOLVERS:
        raise ProbeConfigError(f"solver must be one of {', '.join(LOGISTIC_SOLVERS)}, got {options.solver!r}")
    if options.cs is not None and options.l2s is not None:
        raise ProbeConfigError("give the grid as cs or as l2s, not both")
    for name in ("cs", "l2s"):
        values = getattr(options, name)
        if values is not None and (not list(values) or min(float(v) for v in values) <= 0):
            raise ProbeConfigError(f"{name} must be a non-empty list of positive values, got {list(values)}")
    if options.max_iter is not None and options.max_iter < 1:
        raise ProbeConfigError(f"max_iter must be >= 1, got {options.max_iter}")
    if options.refit not in REFIT_CHOICES:
        raise ProbeConfigError(f"refit must be one of {', '.join(REFIT_CHOICES)}, got {options.refit!r}")
    if options.solver == "sklearn" and options.device != "cpu":
        raise ProbeConfigError(f"device {options.device!r}: the sklearn solver runs on the CPU; use solver='torch'")


def run_knn(store: StoreLike, out_dir: str | Path, options: KnnOptions | None = None) -> dict[str, Any]:
    """Weighted cosine kNN (k swept on validation); the train bank is streamed, so it may exceed memory."""
    options = options or KnnOptions()
    ks, temperature, batch_size, device = options.ks, options.temperature, options.batch_size, options.device
    job = Job(
        "knn",
        store,
        out_dir,
        options,
        {"ks": sorted({int(k) for k in ks}), "temperature": temperature, "batch_size": batch_size, "device": device},
        standardize=options.standardize,
        guard=False,
    )
    t0 = time.perf_counter()
    queries = {s: torch.from_numpy(flatten_features(job.data.arrays(s), job.features)) for s in ("val", "test")}
    job.timings["data_s"] += time.perf_counter() - t0

    def bank() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xs, y in job.stream("train", batch_size, False):
            yield flatten_features(xs, job.features), y

    t0 = time.perf_counter()
    out, scores = knn_sweep(
        bank(),
        len(job.data.rows("train")),
        queries["val"],
        job.data.labels("val"),
        queries["test"],
        job.data.labels("test"),
        num_classes=job.data.num_classes,
        ks=ks,
        temperature=temperature,
        device=device,
        class_names=job.data.class_names,
    )
    job.timings["train_s"] = time.perf_counter() - t0
    job.save_logits(scores)
    return job.finish(out)


def run_sweep(
    store: StoreLike, out_dir: str | Path, options: SweepOptions | None = None, *, cluster: StartingClient | None = None
) -> dict[str, Any]:
    """Linear heads for every feature x lr in one pass over the data; selection on validation.

    Options: `probe.options.SweepOptions` (`lrs` default: the recipe's; diffbank 1e-3, 1e-2, 1e-1; paper 1e-2). Writes heatmap.png (test top-1 of the validation-selected (pooling, lr)
    per (t, block) cell, the validation-selected cell outlined) and accuracy_vs_t.png, and all heads to
    heads.safetensors. With `workers` or `scheduler` the features train on dask workers (`probe.sweep_workers`)
    and the client writes the same results (no checkpoint: an interrupted run starts again). `cluster` is that
    cluster already starting (`probe.sweep_cluster`, as the CLI starts it before importing the probes); without
    it the sweep starts its own as it begins, and closes it before it returns.
    """
    options = options or SweepOptions()
    distributed = _check_cluster(options)
    with ExitStack() as stack:
        if distributed and cluster is None:
            cluster = stack.enter_context(sweep_cluster(options.workers, options.scheduler))
        return _sweep(store, out_dir, options, cluster if distributed else None)


def _sweep(
    store: StoreLike, out_dir: str | Path, options: SweepOptions, cluster: StartingClient | None
) -> dict[str, Any]:
    # Wall and CPU seconds of each stage (CPU: this process's, so the imports before it and a worker's own
    # seconds are apart): a busy machine stretches wall time, not CPU time.
    phases: dict[str, Any] = {"before": {"cpu_s": round(time.process_time(), 4)}}
    clock = PhaseClock()
    trained = TrainedRun("sweep", store, out_dir, options, read_data=cluster is None)
    job, rec, seed, device, progress = trained.job, trained.recipe, trained.seed, trained.device, trained.progress
    heads, inputs, lr_of = sweep_heads(job.data, job.features, rec.learning_rates, seed)
    clock.lap("setup")
    extra: dict[str, Any] = {}
    if cluster is not None:
        t0 = time.perf_counter()
        result, logits, extra["cluster"] = train_on_workers(job, rec, options, heads, progress, cluster)
        job.timings["train_s"] = time.perf_counter() - t0
        clock.lap("train")
        metrics = report_logits(job, logits)
    else:
        result = train_heads(job, heads, inputs, lr_of, device=device, progress=progress)
        clock.lap("train")
    assert result.best is not None  # a validation split always exists
    best_key = str(result.best)
    if cluster is None:
        metrics = evaluate_head(job, heads[best_key], inputs[best_key], device)
    clock.lap("evaluate")
    table = _sweep_table(job, result)
    cells = _best_per_cell(table, result)
    figures = _sweep_figures(job, cells, table, best_key)
    save_heads(job.out / "heads.safetensors", heads, {"command": "sweep", "heads": list(heads)})
    clock.lap("report")
    return job.finish(
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
            "phases": {**phases, **clock.phases},
            **extra,
        }
    )


def _check_cluster(options: SweepOptions) -> bool:
    """Whether the sweep runs on dask workers; bad cluster options, named, before any data is read."""
    if options.workers is not None and options.scheduler is not None:
        raise ProbeConfigError("give workers or scheduler, not both")
    if options.workers is not None and (isinstance(options.workers, bool) or options.workers < 1):
        raise ProbeConfigError(f"workers must be at least 1, got {options.workers!r}")
    if options.workers is None and options.scheduler is None:
        return False
    require_distributed(ProbeConfigError)
    return True


def _sweep_table(job: Job, result: SweepResult) -> list[dict[str, Any]]:
    rows = []
    for key, r in result.heads.items():
        feature = str(r.input)  # a sweep's heads each read one feature
        info = job.store.feature_info(feature)
        rows.append(
            {
                "head": key,
                "feature": feature,
                "t": info.t,
                "block": info.block,
                "pool": None if info.pool_kind is None else f"{info.pool_kind}{info.pool_size}",
                "lr": r.lr,
                "best_epoch": r.best_epoch,
                "val_top1": r.val_accuracy,
                "test_top1": r.test_accuracy,
                "diverged": r.diverged,
                "selected_for_feature": result.best_per_input.get(feature) == key,
            }
        )
    return rows


def _best_per_cell(table: Sequence[Mapping[str, Any]], result: SweepResult) -> dict[tuple[int, int], dict[str, Any]]:
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
        chosen = select_best(rows, rank)
        assert chosen is not None
        cells[key] = {
            "feature": chosen["feature"],
            "pool": chosen["pool"],
            "lr": chosen["lr"],
            "val_top1": chosen["val_top1"],
            "test_top1": chosen["test_top1"],
        }
    return cells


def _sweep_figures(
    job: Job, cells: Mapping[tuple[int, int], Mapping[str, Any]], table: Sequence[Mapping[str, Any]], best_key: str
) -> dict[str, str]:
    if not cells:
        return {}
    best_row = next(r for r in table if r["head"] == best_key)
    best_cell = (best_row["t"], best_row["block"]) if best_row["t"] is not None else None
    test = {k: c["test_top1"] for k, c in cells.items()}
    plot_heatmap(
        test,
        job.out / "heatmap.png",
        labels={k: c["pool"] for k, c in cells.items()},
        best=best_cell,
        title="test top-1 (pooling and lr selected on val)",
    )
    plot_accuracy_vs_t(
        test, job.out / "accuracy_vs_t.png", best=best_cell, title="test top-1 over timestep (selected on val)"
    )
    return {"heatmap": "heatmap.png", "accuracy_vs_t": "accuracy_vs_t.png"}
