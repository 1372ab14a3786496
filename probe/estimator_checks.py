"""What the scikit-learn estimators (`probe.estimators`) check before any training: parameters and inputs.

Each check raises `ValueError` naming the parameter or the input and what it must be.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets

from probe.heads import PRESETS, HeadSizes, resolve_preset
from probe.stream import BatchStream

__all__ = [
    "fail",
    "is_int",
    "check_flag",
    "check_device",
    "check_random_state",
    "transformer_sizes",
    "encode_labels",
    "encode_val_labels",
    "check_classes",
    "single_array",
    "grid_key",
    "grid_arrays",
    "first_batch",
    "stream_feature",
    "grid_stream_input",
    "batch_shapes",
]


def fail(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        fail(name, "True or False", value)


def check_device(device: Any) -> None:
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        fail("device", "a torch device such as 'cpu' or 'cuda:0'", device)


def check_random_state(random_state: Any) -> None:
    if random_state is not None and not is_int(random_state) and not isinstance(random_state, np.random.RandomState):
        fail("random_state", "None, an int or a numpy RandomState", random_state)


def transformer_sizes(
    preset: str | None, dim: int | None, heads: int | None, depth: int | None, final_norm: Any
) -> HeadSizes:
    """dim/heads/depth of a transformer head: `preset`'s, overridden by the explicit ones."""
    for name, v in (("dim", dim), ("heads", heads), ("depth", depth)):
        if v is not None and (not is_int(v) or v < (0 if name == "depth" else 1)):
            fail(name, "None or an int >= " + ("0" if name == "depth" else "1"), v)
    if preset is not None and preset not in PRESETS:
        fail("preset", f"None or one of {sorted(PRESETS)}", preset)
    check_flag("final_norm", final_norm)
    return resolve_preset(
        preset,
        None if dim is None else int(dim),
        None if heads is None else int(heads),
        None if depth is None else int(depth),
    )


def encode_labels(y: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """`y` checked against X's `n_samples`: (classes_, each label's index in classes_)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-d, got shape {y.shape}")
    if y.shape[0] != n_samples:
        raise ValueError(f"X has {n_samples} samples but y has {y.shape[0]}")
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"y must contain at least 2 classes, got {classes.size}")
    return classes, y_idx


def encode_val_labels(y_val: Any, n_samples: int, classes: np.ndarray) -> np.ndarray:
    """`y_val` checked against X_val's `n_samples` and the classes seen in y: each label's index in classes."""
    y_val = np.asarray(y_val)
    if y_val.ndim != 1 or y_val.shape[0] != n_samples:
        raise ValueError(f"y_val must be 1-d with one label per X_val sample, got shape {y_val.shape}")
    unknown = np.setdiff1d(y_val, classes)
    if unknown.size:
        raise ValueError(f"y_val holds labels absent from y: {unknown[:10].tolist()}")
    return np.searchsorted(classes, y_val)


def check_classes(classes: Any) -> np.ndarray:
    """The label values a stream's label indices point into, as a 1-d array of at least 2 distinct values."""
    classes = np.asarray(classes)
    if classes.ndim != 1 or classes.size < 2 or np.unique(classes).size != classes.size:
        raise ValueError("classes must be a 1-d sequence of at least 2 distinct label values")
    return classes


def single_array(X: Any, fitted_shape: tuple[int, ...] | None) -> np.ndarray:
    """X as a finite float32 (N, C, H, W) or (N, D) array; its per-sample shape must be `fitted_shape` if given."""
    X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ValueError(f"X must be a numeric array, got dtype {X.dtype}")
    if X.ndim not in (2, 4):
        raise ValueError(f"X must have shape (N, C, H, W) or (N, D), got {X.shape}")
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    if fitted_shape is not None and tuple(X.shape[1:]) != fitted_shape:
        raise ValueError(f"X has per-sample shape {tuple(X.shape[1:])}, the probe was fitted on {fitted_shape}")
    return X


def grid_key(key: tuple[int, Hashable]) -> str:
    """The feature name a (t, block) input of DifFormerProbe is served under."""
    return f"t{key[0]}|b{key[1]}"


def grid_arrays(
    X: Any, fitted_shapes: Mapping[tuple[int, Hashable], tuple[int, ...]] | None
) -> tuple[dict[str, np.ndarray], list[int], list[Hashable]]:
    """X = {(t, block): (N, C, H, W)} over a complete timestep x block grid, one shape per block, as float32
    arrays keyed by `grid_key`, with the grid's timesteps and blocks; the keys and shapes must be
    `fitted_shapes` if given."""
    if not isinstance(X, Mapping) or not X:
        raise ValueError("X must be a non-empty dict {(t, block): array (N, C, H, W)}")
    arrays: dict[str, np.ndarray] = {}
    n = None
    for key, a in X.items():
        if not (isinstance(key, tuple) and len(key) == 2 and is_int(key[0])):
            raise ValueError(f"X keys must be (t, block) pairs with an int t, got {key!r}")
        a = np.asarray(a)
        if a.ndim != 4 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"X[{key!r}] must be a numeric (N, C, H, W) array, got shape {a.shape}, dtype {a.dtype}")
        if n is not None and a.shape[0] != n:
            raise ValueError(f"X[{key!r}] has {a.shape[0]} samples, other inputs have {n}")
        n = a.shape[0]
        a = a.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"X[{key!r}] contains NaN or infinity")
        arrays[grid_key((int(key[0]), key[1]))] = a
    keys = [(int(k[0]), k[1]) for k in X]
    timesteps = sorted({t for t, _ in keys})
    blocks = list(dict.fromkeys(b for _, b in keys))
    grid = {(t, b) for t in timesteps for b in blocks}
    if grid != set(keys):
        raise ValueError(
            f"X must hold every (t, block) pair of timesteps {timesteps} x blocks {blocks}; missing {sorted(map(str, grid - set(keys)))}"
        )
    for b in blocks:
        shapes = {arrays[grid_key((t, b))].shape[1:] for t in timesteps}
        if len(shapes) > 1:
            raise ValueError(f"block {b!r} has different shapes across timesteps: {sorted(shapes)}")
    if fitted_shapes is not None:
        want = {k: tuple(v) for k, v in fitted_shapes.items()}
        got = {(int(k[0]), k[1]): tuple(np.shape(v)[1:]) for k, v in X.items()}
        if got != want:
            raise ValueError(f"X keys/shapes {got} differ from those the probe was fitted on {want}")
    return arrays, timesteps, blocks


