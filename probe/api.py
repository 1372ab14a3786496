"""One Python call per probe command: what `diffbank probe ...` runs, and what a researcher calls directly.

Every `run_*` function reads a store (a `FeatureStore` or its URL/path), writes `results.json` into `out_dir`
(exact configuration, store fingerprint, seeds, split definition, metrics, timings, library versions) and
returns the same dict. Trained heads are saved as safetensors in `out_dir`; training checkpoints live in
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

The trained commands (linear, attention, fusion, sweep) default to the paper's recipe: SGD with `momentum=0`,
`weight_decay=0`, StepLR with `step_size=7`, `gamma=0.1`. Each is a keyword argument; the values used are
recorded in `results.json` (`config`). Bad values raise `ProbeConfigError` (a `ValueError` naming the
parameter) before any data is read.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from probe.baselines import DINOV2_C_GRID, KNN_KS, KNN_TEMPERATURE, flatten_features, knn_sweep, logistic_sweep
from probe.data import ProbeData, ProbeDataError, _open
from probe.heads import AttentionPoolHead, DifFormerHead, LinearHead, resolve_preset, seeded_init
from probe.report import (classification_metrics, environment, now_utc, plot_accuracy_vs_t, plot_heatmap,
                          to_jsonable, write_results)
from probe.train import DEFAULT_LR, predict_logits, train_many

__all__ = ["run_linear", "run_attention", "run_fusion", "run_logistic", "run_knn", "run_sweep",
           "default_features", "RunConflictError", "ProbeConfigError", "SWEEP_LRS"]

PAPER_LINEAR_FEATURE = "t090_b24_avg2"
PAPER_ATTENTION_FEATURE = "t090_b24_tok16"
PAPER_FUSION_BLOCKS = (19, 24, 30)
PAPER_FUSION_TIMESTEPS = (90, 150, 300)
PAPER_T, PAPER_BLOCK = 90, 24
SWEEP_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
RESULTS_FILE = "results.json"
_RECIPE_KEYS = ("momentum", "weight_decay", "step_size", "gamma")
RUN_FILE = "run.json"


class RunConflictError(ValueError):
    """`out_dir` holds a run made with other settings or another store: resuming it would mix two runs."""


class ProbeConfigError(ValueError):
    """A training setting (lr, momentum, weight_decay, step_size, gamma) is out of range; names the parameter."""


# ------------------------------------------------------------------------------------ training settings

def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ProbeConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _recipe(momentum: Any, weight_decay: Any, step_size: Any, gamma: Any) -> dict[str, Any]:
    """The validated optimizer/schedule settings, as `train_many` takes them."""
    m = _real("momentum", momentum)
    if not 0.0 <= m < 1.0:
        raise ProbeConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    wd = _real("weight_decay", weight_decay)
    if wd < 0.0:
        raise ProbeConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
    step = _real("step_size", step_size)
    if not step.is_integer() or step < 1:
        raise ProbeConfigError(f"step_size must be an integer >= 1, got {step_size!r}")
    g = _real("gamma", gamma)
    if not 0.0 < g <= 1.0:
        raise ProbeConfigError(f"gamma must be in (0, 1], got {gamma!r}")
    return {"momentum": m, "weight_decay": wd, "step_size": int(step), "gamma": g}


def _check_lr(name: str, value: Any) -> float:
    lr = _real(name, value)
    if lr <= 0.0:
        raise ProbeConfigError(f"{name} must be > 0, got {value!r}")
    return lr


def _lr_choice(lr: Any, lrs: Sequence[float] | None, default: float) -> tuple[float | None, list[float] | None]:
    """(lr, None) for one head, (None, sorted distinct lrs) for an lr sweep; errors name the parameter."""
    if lrs is None:
        return _check_lr("lr", default if lr is None else lr), None
    if lr is not None:
        raise ProbeConfigError("give either lr or lrs, not both")
    if isinstance(lrs, (str, bytes, numbers.Number)) or not isinstance(lrs, Iterable):
        raise ProbeConfigError(f"lrs must be a sequence of learning rates, got {lrs!r}")
    values = sorted({_check_lr("lrs", v) for v in lrs})
    if not values:
        raise ProbeConfigError("lrs must hold at least one learning rate")
    return None, values


def _fmt(value: float) -> str:
    """0.0 -> '0', 0.1 -> '0.1', 7 -> '7': exact (repr) and equal to the strings older runs recorded."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# ------------------------------------------------------------------------------------- feature choice

