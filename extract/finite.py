"""Non-finite features are refused, not stored: a model with NaN or inf weights (or weights so large that
activations overflow) would otherwise give a "complete" store of NaN.

- Before a run (`model_problem`): one image (the dataset's first row), the spec's first noise draw, the
  centre view, each requested timestep in turn: one forward up to the deepest requested block that keeps
  every block's output. The model is refused when a requested feature, pooled and cast to the storage
  dtype as it would be stored, is not finite; the message names the first block whose output is not finite.
  It stops at the first timestep that fails.
- During a run (`unit_problem`): a unit whose features, among its valid rows and as stored (float16
  overflows to inf count), hold more non-finite values than NONFINITE_ALLOWANCE fails the run before the
  unit is written, naming the unit and the feature. `extract --allow-nonfinite` stores them anyway (the
  counts are then in `store info` and `store verify --full`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from extract.compute import Computer, ExtractionError
from extract.diffusion import noise_for
from extract.overlap import load_batch
from extract.pooling import pool
from extract.preprocess import batch_to_model_range
from extract.sources import ImageSource
from extract.spec import Spec
from extract.store.writer import cast_with_stats

# Non-finite values a unit's feature may hold (per unit and feature, valid rows, as stored): none. A model
# that works gives finite features everywhere; a few NaNs are the first sign of one that does not.
NONFINITE_ALLOWANCE = 0
OPT_OUT = "extract --allow-nonfinite stores them anyway"


class NonFiniteFeatures(ExtractionError):
    """The model's features are not finite where the spec asks for them."""


def nonfinite_count(values: np.ndarray, storage_dtype: str) -> tuple[int, int]:
    """(NaNs, infs) of float32 `values` once cast to the storage dtype (float16 overflows count as inf)."""
    _, stats = cast_with_stats(values, storage_dtype)
    return int(stats[2]), int(stats[1])


def unit_problem(
    unit: int, rows: tuple[int, int], buffers: Mapping[str, np.ndarray], valid: np.ndarray, storage_dtype: str
) -> str:
    """Why a finished unit must not be stored (its first feature beyond the allowance), or ""."""
    for name, values in buffers.items():
        kept = values[valid] if not valid.all() else values
        if np.isfinite(kept).all() and (storage_dtype != "float16" or not _beyond_float16(kept)):
            continue
        n_nan, n_inf = nonfinite_count(kept, storage_dtype)
        if n_nan + n_inf > NONFINITE_ALLOWANCE:
            return (
                f"unit {unit} (rows {rows[0]}-{rows[1] - 1}): feature {name} holds {n_nan} NaN and {n_inf} inf "
                f"value(s) as {storage_dtype} among {kept.size} (allowed: {NONFINITE_ALLOWANCE}); the model's "
                f"output is not finite there. Nothing of this unit was written; {OPT_OUT}"
            )
    return ""


def _beyond_float16(values: np.ndarray) -> bool:
    return bool(np.abs(values).max(initial=0.0) > np.finfo(np.float16).max)


def model_problem(spec: Spec, model: torch.nn.Module, source: ImageSource, device: torch.device) -> str:
    """Why the model's features at the spec's taps would not be finite, or "" (one image; see above)."""
    if len(source) == 0:
        return ""
    features = [f for f in spec.features() if f.draw == 0]
    view = "center" if any(f.view == "center" for f in features) else "flip"
    features = [f for f in features if f.view == view]
    deepest = max(f.block for f in features)
    computer = Computer(model, spec, device, labels=source.labels)
    y = computer.class_input(np.zeros(1, np.int64))
    batch = load_batch(source, spec.dataset.image_size, spec.dataset.preprocess, False, 0, 0, np.zeros(1, np.int64))
    x0 = batch_to_model_range(batch.pixels.to(device))
    with torch.inference_mode():
        for t in spec.grid.timesteps:
            noise = noise_for(spec.noise.rule, spec.noise.seed, [0], t, 0, tuple(x0.shape[1:]), device)
            x_t = computer.schedule.q_sample(x0, t, noise)
            outputs = computer.forward(x_t if view == "center" else x_t.flip(-1), t, list(range(1, deepest + 1)), y)
            problem = _tap_problem(spec, features, t, outputs)
            if problem:
                return problem
    return ""


def _tap_problem(spec: Spec, features: list, t: int, outputs: Mapping[int, torch.Tensor]) -> str:
    bad = []
    for f in features:
        if f.t != t:
            continue
        values = pool(outputs[f.block], (f.pool_kind, f.pool_size)).cpu().numpy()
        n_nan, n_inf = nonfinite_count(values, spec.storage.dtype)
        if n_nan or n_inf:
            bad.append((f.name, n_nan, n_inf, values))
    if not bad:
        return ""
    first = next((n for n in sorted(outputs) if not torch.isfinite(outputs[n]).all()), None)
    name, n_nan, n_inf, values = bad[0]
    what = f"{n_nan} NaN and {n_inf} inf of {values.size} values"
    if first is None:  # finite in float32, beyond the storage dtype's range
        largest = float(np.abs(values).max())
        cause = (
            f"every block's output is finite, but values reach |x| = {largest:.3g}, beyond "
            f"{spec.storage.dtype}'s range (storage.dtype: float32 keeps them)"
        )
    else:
        module = spec.block_table[first - 1].module
        cause = f"the first block whose output is not finite is block {first} ({module})"
    return (
        f"the model's features are not finite: at t={t} on the dataset's first image, {name} holds {what}; "
        f"{cause}. Check the checkpoint's weights; {OPT_OUT}"
    )


def refuse_nonfinite_model(spec: Spec, model: torch.nn.Module, source: ImageSource, device: torch.device) -> None:
    """Raise NonFiniteFeatures when `model_problem` finds one."""
    problem = model_problem(spec, model, source, device)
    if problem:
        raise NonFiniteFeatures(problem)
