"""scikit-learn-style probes: `LinearProbe`, `AttentionProbe`, `DifFormerProbe`.

They follow scikit-learn's conventions: every parameter is set in `__init__` and validated in `fit`; fitted
attributes end with `_`; `clone`, `get_params`/`set_params` work; labels may be any values (`classes_` holds
them sorted, as `np.unique` orders them); `predict`/`predict_proba`/`decision_function` before fitting raise
`NotFittedError`. Training is `probe.trainer.train`.

Training settings: `recipe` names a `probe.recipe.Recipe` ("diffbank", the default, or "paper"); `lr`,
`epochs`, `batch_size`, `step_size`, `gamma`, `momentum`, `weight_decay` left at None take the recipe's value,
set ones override it. They are validated in `fit` by the Recipe; the resolved recipe is `recipe_`.
Standardisation is this estimator's own `standardize` flag (default off), whatever the recipe says.

Inputs
- `LinearProbe`, `AttentionProbe`: X is an array (N, C, H, W) (a pooled block map) or (N, D). The linear head
  flattens it channel-major; the attention head makes H*W tokens (an (N, D) input is one 1x1 token).
- `DifFormerProbe`: X is a dict {(t, block): array (N, C_b, H_b, W_b)} covering every timestep x block pair;
  the block shapes must not depend on t. Prediction takes the same keys.
- Out-of-core: `fit_stream(train_stream, val_stream=None, *, classes, input=None)` trains from any
  `probe.stream.BatchStream` (e.g. the Zarr-backed stream of `probe/data.py`), whose labels are indices into
  `classes`. Standardisation is then the stream's job (`standardize=True` is refused there).

`X_val, y_val` in `fit` enable early selection: under the `diffbank` recipe the kept weights are those of the
epoch with the best validation accuracy (the `paper` recipe keeps the last epoch). `standardize=True` z-scores
with training statistics only: per channel (over N, H, W) for 4-d inputs, per feature for 2-d inputs;
constant channels are left unscaled.

Reproducibility: an int `random_state` fixes both the head's initial weights and the batch order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .estimator_base import _fail, _is_int, _TorchProbe
from .heads import PRESETS, AttentionPoolHead, DifFormerHead, LinearHead, resolve_preset
from .stream import BatchStream

__all__ = ["LinearProbe", "AttentionProbe", "DifFormerProbe"]


class LinearProbe(_TorchProbe):
    """Linear head (optionally BatchNorm1d without affine first); settings from `recipe` (lr 1e-2 in both)."""

    def __init__(
        self,
        *,
        recipe: str = "diffbank",
        batchnorm: bool = False,
        standardize: bool = False,
        lr: float | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        step_size: int | None = None,
        gamma: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        random_state: int | np.random.RandomState | None = None,
        device: str = "cpu",
        verbose: bool = False,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        self.recipe = recipe
        self.batchnorm = batchnorm
        self.standardize = standardize
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.step_size = step_size
        self.gamma = gamma
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume

    def _check_own_params(self) -> None:
        if not isinstance(self.batchnorm, (bool, np.bool_)):
            _fail("batchnorm", "True or False", self.batchnorm)

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        return LinearHead(shapes, num_classes, batchnorm=bool(self.batchnorm))


class _TransformerParams:
    preset: str | None
    dim: int | None
    heads: int | None
    depth: int | None
    final_norm: bool

    def _transformer_sizes(self) -> dict[str, int]:
        for name in ("dim", "heads", "depth"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < (0 if name == "depth" else 1)):
                _fail(name, "None or an int >= " + ("0" if name == "depth" else "1"), v)
        if self.preset is not None and self.preset not in PRESETS:
            _fail("preset", f"None or one of {sorted(PRESETS)}", self.preset)
        if not isinstance(self.final_norm, (bool, np.bool_)):
            _fail("final_norm", "True or False", self.final_norm)
        return resolve_preset(
            self.preset,
            None if self.dim is None else int(self.dim),
            None if self.heads is None else int(self.heads),
            None if self.depth is None else int(self.depth),
        )


class _TransformerProbe(_TransformerParams, _TorchProbe):
    """Parameters shared by the transformer heads (scikit-learn reads them from this `__init__`)."""

    def __init__(
        self,
        *,
        preset: str | None = "paper",
        dim: int | None = None,
        heads: int | None = None,
        depth: int | None = None,
        final_norm: bool = False,
        recipe: str = "diffbank",
        standardize: bool = False,
        lr: float | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        step_size: int | None = None,
        gamma: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        random_state: int | np.random.RandomState | None = None,
        device: str = "cpu",
        verbose: bool = False,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        self.preset = preset
        self.dim = dim
        self.heads = heads
        self.depth = depth
        self.final_norm = final_norm
        self.recipe = recipe
        self.standardize = standardize
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.step_size = step_size
        self.gamma = gamma
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume

    def _check_own_params(self) -> None:
        self._transformer_sizes()


class AttentionProbe(_TransformerProbe):
    """The paper's attention head. `preset` ("paper", "small", "tiny") sets dim/heads/depth; explicit
    `dim`/`heads`/`depth` override it. Settings from `recipe` (lr 5e-2 in both)."""

    _head_kind = "attention"

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        return AttentionPoolHead(shapes, num_classes, final_norm=bool(self.final_norm), **self._transformer_sizes())


def _feature_key(key: tuple[int, Hashable]) -> str:
    return f"t{key[0]}|b{key[1]}"


class DifFormerProbe(_TransformerProbe):
    """DifFormer fusion over {(t, block): (N, C, H, W)} inputs; parameters as `AttentionProbe`."""

    _head_kind = "fusion"

    def _arrays(self, X: Any, *, fitting: bool) -> dict[str, np.ndarray]:
        if not isinstance(X, Mapping) or not X:
            raise ValueError("X must be a non-empty dict {(t, block): array (N, C, H, W)}")
        arrays: dict[str, np.ndarray] = {}
        n = None
        for key, a in X.items():
            if not (isinstance(key, tuple) and len(key) == 2 and _is_int(key[0])):
                raise ValueError(f"X keys must be (t, block) pairs with an int t, got {key!r}")
            a = np.asarray(a)
            if a.ndim != 4 or not np.issubdtype(a.dtype, np.number):
                raise ValueError(
                    f"X[{key!r}] must be a numeric (N, C, H, W) array, got shape {a.shape}, dtype {a.dtype}"
                )
            if n is not None and a.shape[0] != n:
                raise ValueError(f"X[{key!r}] has {a.shape[0]} samples, other inputs have {n}")
            n = a.shape[0]
            a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise ValueError(f"X[{key!r}] contains NaN or infinity")
            arrays[_feature_key((int(key[0]), key[1]))] = a
        keys = [(int(k[0]), k[1]) for k in X]
        timesteps = sorted({t for t, _ in keys})
        blocks = list(dict.fromkeys(b for _, b in keys))
        grid = {(t, b) for t in timesteps for b in blocks}
        if grid != set(keys):
            raise ValueError(
                f"X must hold every (t, block) pair of timesteps {timesteps} x blocks {blocks}; missing {sorted(map(str, grid - set(keys)))}"
            )
        for b in blocks:
            shapes = {arrays[_feature_key((t, b))].shape[1:] for t in timesteps}
            if len(shapes) > 1:
                raise ValueError(f"block {b!r} has different shapes across timesteps: {sorted(shapes)}")
        if fitting:
            self._grid = (timesteps, blocks)  # consumed by _shapes/_set_input_attrs within this fit
        else:
            want = {k: tuple(v) for k, v in self.input_shape_.items()}
            got = {(int(k[0]), k[1]): tuple(np.shape(v)[1:]) for k, v in X.items()}
            if got != want:
                raise ValueError(f"X keys/shapes {got} differ from those the probe was fitted on {want}")
        return arrays

    def _input_spec(self) -> Any:
        return {key: _feature_key(key) for key in self.input_shape_}

    def _shapes(self, arrays: Mapping[str, np.ndarray]) -> Any:
        timesteps, blocks = self._grid
        return {(t, b): tuple(arrays[_feature_key((t, b))].shape[1:]) for t in timesteps for b in blocks}

    def _set_stream_input_attrs(self, shapes: Any) -> None:
        self.input_shape_ = dict(shapes)
        self.timesteps_ = sorted({t for t, _ in shapes})
        self.blocks_ = list(dict.fromkeys(b for _, b in shapes))
        self.n_features_in_ = int(sum(math.prod(s) for s in shapes.values()))

    def _stream_input(self, stream: BatchStream, input: Any) -> Any:
        if (
            not isinstance(input, Mapping)
            or not input
            or not all(
                isinstance(k, tuple) and len(k) == 2 and _is_int(k[0]) and isinstance(v, str) for k, v in input.items()
            )
        ):
            _fail("input", "a dict {(t, block): feature name} (required for DifFormerProbe.fit_stream)", input)
        return {(int(t), b): v for (t, b), v in input.items()}

    def _shapes_from_batch(self, xs: Mapping[str, torch.Tensor], input: Any) -> Any:
        missing = [v for v in input.values() if v not in xs]
        if missing:
            raise ValueError(f"features {missing} not in the stream (it has {sorted(xs)})")
        return {k: tuple(xs[v].shape[1:]) for k, v in input.items()}

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        timesteps = sorted({t for t, _ in shapes})
        blocks = list(dict.fromkeys(b for _, b in shapes))
        block_shapes = {b: shapes[(timesteps[0], b)] for b in blocks}
        return DifFormerHead(
            block_shapes, timesteps, num_classes, final_norm=bool(self.final_norm), **self._transformer_sizes()
        )