def _center_infos(store: Any) -> list[Any]:
    return [store.feature_info(n) for n in store.feature_names(view="center")]


def _distance(info: Any) -> tuple[float, float]:
    t = abs(info.t - PAPER_T) if info.t is not None else math.inf
    b = abs(info.block - PAPER_BLOCK) if info.block is not None else math.inf
    return (t, b)


def _pool_rank(info: Any, prefer: str) -> tuple[int, float]:
    kind, size = info.pool_kind, info.pool_size or 0
    if prefer == "avg":  # the linear head: avg2 first, then the nearest avg size, then tokens
        return (0, abs(size - 2)) if kind == "avg" else (1, -size)
    return (0, -size) if kind == "tok" else (1, -size)  # attention: the most tokens


def default_features(store: Any, command: str) -> list[str]:
    """The paper's feature(s) for `command` when the store has them, else the nearest available ones.

    linear/logistic/knn: t090_b24_avg2, else the avg-pooled feature nearest to t=90, block 24 (avg2 first).
    attention: t090_b24_tok16, else the token feature nearest to it. fusion: blocks {19, 24, 30} x t
    {90, 150, 300} in token mode, else the complete (t x block) grid of one pooling nearest to those (at most
    3 x 3). sweep: every centre-view feature that has a timestep and a block.
    """
    infos = _center_infos(store)
    if not infos:
        raise ProbeDataError("the store has no centre-view features")
    if command == "sweep":
        chosen = [i.name for i in infos if i.t is not None and i.block is not None]
        return chosen or [i.name for i in infos]
    if command == "fusion":
        return _default_fusion(infos)
    paper = PAPER_ATTENTION_FEATURE if command == "attention" else PAPER_LINEAR_FEATURE
    if any(i.name == paper for i in infos):
        return [paper]
    prefer = "tok" if command == "attention" else "avg"
    return [min(infos, key=lambda i: (_pool_rank(i, prefer), _distance(i), i.name)).name]


def _default_fusion(infos: Sequence[Any]) -> list[str]:
    by_pool: dict[str, dict[tuple[int, int], str]] = {}
    for i in infos:
        if i.t is not None and i.block is not None and i.pool_kind is not None:
            by_pool.setdefault(f"{i.pool_kind}{i.pool_size}", {})[(i.t, i.block)] = i.name
    if not by_pool:
        raise ProbeDataError("fusion needs features with a timestep and a block; this store has none")
    pools = sorted(by_pool, key=lambda p: (0 if p == "tok16" else 1 if p.startswith("tok") else 2,
                                           -int(p[3:]), p))
    for pool in pools:
        grid = by_pool[pool]
        ts = sorted({t for t, _ in grid}, key=lambda t: (min(abs(t - p) for p in PAPER_FUSION_TIMESTEPS), t))
        for n_t in range(min(3, len(ts)), 0, -1):
            chosen_t = sorted(ts[:n_t])
            blocks = sorted(b for b in {b for _, b in grid} if all((t, b) in grid for t in chosen_t))
            blocks = sorted(sorted(blocks, key=lambda b: (min(abs(b - p) for p in PAPER_FUSION_BLOCKS), b))[:3])
            if blocks:
                return [grid[(t, b)] for t in chosen_t for b in blocks]
    raise ProbeDataError("no complete timestep x block grid of features for fusion")


