"""One probe command's job: open the store, build the data, guard out_dir, time the stages, write results.json.

A `Job` resolves the features (`probe.defaults` when none are named), reads the data (timed), refuses to mix
two runs in one `out_dir` (`run.json` holds the identity of the run a checkpoint belongs to) and writes
results.json, splits.npz and the selected model's scores (`probe.logits`, logits.npz).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from extract.provenance import to_jsonable, utc_now
from probe.data import ProbeData
from probe.defaults import default_features, why_default
from probe.errors import RunConflictError
from probe.head_results import EPOCHS_COUNTED_FROM
from probe.inputs import StoreLike, as_store
from probe.logits import LOGITS_FILE, RESULTS_FILE, ScoreFile, SplitScores, remove_stale_score_files, write_logits
from probe.options import DataOptions
from probe.order import OrderUnits
from probe.recipe import Recipe
from probe.report import environment, number_text, write_results
from probe.splits import optional_attr
from probe.stream import FeatureStream

__all__ = ["Job", "RUN_FILE", "probe_data"]

RUN_FILE = "run.json"
_RECIPE_KEYS = ("momentum", "weight_decay", "step_size", "gamma")
# Settings older runs did not record: at these values a run is one of theirs, so its out_dir still resumes.
_IMPLICIT = {"recipe": "diffbank", "keep": "best", "draws": None, "eval_draws": "first"}

log = logging.getLogger(__name__)


class Job:
    """What every command shares: open the store, build the data, guard out_dir, time, write results."""

    def __init__(
        self,
        command: str,
        store: StoreLike,
        out_dir: str | Path,
        options: DataOptions,
        config: dict[str, Any],
        *,
        standardize: str,
        resume: bool = True,
        guard: bool = True,
        recipe: Recipe | None = None,
        draws: int | None = 1,
        eval_draws: str = "first",
        read_data: bool = True,
    ) -> None:
        self.started = time.perf_counter()
        self.started_at = utc_now()
        self.recipe = recipe
        self.command = command
        self.store = as_store(store)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_score_files(self.out):
            log.info("removed %s, left by a run that was killed while it evaluated", path.name)
        features, seed, subset, val_fraction = options.features, options.seed, options.subset, options.val_fraction
        chosen = [features] if isinstance(features, str) else list(features or [])
        self.features = chosen or default_features(self.store, command)
        if not chosen:
            log.info("feature: %s", why_default(self.store, command, self.features))
        if recipe is not None:
            log.info("recipe: %s", recipe_line(recipe, standardize))
        else:
            log.info("standardize: %s", standardize)
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
        self.data = probe_data(self.store, self.features, options, standardize, draws, eval_draws)
        for split, source in self.data.split_definition()["source"].items():
            if source.startswith("carved"):
                log.info("%s split: %s, %d rows", split, source, len(self.data.rows(split)))
        # Reading (in memory) or the statistics pass (streamed), with their NaN checks, count as data time;
        # in memory the statistics come from the loaded copy, so the store is read once. A job whose heads
        # train elsewhere (`read_data=False`: a sweep on dask workers) reads nothing here.
        if read_data:
            self.data.load()
        self.timings: dict[str, float] = {"data_s": time.perf_counter() - t0}
        self.logits_record: dict[str, Any] | None = None
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
                raise RunConflictError(f"{self.out} holds a checkpoint; resume it or choose another output directory")
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
                    f"settings ({', '.join(diff)}); choose another output directory"
                )
        path.write_text(json.dumps(ident, indent=1))

    def stream(self, split: str, batch_size: int, shuffle: bool) -> FeatureStream:
        return FeatureStream(self.data, split, batch_size, shuffle=shuffle)

    def save_logits(self, logits: Mapping[str, np.ndarray | ScoreFile]) -> None:
        """The selected model's scores ({split: (N, classes)}, rows in the split's store order) to logits.npz,
        with the rows, labels and sample ids they belong to; results.json records the file under "logits"."""
        ids = optional_attr(self.store, "sample_ids")
        scores = {
            split: SplitScores(
                logits=x if isinstance(x, ScoreFile) else np.asarray(x),
                rows=self.data.rows(split),
                labels=self.data.labels(split),
                ids=None if ids is None else np.asarray(ids)[self.data.rows(split)],
            )
            for split, x in logits.items()
        }
        self.logits_record = write_logits(self.out / LOGITS_FILE, scores, self.store.fingerprint)

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
            **({"epochs_counted_from": EPOCHS_COUNTED_FROM} if self.recipe is not None else {}),
            **body,
            **({"logits": self.logits_record} if self.logits_record is not None else {}),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "environment": environment(),
        }
        write_results(self.out / RESULTS_FILE, results)
        rows: dict[str, Any] = self.data.split_rows()  # Any: numpy types savez's keywords with allow_pickle
        np.savez(self.out / "splits.npz", **rows)
        return to_jsonable(results)


def probe_data(
    store: StoreLike,
    features: list[str],
    options: DataOptions,
    standardize: str,
    draws: int | None,
    eval_draws: str,
    *,
    memory_budget: int | str | None = None,
    order_units: OrderUnits | None = None,
) -> ProbeData:
    """The data of a command's `features` as its options define them (splits, subset, seed, draws); nothing is
    read yet. `memory_budget` overrides the options' (a worker's share); `order_units` fixes the epoch order."""
    return ProbeData.from_store(
        store,
        features,
        val_fraction=options.val_fraction,
        seed=options.seed,
        subset=options.subset,
        standardize=standardize,
        memory_budget=options.memory_budget if memory_budget is None else memory_budget,
        draws=draws,
        eval_draws=eval_draws,
        order_units=order_units,
    )


def recipe_line(recipe: Recipe, standardize: str) -> str:
    """The training settings a run will use, as one line for the log (they change its result)."""
    lrs = ", ".join(number_text("lr", v) for v in recipe.learning_rates)
    given = f"; given: {', '.join(recipe.overrides)}" if recipe.overrides else ""
    kept = "the best validation epoch" if recipe.keep == "best" else "the last epoch"
    return (
        f"{recipe.name}: lr {lrs}, {recipe.epochs} epochs, batch {recipe.batch_size}, "
        f"{recipe.optimizer_label()}, {recipe.schedule_label()}, standardize {standardize}, keeps {kept}{given}"
    )