def first_batch(stream: BatchStream) -> Mapping[str, torch.Tensor]:
    """The features of epoch 0's first batch of `stream`."""
    stream.set_epoch(0)
    for xs, _ in stream:
        return xs
    raise ValueError("stream yielded no samples")


def stream_feature(stream: BatchStream, input: Any) -> str:
    """The feature a single-input head reads from `stream`: `input`, or (None) the stream's only feature."""
    if input is None:
        xs = first_batch(stream)
        if len(xs) != 1:
            raise ValueError(f"the stream carries features {sorted(xs)}; pass input=<feature name>")
        return next(iter(xs))
    if not isinstance(input, str):
        fail("input", "a feature name (str)", input)
    return input


def grid_stream_input(input: Any) -> dict[tuple[int, Hashable], str]:
    """DifFormerProbe's {(t, block): feature name} for `fit_stream`."""
    if (
        not isinstance(input, Mapping)
        or not input
        or not all(
            isinstance(k, tuple) and len(k) == 2 and is_int(k[0]) and isinstance(v, str) for k, v in input.items()
        )
    ):
        fail("input", "a dict {(t, block): feature name} (required for DifFormerProbe.fit_stream)", input)
    return {(int(t), b): v for (t, b), v in input.items()}


def batch_shapes(xs: Mapping[str, torch.Tensor], input: str | Mapping[Any, str]) -> Any:
    """Per-sample shape of the feature `input` names in a batch; for a dict input, one per key."""
    names = [input] if isinstance(input, str) else list(input.values())
    missing = [v for v in names if v not in xs]
    if missing:
        if isinstance(input, str):
            raise ValueError(f"feature {input!r} not in the stream (it has {sorted(xs)})")
        raise ValueError(f"features {missing} not in the stream (it has {sorted(xs)})")
    if isinstance(input, str):
        return tuple(xs[input].shape[1:])
    return {k: tuple(xs[v].shape[1:]) for k, v in input.items()}