def _fusion_inputs(store: Any, features: Sequence[str]) -> tuple[dict[tuple[int, int], str], list[int], dict[int, tuple[int, ...]]]:
    """{(t, block): name}, the timesteps, and one shape per block; errors when the grid is not complete."""
    keyed: dict[tuple[int, int], str] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    for name in features:
        info = store.feature_info(name)
        if info.t is None or info.block is None:
            raise ProbeDataError(f"fusion needs a timestep and a block for every feature; {name!r} has none")
        if (info.t, info.block) in keyed:
            raise ProbeDataError(f"fusion: {name!r} and {keyed[(info.t, info.block)]!r} are both t={info.t}, "
                                 f"block {info.block}; give one pooling per (t, block)")
        keyed[(info.t, info.block)] = name
        shape = tuple(info.shape)
        if shapes.setdefault(info.block, shape) != shape:
            raise ProbeDataError(f"fusion shares one tokenizer per block across timesteps, so block {info.block} "
                                 f"needs one shape; got {shapes[info.block]} and {shape} ({name!r})")
    ts = sorted({t for t, _ in keyed})
    blocks = sorted(shapes)
    missing = [f"t={t}/block {b}" for t in ts for b in blocks if (t, b) not in keyed]
    if missing:
        raise ProbeDataError(f"fusion needs every timestep x block pair; missing: {', '.join(missing)}")
    return keyed, ts, {b: shapes[b] for b in blocks}


# --------------------------------------------------------------------------------------- run plumbing

class _Run:
    """What every command shares: open the store, build the data, guard out_dir, time, write results."""

    def __init__(self, command: str, store: Any, out_dir: str | Path, features: Sequence[str] | str | None,
                 config: dict[str, Any], *, seed: int, subset: str | None, val_fraction: float,
                 standardize: str, memory_budget: Any, resume: bool = True, guard: bool = True) -> None:
        self.started = time.perf_counter()
        self.started_at = now_utc()
        self.command = command
        self.store = _open(store)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        chosen = [features] if isinstance(features, str) else list(features or [])
        self.features = chosen or default_features(self.store, command)
        self.config = {"command": command, "features": self.features, "seed": seed, "subset": subset,
                       "val_fraction": val_fraction, "standardize": standardize, **config}
        t0 = time.perf_counter()
        self.data = ProbeData.from_store(self.store, self.features, val_fraction=val_fraction, seed=seed,
                                         subset=subset, standardize=standardize, memory_budget=memory_budget)
        # Reading (in memory) or the statistics pass (streamed), with their NaN checks, count as data time;
        # in memory the statistics come from the loaded copy, so the store is read once.
        if self.data.in_memory:
            self.data.memory_arrays()
        else:
            for name in self.features:
                self.data.stats(name)
        self.timings: dict[str, float] = {"data_s": time.perf_counter() - t0}
        self._guard(resume, guard)

    def _identity(self) -> dict[str, Any]:
        # epochs, device and progress may change between a run and its resumption. The numeric recipe keys
        # repeat (exactly) what the "optimizer"/"schedule" strings hold, which older runs recorded alone, so
        # leaving them out keeps those runs resumable while any change of value is still a conflict.
        ignored = {"epochs", "device", "progress", *_RECIPE_KEYS}
        return to_jsonable({"config": {k: v for k, v in self.config.items() if k not in ignored},
                            "store_fingerprint": self.store.fingerprint,
                            "splits": {s: v["rows_sha256_16"] for s, v in
                                       self.data.split_definition()["splits"].items()}})

    def _guard(self, resume: bool, guard: bool) -> None:
        # Only runs with a checkpoint need the guard: a rerun resumes them, and resuming another run's
        # checkpoint would mix two runs. Logistic/kNN runs simply overwrite their results.
        path = self.out / RUN_FILE
        ident = self._identity()
        if guard and path.exists():
            old = json.loads(path.read_text())
            if not resume and (self.out / "checkpoint").exists():
                raise RunConflictError(f"{self.out} holds a checkpoint; resume it or choose another out_dir")
            if old != ident:
                diff = sorted(k for k in set(old.get("config", {})) | set(ident["config"])
                              if old.get("config", {}).get(k) != ident["config"].get(k))
                if old.get("store_fingerprint") != ident["store_fingerprint"] or old.get("splits") != ident["splits"]:
                    diff.append("store/splits")
                raise RunConflictError(f"{self.out} holds a {old.get('config', {}).get('command')} run with other "
                                       f"settings ({', '.join(diff)}); choose another out_dir")
        path.write_text(json.dumps(ident, indent=1))

    def stream(self, split: str, batch_size: int, shuffle: bool):
        return self.data.stream(split, batch_size, shuffle=shuffle, seed=self.data.seed)

    def finish(self, body: dict[str, Any]) -> dict[str, Any]:
        self.timings["total_s"] = time.perf_counter() - self.started
        store = self.store
        results = {
            "command": self.command,
            "features": self.features,
            "feature_shapes": {n: list(s) for n, s in self.data.feature_shapes.items()},
            "config": self.config,
            "store": {"url": getattr(store, "url", None), "fingerprint": store.fingerprint,
                      "num_samples": getattr(store, "num_samples", None)},
            "seeds": {"seed": self.data.seed, "split": self.data.seed, "batch_order": self.data.seed,
                      "head_init": self.data.seed},
            "split_definition": self.data.split_definition(),
            "num_classes": self.data.num_classes,
            "class_names": self.data.class_names,
            "data_mode": "in_memory" if self.data.in_memory else "streamed",
            **body,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "started_at": self.started_at,
            "finished_at": now_utc(),
            "environment": environment(),
        }
        write_results(self.out / RESULTS_FILE, results)
        np.savez(self.out / "splits.npz", **self.data.split_rows())
        return to_jsonable(results)


