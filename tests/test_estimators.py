"""scikit-learn-style probes: API conventions, labels, agreement with LogisticRegression, streams, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from probe.estimators import AttentionProbe, DifFormerProbe, LinearProbe
from probe.stream import ArrayStream

FAST = dict(epochs=6, step_size=5, lr=0.05, momentum=0.9, batch_size=64, random_state=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def blobs(n: int, seed: int, dim: int = 20, num_classes: int = 3, shift: float = 1.2):
    means = np.random.default_rng(7).normal(size=(num_classes, dim)) * shift / np.sqrt(dim) * 2
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    return (rng.normal(size=(n, dim)) + means[y]).astype(np.float32), y


def test_sklearn_conventions() -> None:
    probe = LinearProbe(lr=0.3, epochs=4)
    assert probe.get_params()["lr"] == 0.3 and probe.get_params()["batchnorm"] is False
    cloned = clone(probe.set_params(epochs=5))
    assert cloned.get_params() == probe.get_params() and cloned is not probe
    attention = AttentionProbe(preset="tiny", dim=32)
    assert clone(attention).get_params()["dim"] == 32
    x, y = blobs(50, 0)
    for unfitted in (probe, attention, DifFormerProbe()):
        with pytest.raises(NotFittedError):
            unfitted.predict(x)
    with pytest.raises(ValueError, match="Invalid parameter"):
        probe.set_params(learning_rate=1)


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "emu"]), np.array([3, 7, 9])])
def test_arbitrary_label_values(labels) -> None:
    x, y = blobs(300, 0)
    probe = LinearProbe(**FAST).fit(x, labels[y])
    assert list(probe.classes_) == sorted(labels.tolist())
    pred = probe.predict(x)
    assert set(pred) <= set(labels) and probe.score(x, labels[y]) > 0.8
    proba = probe.predict_proba(x)
    assert proba.shape == (300, 3) and np.allclose(proba.sum(1), 1)
    assert np.array_equal(probe.classes_[proba.argmax(1)], pred)
    assert probe.decision_function(x).shape == (300, 3)
    # binary: scikit-learn's 1-d decision function, positive = classes_[1]
    binary = LinearProbe(**FAST).fit(x, np.where(y == 0, "no", "yes"))
    scores = binary.decision_function(x)
    assert scores.shape == (300,) and np.array_equal(np.where(scores > 0, "yes", "no"), binary.predict(x))


def test_linear_probe_agrees_with_logistic_regression() -> None:
    x, y = blobs(2000, 0, shift=1.0)
    xt, yt = blobs(4000, 1, shift=1.0)
    ours = (
        LinearProbe(standardize=True, lr=0.05, momentum=0.9, epochs=20, step_size=14, batch_size=64, random_state=0)
        .fit(x, y)
        .score(xt, yt)
    )
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(x, y).score(xt, yt)
    assert 0.6 < reference < 0.97  # a problem where the two could disagree
    assert abs(ours - reference) <= 0.01, (ours, reference)


def test_random_state_reproducible_and_validation_selects_best_epoch() -> None:
    x, y = blobs(400, 0)
    xv, yv = blobs(200, 1)
    a = LinearProbe(**FAST).fit(x, y, xv, yv)
    b = LinearProbe(**FAST).fit(x, y, xv, yv)
    assert np.array_equal(a.predict_proba(x), b.predict_proba(x))
    assert a.best_val_accuracy_ == max(r["val_accuracy"] for r in a.history_)
    assert a.history_[a.best_epoch_ - 1]["val_accuracy"] == a.best_val_accuracy_  # epochs count from 1
    c = LinearProbe(**(FAST | {"random_state": 1})).fit(x, y)
    assert not np.array_equal(a.predict_proba(x), c.predict_proba(x))


def test_standardize_uses_training_statistics_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3, 2, 2)).astype(np.float32) * np.array([1, 10, 100], np.float32)[None, :, None, None] + 5
    y = rng.integers(0, 2, 200)
    probe = LinearProbe(standardize=True, **FAST).fit(x, y)
    assert probe.mean_["x"].shape == (1, 3, 1, 1)
    np.testing.assert_allclose(probe.mean_["x"].ravel(), x.mean((0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(probe.scale_["x"].ravel(), x.std((0, 2, 3)), rtol=1e-4)
    with pytest.raises(ValueError, match="per-sample shape"):
        probe.predict(x[:, :2])


def test_attention_probe_on_block_maps() -> None:
    from test_heads import localized_tokens

    x, y = localized_tokens(1024, seed=0)
    xt, yt = localized_tokens(512, seed=1)
    labels = np.array(["a", "b", "c", "d"])
    probe = AttentionProbe(
        preset=None,
        dim=32,
        heads=2,
        depth=1,
        epochs=10,
        step_size=10,
        lr=0.05,
        momentum=0.9,
        batch_size=64,
        random_state=0,
    ).fit(x, labels[y])
    assert probe.score(xt, labels[yt]) >= 0.8
    assert probe.input_shape_ == (8, 4, 4) and probe.n_features_in_ == 128


def test_difformer_probe_on_timestep_block_dict() -> None:
    x, y = blobs(600, 0, dim=16)
    xt, yt = blobs(300, 1, dim=16)
    rng = np.random.default_rng(0)

    def grid(a):  # class signal in (150, 24) only; other maps are noise of different shapes
        n = len(a)
        return {
            (90, 24): rng.normal(size=(n, 16, 1, 1)),
            (150, 24): a.reshape(n, 16, 1, 1),
            (90, 19): rng.normal(size=(n, 2, 1, 1)),
            (150, 19): rng.normal(size=(n, 2, 1, 1)),
        }

    probe = DifFormerProbe(preset="tiny", dim=16, standardize=True, **(FAST | {"epochs": 5})).fit(grid(x), y)
    assert probe.score(grid(xt), yt) > 0.8
    assert probe.timesteps_ == [90, 150] and set(probe.blocks_) == {24, 19}
    bad = grid(xt)
    del bad[(90, 19)]
    with pytest.raises(ValueError, match="every \\(t, block\\) pair"):
        probe.predict(bad)


def test_fit_stream_out_of_core_matches_label_encoding() -> None:
    x, y = blobs(400, 0)
    classes = np.array([10, 20, 30])
    stream = ArrayStream({"t090_b24_avg2": x}, y, batch_size=64, seed=0)
    probe = LinearProbe(**FAST).fit_stream(stream, classes=classes)
    assert probe.score(x, classes[y]) > 0.8 and probe.input_ == "t090_b24_avg2"
    with pytest.raises(ValueError, match="standardize"):
        LinearProbe(standardize=True).fit_stream(stream, classes=classes)
    two = ArrayStream({"a": x, "b": x}, y)
    with pytest.raises(ValueError, match="input="):
        LinearProbe(**FAST).fit_stream(two, classes=classes)
    with pytest.raises(ValueError, match="input"):
        DifFormerProbe().fit_stream(two, classes=classes)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(lr=0), "lr must be"),
        (dict(lr="fast"), "lr must be"),
        (dict(epochs=0), "epochs must be"),
        (dict(batch_size=1.5), "batch_size must be"),
        (dict(gamma=0), "gamma must be"),
        (dict(momentum=-1), "momentum must be"),
        (dict(standardize="yes"), "standardize must be"),
        (dict(batchnorm=1), "batchnorm must be"),
        (dict(random_state="seed"), "random_state must be"),
        (dict(resume=True), "checkpoint_dir"),
    ],
)
def test_bad_parameters_fail_in_fit(params, match) -> None:
    probe = LinearProbe(**params)  # __init__ only stores
    x, y = blobs(20, 0)
    with pytest.raises(ValueError, match=match):
        probe.fit(x, y)


def test_bad_inputs_and_transformer_params() -> None:
    x, y = blobs(40, 0)
    for probe, match in [
        (AttentionProbe(preset="huge"), "preset must be"),
        (AttentionProbe(preset=None, dim=30, heads=4, depth=1), "divisible"),
        (AttentionProbe(preset=None, dim=32), "heads, depth must be given"),
        (AttentionProbe(preset="tiny", heads=0), "heads must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            probe.fit(x, y)
    probe = LinearProbe(**FAST)
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe.fit(x, np.zeros(40))
    with pytest.raises(ValueError, match="NaN"):
        probe.fit(np.full_like(x, np.nan), y)
    with pytest.raises(ValueError, match="samples"):
        probe.fit(x, y[:-1])
    with pytest.raises(ValueError, match="shape"):
        probe.fit(x[:, :, None], y)
    with pytest.raises(ValueError, match="both X_val and y_val"):
        probe.fit(x, y, X_val=x)
    with pytest.raises(ValueError, match="absent from y"):
        probe.fit(x, y, x, y + 5)
    with pytest.raises(ValueError, match="DifFormer|dict"):
        DifFormerProbe(preset="tiny").fit(x, y)
