"""scikit-learn-style probes: `LinearProbe`, `AttentionProbe`, `DifFormerProbe`.

They follow scikit-learn's conventions: every parameter is set in `__init__` and validated in `fit`; fitted
attributes end with `_`; `clone`, `get_params`/`set_params` work; labels may be any values (`classes_` holds
them sorted, as `np.unique` orders them); `predict`/`predict_proba`/`decision_function` before fitting raise
`NotFittedError`. Training is `probe.trainer.train`; parameter and input checks are
`probe.estimator_checks`.

Training settings: `recipe` names a `probe.recipe.Recipe` ("diffbank", the default, "paper" or "attentive"); `lr`,
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
with training statistics only (`probe.stats`, mode "channel"): per channel (over N, H, W) for 4-d inputs, per
feature for 2-d inputs; channels without spread are left unscaled.

Reproducibility: an int `random_state` fixes both the head's initial weights and the batch order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state as sklearn_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from probe.estimator_checks import (
    batch_shapes,
    check_classes,
    check_device,
    check_flag,
    check_random_state,
    encode_labels,
    encode_val_labels,
    first_batch,
    grid_arrays,
    grid_key,
    grid_stream_input,
    single_array,
    stream_feature,
    transformer_sizes,
)
from probe.evaluation import predict_logits
from probe.heads import AttentionPoolHead, DifFormerHead, HeadSizes, LinearHead, seeded_init
from probe.recipe import Recipe
from probe.stats import FeatureStats, array_stats
from probe.stream import ArrayStream, BatchStream
from probe.trainer import train

__all__ = ["LinearProbe", "AttentionProbe", "DifFormerProbe"]

_SINGLE = "x"  # the feature name of the one array a Linear/Attention probe reads from an ArrayStream
_SETTINGS = ("lr", "epochs", "batch_size", "step_size", "gamma", "momentum", "weight_decay")


class _TorchProbe(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic; subclasses declare their parameters in `__init__` and build the head."""

    # Filled by subclasses' __init__ (scikit-learn reads parameters from the signature).
    recipe: str
    lr: float | None
    epochs: int | None
    batch_size: int | None
    step_size: int | None
    gamma: float | None
    momentum: float | None
    weight_decay: float | None
    standardize: bool
    random_state: Any
    device: str
    verbose: bool
    checkpoint_dir: str | os.PathLike[str] | None
    resume: bool
    # Fitted: (C, H, W) of the one input feature; DifFormerProbe's is {(t, block): (C, H, W)}.
    input_shape_: Any
    _head_kind = "linear"  # which of the recipe's heads this estimator trains

    def _set_params(self, params: Mapping[str, Any]) -> None:
        """Store `__init__`'s arguments unchanged, as scikit-learn requires (they are checked in `fit`)."""
        for name, value in params.items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)

    # --- to be provided by subclasses -------------------------------------------------------------------------
    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def _check_own_params(self) -> None:
        pass

    # --- parameters ---------------------------------------------------------------------------------------------
    def _validate_params(self) -> None:
        # The training settings are the Recipe's to check; the rest are this estimator's own.
        self.recipe_ = Recipe.named(self.recipe, self._head_kind, **{k: getattr(self, k) for k in _SETTINGS})
        for name in ("standardize", "verbose", "resume"):
            check_flag(name, getattr(self, name))
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        check_device(self.device)
        check_random_state(self.random_state)
        self._check_own_params()

    def _seeds(self) -> tuple[int, int]:
        rs = sklearn_random_state(self.random_state)
        init_seed, order_seed = rs.randint(0, 2**31 - 1, size=2)
        return int(init_seed), int(order_seed)

    # --- data ---------------------------------------------------------------------------------------------------
    def _arrays(self, X: Any, *, fitting: bool) -> dict[str, np.ndarray]:
        """X -> {feature name: float32 array}; checks shapes against the fitted ones when predicting."""
        return {_SINGLE: single_array(X, None if fitting else self.input_shape_)}

    def _n_samples(self, arrays: Mapping[str, np.ndarray]) -> int:
        return next(iter(arrays.values())).shape[0]

    def _input_spec(self) -> Any:
        return _SINGLE

    def _shapes(self, arrays: Mapping[str, np.ndarray]) -> Any:
        return tuple(arrays[_SINGLE].shape[1:])

    def _fit_standardizer(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.stats_: dict[str, FeatureStats] = {
            n: array_stats(n, a, "channel", check_finite=False) for n, a in arrays.items()
        }
        # scikit-learn-style views of the statistics, broadcastable to a batch
        self.mean_ = {n: s.mean[np.newaxis] for n, s in self.stats_.items()}
        self.scale_ = {n: s.std[np.newaxis] for n, s in self.stats_.items()}

    def _standardized(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not getattr(self, "standardize_fitted_", False):
            return arrays
        return {k: self.stats_[k].apply(np.array(a, dtype=np.float32)) for k, a in arrays.items()}

    # --- fitting ------------------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> _TorchProbe:
        """Train the head on (X, y); with (X_val, y_val), keep the best validation epoch's weights."""
        self._validate_params()
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        arrays = self._arrays(X, fitting=True)
        classes, y_idx = encode_labels(y, self._n_samples(arrays))
        self.classes_ = classes
        self._set_input_attrs(arrays)
        self.standardize_fitted_ = False
        if self.standardize:
            self._fit_standardizer(arrays)
            self.standardize_fitted_ = True
            arrays = self._standardized(arrays)
        init_seed, order_seed = self._seeds()
        batch_size = self.recipe_.batch_size
        train_stream = ArrayStream(arrays, y_idx, batch_size=batch_size, shuffle=True, seed=order_seed)
        val_stream = None
        if X_val is not None:
            val_arrays = self._standardized(self._arrays(X_val, fitting=False))
            y_val_idx = encode_val_labels(y_val, self._n_samples(val_arrays), classes)
            val_stream = ArrayStream(val_arrays, y_val_idx, batch_size=max(batch_size, 256), shuffle=False)
        return self._fit_streams(train_stream, val_stream, self._shapes(arrays), init_seed, self._input_spec())

    def fit_stream(
        self,
        train_stream: BatchStream,
        val_stream: BatchStream | None = None,
        *,
        classes: Sequence[Any] | np.ndarray,
        input: Any = None,
    ) -> _TorchProbe:
        """Train from a `BatchStream` (out-of-core). Its labels are indices into `classes` (label values).

        `input` names the feature the head reads (None: the stream's only feature); for `DifFormerProbe` it is
        required: {(t, block): feature name}. Prediction afterwards takes arrays as `fit` does.
        """
        self._validate_params()
        if self.standardize:
            raise ValueError("standardize=True is not supported by fit_stream: let the stream standardise its batches")
        classes = check_classes(classes)
        input = self._stream_input(train_stream, input)
        first = first_batch(train_stream)
        shapes = self._shapes_from_batch(first, input)
        self.classes_ = classes
        self.standardize_fitted_ = False
        self._set_stream_input_attrs(shapes)
        init_seed, _ = self._seeds()
        return self._fit_streams(train_stream, val_stream, shapes, init_seed, input)

    def _stream_input(self, stream: BatchStream, input: Any) -> Any:
        return stream_feature(stream, input)

    def _shapes_from_batch(self, xs: Mapping[str, torch.Tensor], input: Any) -> Any:
        return batch_shapes(xs, input)

    def _set_input_attrs(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._set_stream_input_attrs(self._shapes(arrays))

    def _set_stream_input_attrs(self, shapes: Any) -> None:
        self.input_shape_ = tuple(shapes)
        self.n_features_in_ = int(math.prod(shapes))

    def _fit_streams(
        self, train_stream: BatchStream, val_stream: BatchStream | None, shapes: Any, init_seed: int, input: Any
    ) -> _TorchProbe:
        with seeded_init(init_seed):
            head = self._build_head(shapes, len(self.classes_))
        result = train(
            head,
            train_stream,
            val_stream,
            input=input,
            recipe=self.recipe_,
            checkpoint_dir=self.checkpoint_dir,
            resume=bool(self.resume),
            progress=bool(self.verbose),
            device=self.device,
        )
        self.head_ = head.eval()
        self.input_ = input
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.best_val_accuracy_ = result.val_accuracy
        self.diverged_ = result.diverged
        return self

    # --- prediction ---------------------------------------------------------------------------------------------
    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "head_")
        arrays = self._standardized(self._arrays(X, fitting=False))
        n = self._n_samples(arrays)
        stream = ArrayStream(
            arrays, np.zeros(n, dtype=np.int64), batch_size=max(self.recipe_.batch_size, 256), shuffle=False
        )
        # Arrays are keyed by the probe's own names; map the fitted input onto them.
        return predict_logits(self.head_, stream, self._input_spec(), device=self.device).numpy()

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits (N, n_classes); for two classes, scikit-learn's (N,) score of classes_[1] (logit difference)."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        logits = torch.from_numpy(self._logits(X))
        return torch.softmax(logits.double(), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        logits = self._logits(X)  # checks fitted-ness before classes_ is touched
        return self.classes_[logits.argmax(axis=1)]


class LinearProbe(_TorchProbe):
    """Linear head (optionally BatchNorm1d without affine first); settings from `recipe` (lr 1e-2 in both)."""

    batchnorm: bool

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
        self._set_params(locals())

    def _check_own_params(self) -> None:
        check_flag("batchnorm", self.batchnorm)

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        return LinearHead(shapes, num_classes, batchnorm=bool(self.batchnorm))


class _TransformerProbe(_TorchProbe):
    """Parameters shared by the transformer heads (scikit-learn reads them from this `__init__`)."""

    preset: str | None
    dim: int | None
    heads: int | None
    depth: int | None
    final_norm: bool

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
        self._set_params(locals())

    def _check_own_params(self) -> None:
        self._transformer_sizes()

    def _transformer_sizes(self) -> HeadSizes:
        return transformer_sizes(self.preset, self.dim, self.heads, self.depth, self.final_norm)


class AttentionProbe(_TransformerProbe):
    """The paper's attention head. `preset` ("paper", "small", "tiny") sets dim/heads/depth; explicit
    `dim`/`heads`/`depth` override it. Settings from `recipe` (lr 5e-2 in both)."""

    _head_kind = "attention"

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        return AttentionPoolHead(shapes, num_classes, final_norm=bool(self.final_norm), **self._transformer_sizes())


class DifFormerProbe(_TransformerProbe):
    """DifFormer fusion over {(t, block): (N, C, H, W)} inputs; parameters as `AttentionProbe`."""

    _head_kind = "fusion"

    def _arrays(self, X: Any, *, fitting: bool) -> dict[str, np.ndarray]:
        arrays, timesteps, blocks = grid_arrays(X, None if fitting else self.input_shape_)
        if fitting:
            self._grid = (timesteps, blocks)  # consumed by _shapes/_set_input_attrs within this fit
        return arrays

    def _input_spec(self) -> Any:
        return {key: grid_key(key) for key in self.input_shape_}

    def _shapes(self, arrays: Mapping[str, np.ndarray]) -> Any:
        timesteps, blocks = self._grid
        return {(t, b): tuple(arrays[grid_key((t, b))].shape[1:]) for t in timesteps for b in blocks}

    def _set_stream_input_attrs(self, shapes: Any) -> None:
        self.input_shape_ = dict(shapes)
        self.timesteps_ = sorted({t for t, _ in shapes})
        self.blocks_ = list(dict.fromkeys(b for _, b in shapes))
        self.n_features_in_ = int(sum(math.prod(s) for s in shapes.values()))

    def _stream_input(self, stream: BatchStream, input: Any) -> Any:
        return grid_stream_input(input)

    def _shapes_from_batch(self, xs: Mapping[str, torch.Tensor], input: Any) -> Any:
        return batch_shapes(xs, input)

    def _build_head(self, shapes: Any, num_classes: int) -> nn.Module:
        timesteps = sorted({t for t, _ in shapes})
        blocks = list(dict.fromkeys(b for _, b in shapes))
        block_shapes = {b: shapes[(timesteps[0], b)] for b in blocks}
        return DifFormerHead(
            block_shapes, timesteps, num_classes, final_norm=bool(self.final_norm), **self._transformer_sizes()
        )