def _train_heads(run: _Run, heads: Mapping[Hashable, torch.nn.Module], inputs: Mapping[Hashable, Any],
                 lrs: Mapping[Hashable, float], *, epochs: int, batch_size: int, device: str, progress: bool,
                 recipe: Mapping[str, Any]):
    t0 = time.perf_counter()
    result = train_many(heads, inputs, run.stream("train", batch_size, True), run.stream("val", batch_size, False),
                        run.stream("test", batch_size, False), lrs=dict(lrs), epochs=epochs,
                        momentum=recipe["momentum"], weight_decay=recipe["weight_decay"],
                        step_size=recipe["step_size"], gamma=recipe["gamma"],
                        checkpoint_dir=run.out / "checkpoint", resume=True, progress=progress, device=device)
    run.timings["train_s"] = time.perf_counter() - t0
    return result


def _evaluate_head(run: _Run, head: torch.nn.Module, input: Any, batch_size: int, device: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {}
    for split in ("val", "test"):
        logits = predict_logits(head, run.stream(split, batch_size, False), input, device=device).numpy()
        out[split] = classification_metrics(run.data.labels(split), logits, num_classes=run.data.num_classes,
                                            class_names=run.data.class_names)
    run.timings["eval_s"] = time.perf_counter() - t0
    return out


def _save_heads(path: Path, heads: Mapping[str, torch.nn.Module], metadata: Mapping[str, Any]) -> None:
    tensors = {f"{prefix}.{k}" if prefix else k: v.detach().cpu().contiguous()
               for prefix, head in heads.items() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(to_jsonable(v)) for k, v in metadata.items()})


def _sgd_config(recipe: Mapping[str, Any], **settings: Any) -> dict[str, Any]:
    """A training command's configuration: its settings, then the optimizer and schedule it trains with."""
    m, wd, step, g = (recipe[k] for k in _RECIPE_KEYS)
    return {**settings, "optimizer": f"SGD(momentum={_fmt(m)}, weight_decay={_fmt(wd)})",
            "schedule": f"StepLR(step_size={step}, gamma={_fmt(g)})",
            "momentum": m, "weight_decay": wd, "step_size": step, "gamma": g}


def _head_record(result: Any) -> dict[str, Any]:
    return {"lr": result.lr, "epochs_trained": result.epochs_trained, "best_epoch": result.best_epoch,
            "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
            "diverged": result.diverged, "history": result.history}


def _single_feature(run: _Run) -> str:
    if len(run.features) != 1:
        raise ProbeDataError(f"{run.command} trains a head on one feature, got {len(run.features)} "
                             f"({', '.join(run.features)}); use `sweep` for many features or `fusion` to combine them")
    return run.features[0]


# ------------------------------------------------------------------------------------------- commands

