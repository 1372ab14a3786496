"""What every probe command shares: open the store, build the data, guard out_dir, train, evaluate, report.

A `Run` is one command's run: it resolves the features, reads the data (timed), refuses to mix two runs in one
`out_dir` (`run.json` holds the identity of the run a checkpoint belongs to) and writes results.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from extract.provenance import to_jsonable, utc_now
from probe.data import ProbeData, ProbeDataError, _open
from probe.features import default_features
from probe.metrics import classification_metrics
from probe.recipe import Recipe
from probe.report import environment, write_results
from probe.trainer import SweepResult, predict_logits, train_many

__all__ = ["Run", "RunConflictError", "RESULTS_FILE", "RUN_FILE"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
RUN_FILE = "run.json"
_RECIPE_KEYS = ("momentum", "weight_decay", "step_size", "gamma")
# Settings older runs did not record: at these values a run is one of theirs, so its out_dir still resumes.
_IMPLICIT = {"recipe": "diffbank", "keep": "best", "draws": None, "eval_draws": "first"}
LOGITS_FILE = "logits.npz"


class RunConflictError(ValueError):
    """`out_dir` holds a run made with other settings or another store: resuming it would mix two runs."""


class Run:
    """What every command shares: open the store, build the data, guard out_dir, time, write results."""

    def __init__(
        self,
        command: str,
        store: Any,
        out_dir: str | Path,
        features: Any,
        config: dict[str, Any],
        *,
        seed: int,
        subset: str | None,
        val_fraction: float,
        standardize: str,
        memory_budget: Any,
        resume: bool = True,
        guard: bool = True,
        recipe: Recipe | None = None,
        draws: int | None = 1,
        eval_draws: str = "first",
    ) -> None:
        self.started = time.perf_counter()
        self.started_at = utc_now()
        self.recipe = recipe
        self.command = command
        self.store = _open(store)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        chosen = [features] if isinstance(features, str) else list(features or [])
        self.features = chosen or default_features(self.store, command)
        self.config = {
            "command": command,
            "features": self.features,
            "seed": seed,
            "subset": subset,
            "val_fraction": val_fraction,
            "standardize": standardize,
            **config,
        }
        t0 = time.perf_counter()
        self.data = ProbeData.from_store(
            self.store,
            self.features,
            val_fraction=val_fraction,
            seed=seed,
            subset=subset,
            standardize=standardize,
            memory_budget=memory_budget,
            draws=draws,
            eval_draws=eval_draws,
        )
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
        config = {
            k: v for k, v in self.config.items() if k not in ignored and not (k in _IMPLICIT and v == _IMPLICIT[k])
        }
        return to_jsonable(
            {
                "config": config,
                "store_fingerprint": self.store.fingerprint,
                "splits": {s: v["rows_sha256_16"] for s, v in self.data.split_definition()["splits"].items()},
            }
        )

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
                diff = sorted(
                    k
                    for k in set(old.get("config", {})) | set(ident["config"])
                    if old.get("config", {}).get(k) != ident["config"].get(k)
                )
                if old.get("store_fingerprint") != ident["store_fingerprint"] or old.get("splits") != ident["splits"]:
                    diff.append("store/splits")
                raise RunConflictError(
                    f"{self.out} holds a {old.get('config', {}).get('command')} run with other "
                    f"settings ({', '.join(diff)}); choose another out_dir"
                )
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
            "store": {
                "url": getattr(store, "url", None),
                "fingerprint": store.fingerprint,
                "num_samples": getattr(store, "num_samples", None),
            },
            "seeds": {
                "seed": self.data.seed,
                "split": self.data.seed,
                "batch_order": self.data.seed,
                "head_init": self.data.seed,
            },
            "split_definition": self.data.split_definition(),
            "num_classes": self.data.num_classes,
            "class_names": self.data.class_names,
            "data_mode": "in_memory" if self.data.in_memory else "streamed",
            "noise_draws": self.data.draw_definition(self.recipe.epochs if self.recipe is not None else None),
            **({"recipe": self.recipe.to_record()} if self.recipe is not None else {}),
            **body,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "environment": environment(),
        }
        write_results(self.out / RESULTS_FILE, results)
        np.savez(self.out / "splits.npz", **self.data.split_rows())
        return to_jsonable(results)


def train_heads(
    run: Run,
    heads: Mapping[Hashable, torch.nn.Module],
    inputs: Mapping[Hashable, Any],
    lrs: Mapping[Hashable, float],
    *,
    device: str,
    progress: bool,
) -> SweepResult:
    """Train `heads` with the run's recipe on its train split, validating every epoch; checkpoints resume."""
    assert run.recipe is not None
    batch_size = run.recipe.batch_size
    t0 = time.perf_counter()
    result = train_many(
        heads,
        inputs,
        run.stream("train", batch_size, True),
        run.stream("val", batch_size, False),
        run.stream("test", batch_size, False),
        lrs=dict(lrs),
        recipe=run.recipe,
        checkpoint_dir=run.out / "checkpoint",
        resume=True,
        progress=progress,
        device=device,
    )
    run.timings["train_s"] = time.perf_counter() - t0
    return result


def evaluate_head(run: Run, head: torch.nn.Module, input: Any, device: str) -> dict[str, Any]:
    """Metrics of one head on the validation and test splits; its logits (and the store rows they belong to)
    go to out_dir/logits.npz, so two runs can be compared image by image (e.g. McNemar)."""
    assert run.recipe is not None
    batch_size = run.recipe.batch_size
    t0 = time.perf_counter()
    out = {}
    saved: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        logits = predict_logits(head, run.stream(split, batch_size, False), input, device=device).numpy()
        out[split] = classification_metrics(
            run.data.labels(split), logits, num_classes=run.data.num_classes, class_names=run.data.class_names
        )
        saved[f"{split}_logits"], saved[f"{split}_rows"] = logits, run.data.rows(split)
    np.savez(run.out / LOGITS_FILE, **saved)
    run.timings["eval_s"] = time.perf_counter() - t0
    return out


def save_heads(path: Path, heads: Mapping[str, torch.nn.Module], metadata: Mapping[str, Any]) -> None:
    """Heads' weights as one safetensors file (keys prefixed by the head's name), metadata as JSON strings."""
    tensors = {
        f"{prefix}.{k}" if prefix else k: v.detach().cpu().contiguous()
        for prefix, head in heads.items()
        for k, v in head.state_dict().items()
    }
    save_file(tensors, str(path), metadata={k: json.dumps(to_jsonable(v)) for k, v in metadata.items()})


def head_record(result: Any) -> dict[str, Any]:
    return {
        "lr": result.lr,
        "epochs_trained": result.epochs_trained,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "test_accuracy": result.test_accuracy,
        "diverged": result.diverged,
        "history": result.history,
    }


def single_feature(run: Run) -> str:
    if len(run.features) != 1:
        raise ProbeDataError(
            f"{run.command} trains a head on one feature, got {len(run.features)} "
            f"({', '.join(run.features)}); use `sweep` for many features or `fusion` to combine them"
        )
    return run.features[0]
