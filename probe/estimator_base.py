"""The scikit-learn contract the probe estimators share (`probe.estimators` holds the estimators themselves).

`_TorchProbe` implements fit / fit_stream / predict / predict_proba / decision_function / score for a torch
head: parameters validated in `fit` (the training settings by `probe.recipe.Recipe`), fitted attributes ending
in `_`, no state outside them. Subclasses declare their parameters in `__init__` (scikit-learn reads them from
the signature) and build the head.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .heads import seeded_init
from .recipe import Recipe
from .stream import ArrayStream, BatchStream
from .trainer import HeadResult, predict_logits, train

_SINGLE = "x"  # the feature name of the one array a Linear/Attention probe reads from an ArrayStream


def _fail(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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
    _head_kind = "linear"  # which of the recipe's heads this estimator trains

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
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _fail(name, "True or False", getattr(self, name))
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _fail("device", "a torch device such as 'cpu' or 'cuda:0'", self.device)
        if (
            self.random_state is not None
            and not _is_int(self.random_state)
            and not isinstance(self.random_state, np.random.RandomState)
        ):
            _fail("random_state", "None, an int or a numpy RandomState", self.random_state)
        self._check_own_params()

    def _seeds(self) -> tuple[int, int]:
        rs = check_random_state(self.random_state)
        init_seed, order_seed = rs.randint(0, 2**31 - 1, size=2)
        return int(init_seed), int(order_seed)

    # --- data ---------------------------------------------------------------------------------------------------
    def _arrays(self, X: Any, *, fitting: bool) -> dict[str, np.ndarray]:
        """X -> {feature name: float32 array}; checks shapes against the fitted ones when predicting."""
        X = np.asarray(X)
        if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
            raise ValueError(f"X must be a numeric array, got dtype {X.dtype}")
        if X.ndim not in (2, 4):
            raise ValueError(f"X must have shape (N, C, H, W) or (N, D), got {X.shape}")
        X = X.astype(np.float32, copy=False)
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinity")
        if not fitting and tuple(X.shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {tuple(X.shape[1:])}, the probe was fitted on {self.input_shape_}"
            )
        return {_SINGLE: X}

    def _n_samples(self, arrays: Mapping[str, np.ndarray]) -> int:
        return next(iter(arrays.values())).shape[0]

    def _input_spec(self) -> Any:
        return _SINGLE

    def _shapes(self, arrays: Mapping[str, np.ndarray]) -> Any:
        return tuple(arrays[_SINGLE].shape[1:])

    def _fit_standardizer(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.mean_, self.scale_ = {}, {}
        for name, a in arrays.items():
            axes = (0, 2, 3) if a.ndim == 4 else (0,)
            # float64 accumulation: float32 sums over many samples lose digits.
            mean = a.mean(axis=axes, dtype=np.float64)
            std = a.std(axis=axes, dtype=np.float64)
            std[std == 0] = 1.0  # constant channel: centre it, do not blow it up
            shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1)
            self.mean_[name] = mean.astype(np.float32).reshape(shape)
            self.scale_[name] = std.astype(np.float32).reshape(shape)

    def _standardized(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not getattr(self, "standardize_fitted_", False):
            return arrays
        return {k: (a - self.mean_[k]) / self.scale_[k] for k, a in arrays.items()}

    # --- fitting ------------------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> _TorchProbe:
        """Train the head on (X, y); with (X_val, y_val), keep the best validation epoch's weights."""
        self._validate_params()
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        arrays = self._arrays(X, fitting=True)
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-d, got shape {y.shape}")
        n = self._n_samples(arrays)
        if y.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {y.shape[0]}")
        check_classification_targets(y)
        classes, y_idx = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(f"y must contain at least 2 classes, got {classes.size}")
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
            y_val = np.asarray(y_val)
            if y_val.ndim != 1 or y_val.shape[0] != self._n_samples(val_arrays):
                raise ValueError(f"y_val must be 1-d with one label per X_val sample, got shape {y_val.shape}")
            unknown = np.setdiff1d(y_val, classes)
            if unknown.size:
                raise ValueError(f"y_val holds labels absent from y: {unknown[:10].tolist()}")
            val_stream = ArrayStream(
                val_arrays, np.searchsorted(classes, y_val), batch_size=max(batch_size, 256), shuffle=False
            )
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
        classes = np.asarray(classes)
        if classes.ndim != 1 or classes.size < 2 or np.unique(classes).size != classes.size:
            raise ValueError("classes must be a 1-d sequence of at least 2 distinct label values")
        input = self._stream_input(train_stream, input)
        first = next(iter(_first_batch(train_stream)))
        shapes = self._shapes_from_batch(first, input)
        self.classes_ = classes
        self.standardize_fitted_ = False
        self._set_stream_input_attrs(shapes)
        init_seed, _ = self._seeds()
        return self._fit_streams(train_stream, val_stream, shapes, init_seed, input)

    def _stream_input(self, stream: BatchStream, input: Any) -> Any:
        if input is None:
            xs = next(iter(_first_batch(stream)))
            if len(xs) != 1:
                raise ValueError(f"the stream carries features {sorted(xs)}; pass input=<feature name>")
            return next(iter(xs))
        if not isinstance(input, str):
            _fail("input", "a feature name (str)", input)
        return input

    def _shapes_from_batch(self, xs: Mapping[str, torch.Tensor], input: Any) -> Any:
        if input not in xs:
            raise ValueError(f"feature {input!r} not in the stream (it has {sorted(xs)})")
        return tuple(xs[input].shape[1:])

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
        result: HeadResult = train(
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


def _first_batch(stream: BatchStream):
    stream.set_epoch(0)
    for xs, _ in stream:
        yield xs
        return
    raise ValueError("stream yielded no samples")