def run_linear(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None, epochs: int = 28,
               lr: float = DEFAULT_LR["linear"], batch_size: int = 128, seed: int = 0, subset: str | None = None,
               val_fraction: float = 0.1, standardize: str = "dim", batchnorm: bool = False,
               memory_budget: int | str | None = None, device: str = "cpu", progress: bool = True,
               resume: bool = True, momentum: float = 0.0, weight_decay: float = 0.0, step_size: int = 7,
               gamma: float = 0.1) -> dict[str, Any]:
    """The paper's linear probe on one feature (default t090_b24_avg2); weights -> out_dir/head.safetensors.

    `momentum`, `weight_decay` (SGD) and `step_size`, `gamma` (StepLR) default to the paper's recipe.
    """
    recipe = _recipe(momentum, weight_decay, step_size, gamma)
    lr, _ = _lr_choice(lr, None, DEFAULT_LR["linear"])
    run = _Run("linear", store, out_dir, features,
               _sgd_config(recipe, epochs=epochs, lr=lr, batch_size=batch_size, batchnorm=batchnorm, device=device),
               seed=seed, subset=subset, val_fraction=val_fraction, standardize=standardize,
               memory_budget=memory_budget, resume=resume)
    name = _single_feature(run)
    with seeded_init(seed):
        head = LinearHead(run.data.feature_shapes[name], run.data.num_classes, batchnorm=batchnorm)
    return _finish_single(run, head, name, lr, epochs, batch_size, device, progress, recipe)


def run_attention(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None,
                  epochs: int = 28, lr: float | None = None, batch_size: int = 128, seed: int = 0,
                  subset: str | None = None, preset: str = "small", val_fraction: float = 0.1,
                  standardize: str = "channel", memory_budget: int | str | None = None, device: str = "cpu",
                  progress: bool = True, resume: bool = True, lrs: Sequence[float] | None = None,
                  momentum: float = 0.0, weight_decay: float = 0.0, step_size: int = 7,
                  gamma: float = 0.1) -> dict[str, Any]:
    """The attention-pool head on one block map (default t090_b24_tok16); `preset` tiny|small|paper.

    `lr` defaults to the paper's 5e-2. `lrs` (instead of `lr`) trains one head per lr in one pass, all from
    the same initial weights, and reports the head whose lr is best on validation (see `results["lr_sweep"]`).
    `momentum`, `weight_decay` (SGD) and `step_size`, `gamma` (StepLR) default to the paper's recipe.
    """
    run, recipe, lr, lrs, sizes = _start_transformer(
        "attention", DEFAULT_LR["attention"], store, out_dir, features, lr=lr, lrs=lrs, epochs=epochs,
        batch_size=batch_size, preset=preset, device=device, seed=seed, subset=subset, val_fraction=val_fraction,
        standardize=standardize, memory_budget=memory_budget, resume=resume, momentum=momentum,
        weight_decay=weight_decay, step_size=step_size, gamma=gamma)
    name = _single_feature(run)
    shape = run.data.feature_shapes[name]
    return _finish_transformer(run, lambda: AttentionPoolHead(shape, run.data.num_classes, **sizes), name, lr, lrs,
                               seed, epochs, batch_size, device, progress, recipe)


def run_fusion(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None, epochs: int = 28,
               lr: float | None = None, batch_size: int = 128, seed: int = 0, subset: str | None = None,
               preset: str = "small", val_fraction: float = 0.1, standardize: str = "channel",
               memory_budget: int | str | None = None, device: str = "cpu", progress: bool = True,
               resume: bool = True, lrs: Sequence[float] | None = None, momentum: float = 0.0,
               weight_decay: float = 0.0, step_size: int = 7, gamma: float = 0.1) -> dict[str, Any]:
    """DifFormer over a complete timestep x block grid (default blocks {19, 24, 30} x t {90, 150, 300}).

    `lr` defaults to the paper's 5e-2; `lrs`, `momentum`, `weight_decay`, `step_size`, `gamma` as in
    `run_attention`.
    """
    run, recipe, lr, lrs, sizes = _start_transformer(
        "fusion", DEFAULT_LR["difformer"], store, out_dir, features, lr=lr, lrs=lrs, epochs=epochs,
        batch_size=batch_size, preset=preset, device=device, seed=seed, subset=subset, val_fraction=val_fraction,
        standardize=standardize, memory_budget=memory_budget, resume=resume, momentum=momentum,
        weight_decay=weight_decay, step_size=step_size, gamma=gamma)
    keyed, ts, shapes = _fusion_inputs(run.store, run.features)
    run.config["grid"] = {"timesteps": ts, "blocks": list(shapes)}
    return _finish_transformer(run, lambda: DifFormerHead(shapes, ts, run.data.num_classes, **sizes), keyed, lr,
                               lrs, seed, epochs, batch_size, device, progress, recipe)


def _start_transformer(command: str, default_lr: float, store: Any, out_dir: str | Path,
                       features: Sequence[str] | str | None, *, lr: Any, lrs: Sequence[float] | None, epochs: int,
                       batch_size: int, preset: str, device: str, seed: int, subset: str | None,
                       val_fraction: float, standardize: str, memory_budget: int | str | None, resume: bool,
                       momentum: Any, weight_decay: Any, step_size: Any, gamma: Any,
                       ) -> tuple[_Run, dict[str, Any], float | None, list[float] | None, dict[str, int]]:
    """The start `run_attention` and `run_fusion` share: settings checked (before any data is read), then the run
    opened with one config layout, so both record and resume alike. Returns (run, recipe, lr, lrs, sizes)."""
    recipe = _recipe(momentum, weight_decay, step_size, gamma)
    lr, lrs = _lr_choice(lr, lrs, default_lr)
    sizes = resolve_preset(preset)
    run = _Run(command, store, out_dir, features,
               _sgd_config(recipe, epochs=epochs, **_lr_settings(lr, lrs), batch_size=batch_size, preset=preset,
                           **sizes, device=device),
               seed=seed, subset=subset, val_fraction=val_fraction, standardize=standardize,
               memory_budget=memory_budget, resume=resume)
    return run, recipe, lr, lrs, sizes


def _lr_settings(lr: float | None, lrs: list[float] | None) -> dict[str, Any]:
    # One lr keeps the key older runs recorded ("lr"), so their out_dirs still resume.
    return {"lr": lr} if lrs is None else {"lrs": lrs}


def _finish_transformer(run: _Run, make_head: Callable[[], torch.nn.Module], input: Any, lr: float | None,
                        lrs: list[float] | None, seed: int, epochs: int, batch_size: int, device: str,
                        progress: bool, recipe: Mapping[str, Any]) -> dict[str, Any]:
    if lrs is None:
        assert lr is not None
        with seeded_init(seed):
            head = make_head()
        return _finish_single(run, head, input, lr, epochs, batch_size, device, progress, recipe)
    heads: dict[str, torch.nn.Module] = {}
    lr_of: dict[str, float] = {}
    for value in lrs:
        key = f"lr={_fmt(value)}"
        with seeded_init(seed):  # same start for every lr: each head equals the single-lr run's head
            heads[key] = make_head()
        lr_of[key] = value
    result = _train_heads(run, heads, {k: input for k in heads}, lr_of, epochs=epochs, batch_size=batch_size,
                          device=device, progress=progress, recipe=recipe)
    assert result.best is not None  # a validation split always exists
    best = str(result.best)
    chosen = result.heads[best]
    metrics = _evaluate_head(run, heads[best], input, batch_size, device)
    _save_heads(run.out / "head.safetensors", {"": heads[best]},
                {"command": run.command, "features": run.features, "config": run.config, "lr": chosen.lr})
    _save_heads(run.out / "heads.safetensors", heads,
                {"command": run.command, "features": run.features, "config": run.config, "heads": list(heads)})
    table = [{"head": k, "lr": r.lr, "best_epoch": r.best_epoch, "epochs_trained": r.epochs_trained,
              "val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy, "diverged": r.diverged,
              "selected": k == best, "history": r.history} for k, r in result.heads.items()]
    return run.finish({"metrics": metrics,
                       "selected": {"lr": chosen.lr, "epoch": chosen.best_epoch, "val_accuracy": chosen.val_accuracy},
                       "training": _head_record(chosen), "lr_sweep": table,
                       "weights": "head.safetensors", "all_weights": "heads.safetensors"})


def _finish_single(run: _Run, head: torch.nn.Module, input: Any, lr: float, epochs: int, batch_size: int,
                   device: str, progress: bool, recipe: Mapping[str, Any]) -> dict[str, Any]:
    result = _train_heads(run, {"head": head}, {"head": input}, {"head": lr}, epochs=epochs,
                          batch_size=batch_size, device=device, progress=progress, recipe=recipe).heads["head"]
    metrics = _evaluate_head(run, head, input, batch_size, device)
    _save_heads(run.out / "head.safetensors", {"": head},
                {"command": run.command, "features": run.features, "config": run.config})
    return run.finish({"metrics": metrics,
                       "selected": {"epoch": result.best_epoch, "lr": lr, "val_accuracy": result.val_accuracy},
                       "training": _head_record(result), "weights": "head.safetensors"})


def run_logistic(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None,
                 cs: Sequence[float] | None = None, max_iter: int = 1000, refit: str = "train+val", seed: int = 0,
                 subset: str | None = None, val_fraction: float = 0.1, standardize: str = "dim",
                 memory_budget: int | str | None = None) -> dict[str, Any]:
    """Logistic regression (lbfgs) over a C grid (default DINOv2's 45 values), features concatenated."""
    grid = sorted(float(c) for c in (cs if cs is not None else DINOV2_C_GRID))
    run = _Run("logistic", store, out_dir, features, {"cs": grid, "max_iter": max_iter, "refit": refit},
               seed=seed, subset=subset, val_fraction=val_fraction, standardize=standardize,
               memory_budget=memory_budget, guard=False)
    t0 = time.perf_counter()
    x = {s: flatten_features(run.data.arrays(s), run.features) for s in ("train", "val", "test")}
    run.timings["data_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = logistic_sweep(x["train"], run.data.labels("train"), x["val"], run.data.labels("val"), x["test"],
                         run.data.labels("test"), num_classes=run.data.num_classes, cs=grid, max_iter=max_iter,
                         refit=refit, class_names=run.data.class_names)
    run.timings["train_s"] = time.perf_counter() - t0
    return run.finish(out)


def run_knn(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None,
            ks: Sequence[int] = KNN_KS, temperature: float = KNN_TEMPERATURE, batch_size: int = 4096,
            seed: int = 0, subset: str | None = None, val_fraction: float = 0.1, standardize: str = "dim",
            memory_budget: int | str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Weighted cosine kNN (k swept on validation); the train bank is streamed, so it may exceed memory."""
    run = _Run("knn", store, out_dir, features,
               {"ks": sorted({int(k) for k in ks}), "temperature": temperature, "batch_size": batch_size,
                "device": device}, seed=seed, subset=subset, val_fraction=val_fraction, standardize=standardize,
               memory_budget=memory_budget, guard=False)
    t0 = time.perf_counter()
    queries = {s: torch.from_numpy(flatten_features(run.data.arrays(s), run.features)) for s in ("val", "test")}
    run.timings["data_s"] += time.perf_counter() - t0

    def bank() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xs, y in run.stream("train", batch_size, False):
            yield flatten_features(xs, run.features), y

    t0 = time.perf_counter()
    out = knn_sweep(bank(), len(run.data.rows("train")), queries["val"], run.data.labels("val"), queries["test"],
                    run.data.labels("test"), num_classes=run.data.num_classes, ks=ks, temperature=temperature,
                    device=device, class_names=run.data.class_names)
    run.timings["train_s"] = time.perf_counter() - t0
    return run.finish(out)


def run_sweep(store: Any, out_dir: str | Path, *, features: Sequence[str] | str | None = None,
              lrs: Sequence[float] = SWEEP_LRS, epochs: int = 28, batch_size: int = 128, seed: int = 0,
              subset: str | None = None, val_fraction: float = 0.1, standardize: str = "dim",
              memory_budget: int | str | None = None, device: str = "cpu", progress: bool = True,
              resume: bool = True, momentum: float = 0.0, weight_decay: float = 0.0, step_size: int = 7,
              gamma: float = 0.1) -> dict[str, Any]:
    """Linear heads for every feature x lr in one pass over the data; selection on validation.

    `momentum`, `weight_decay` (SGD) and `step_size`, `gamma` (StepLR) apply to every head (default: the paper's).

    Writes heatmap.png (test top-1 of the validation-selected (pooling, lr) per (t, block) cell, the
    validation-selected cell outlined) and accuracy_vs_t.png, and all heads to heads.safetensors.
    """
    recipe = _recipe(momentum, weight_decay, step_size, gamma)
    _, lrs = _lr_choice(None, lrs, DEFAULT_LR["linear"])
    run = _Run("sweep", store, out_dir, features,
               _sgd_config(recipe, lrs=lrs, epochs=epochs, batch_size=batch_size, device=device),
               seed=seed, subset=subset, val_fraction=val_fraction, standardize=standardize,
               memory_budget=memory_budget, resume=resume)
    heads: dict[str, torch.nn.Module] = {}
    inputs: dict[str, str] = {}
    lr_of: dict[str, float] = {}
    for name in run.features:
        for lr in lrs:
            key = f"{name}@lr={lr:g}"
            with seeded_init(seed):  # same start for every lr: the sweep's head equals `run_linear`'s
                heads[key] = LinearHead(run.data.feature_shapes[name], run.data.num_classes)
            inputs[key], lr_of[key] = name, lr
    result = _train_heads(run, heads, inputs, lr_of, epochs=epochs, batch_size=batch_size, device=device,
                          progress=progress, recipe=recipe)
    assert result.best is not None  # a validation split always exists
    best_key = str(result.best)
    metrics = _evaluate_head(run, heads[best_key], inputs[best_key], batch_size, device)
    table = _sweep_table(run, result)
    cells = _best_per_cell(table)
    figures = _sweep_figures(run, cells, table, best_key)
    _save_heads(run.out / "heads.safetensors", heads, {"command": "sweep", "heads": list(heads)})
    return run.finish({
        "metrics": metrics,
        "selected": {"head": best_key, "feature": inputs[best_key], "lr": lr_of[best_key],
                     "epoch": result.heads[best_key].best_epoch,
                     "val_accuracy": result.heads[best_key].val_accuracy},
        "sweep": table,
        "grid": [{"t": t, "block": b, **row} for (t, b), row in sorted(cells.items())],
        "figures": figures,
        "weights": "heads.safetensors",
        "training": {k: _head_record(r) for k, r in result.heads.items()},
    })


def _sweep_table(run: _Run, result: Any) -> list[dict[str, Any]]:
    rows = []
    for key, r in result.heads.items():
        info = run.store.feature_info(r.input)
        rows.append({"head": key, "feature": r.input, "t": info.t, "block": info.block,
                     "pool": None if info.pool_kind is None else f"{info.pool_kind}{info.pool_size}",
                     "lr": r.lr, "best_epoch": r.best_epoch, "val_top1": r.val_accuracy, "test_top1": r.test_accuracy,
                     "diverged": r.diverged, "selected_for_feature": result.best_per_input.get(r.input) == key})
    return rows


def _best_per_cell(table: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (t, block): the row with the best validation top-1 (ties: the earlier row, i.e. the caller's order)."""
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for row in table:
        if row["t"] is None or row["block"] is None or row["val_top1"] is None:
            continue
        key = (row["t"], row["block"])
        if key not in cells or row["val_top1"] > cells[key]["val_top1"]:
            cells[key] = {"feature": row["feature"], "pool": row["pool"], "lr": row["lr"],
                          "val_top1": row["val_top1"], "test_top1": row["test_top1"]}
    return cells


def _sweep_figures(run: _Run, cells: Mapping[tuple[int, int], Mapping[str, Any]],
                   table: Sequence[Mapping[str, Any]], best_key: str) -> dict[str, str]:
    if not cells:
        return {}
    best_row = next(r for r in table if r["head"] == best_key)
    best_cell = (best_row["t"], best_row["block"]) if best_row["t"] is not None else None
    test = {k: c["test_top1"] for k, c in cells.items()}
    plot_heatmap(test, run.out / "heatmap.png", labels={k: c["pool"] for k, c in cells.items()},
                 best=best_cell, title="test top-1 (pooling and lr selected on val)")
    plot_accuracy_vs_t(test, run.out / "accuracy_vs_t.png", best=best_cell,
                       title="test top-1 over timestep (selected on val)")
    return {"heatmap": "heatmap.png", "accuracy_vs_t": "accuracy_vs_t.png"}
