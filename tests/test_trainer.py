"""The trainer: learning with the paper's recipe, determinism, many heads per pass, checkpoints, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from probe_data_fixtures import FEAT, draw_of, write_draws_store

from probe.data import ProbeData
from probe.evaluation import evaluate, predict_logits, predict_logits_to_file
from probe.heads import DifFormerHead, LinearHead, seeded_init
from probe.optimizer import build_optimizer
from probe.recipe import Recipe
from probe.stream import ArrayStream, BatchStream, FeatureStream
from probe.trainer import train, train_many


def subspace_classes(n: int, seed: int, dim: int = 64, informative: int = 3, num_classes: int = 3):
    """Gaussian classes separated only inside a random `informative`-dim subspace of `dim` noise dimensions."""
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, informative)))[0]
    means = np.random.default_rng(98).normal(size=(num_classes, informative)) * 2.5
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.normal(size=(n, dim)) + (means[y] + 0.5 * rng.normal(size=(n, informative))) @ basis.T * 1.0
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    x, y = subspace_classes(1200, seed=0)
    xv, yv = subspace_classes(600, seed=1)
    xt, yt = subspace_classes(600, seed=2)
    return x, y, xv, yv, xt, yt


def streams(data, *, features=None, batch_size=64, seed=0):
    x, y, xv, yv, xt, yt = data
    features = features or {"f": lambda a: a}
    make = lambda a: {k: f(a) for k, f in features.items()}  # noqa: E731
    return (
        ArrayStream(make(x), y, batch_size=batch_size, seed=seed),
        ArrayStream(make(xv), yv, batch_size=256, shuffle=False),
        ArrayStream(make(xt), yt, batch_size=256, shuffle=False),
    )


def linear(seed: int = 0, dim: int = 64, classes: int = 3) -> LinearHead:
    with seeded_init(seed):
        return LinearHead(dim, classes)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Interrupt(Exception):
    pass


def stop_after_two(epoch, rows):
    """An `on_epoch_end` that stops training after two epochs (as a crash would)."""
    if epoch == 1:
        raise Interrupt


def states_close(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal up to float32 rounding: fused linear heads share matmuls, so they may differ in the last bits."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6) for k in sa)


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    """Same epochs, lrs, accuracies and divergence flags; losses equal to float32 rounding."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key.endswith("loss") and ra[key] is not None and rb[key] is not None:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key
            else:
                assert ra[key] == rb[key], key


def test_array_stream_is_a_batch_stream_and_seeded_per_epoch() -> None:
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    s = ArrayStream({"a": x}, y, batch_size=4, seed=3)
    assert isinstance(s, BatchStream) and s.num_samples == 10 and len(s) == 3
    order = lambda st, e: (st.set_epoch(e), torch.cat([b for _, b in st]))[1]  # noqa: E731
    e0, e1 = order(s, 0), order(s, 1)
    assert sorted(e0.tolist()) == list(range(10)) and not torch.equal(e0, e1)
    assert torch.equal(order(ArrayStream({"a": x}, y, batch_size=4, seed=3), 1), e1)  # no dependence on history
    xs, yb = next(iter(s))
    assert xs["a"].dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.equal(xs["a"][:, 0] / 2, yb.float())  # rows stay paired with their labels
    assert ArrayStream({"a": x}, y, batch_size=4, drop_last=True).num_samples == 8
    with pytest.raises(ValueError, match="batch_size"):
        ArrayStream({"a": x}, y, batch_size=0)
    with pytest.raises(ValueError, match="feature 'a'"):
        ArrayStream({"a": x[:5]}, y)


def test_linear_head_learns_a_buried_subspace_and_shuffled_labels_do_not(data) -> None:
    train_s, val_s, test_s = streams(data)
    head = linear()
    assert evaluate({"h": head}, {"h": "f"}, test_s)["h"][1] < 0.5  # chance (3 classes) before training
    result = train(head, train_s, val_s, test_s, lr=0.05, momentum=0.9, epochs=8, step_size=6, progress=False)
    assert result.test_accuracy >= 0.85
    assert result.val_accuracy == max(row["val_accuracy"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val_accuracy"] == result.val_accuracy  # epochs count from 1
    assert [row["epoch"] for row in result.history] == list(range(1, 9))

    x, y, *_ = data
    shuffled = ArrayStream({"f": x}, np.random.default_rng(0).permutation(y), batch_size=64, seed=0)
    control = train(linear(), shuffled, None, test_s, lr=0.05, momentum=0.9, epochs=8, step_size=6, progress=False)
    assert control.test_accuracy < 0.5


def test_paper_recipe_defaults(data) -> None:
    recipe = Recipe()  # the one place the defaults are declared
    assert (recipe.epochs, recipe.step_size, recipe.gamma) == (28, 7, 0.1)
    assert (recipe.momentum, recipe.weight_decay) == (0.0, 0.0)
    # ... and what the trainer builds from it
    optimizer, scheduler = build_optimizer([linear(), linear(1)], [0.01, 0.1], recipe)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.01, 0.0, 0.0),
        (0.1, 0.0, 0.0),
    ]
    assert (scheduler.step_size, scheduler.gamma) == (7, 0.1)
    train_s, _, _ = streams(data)
    assert len(train(linear(), train_s, lr=0.05, progress=False).history) == 28


def test_learning_rate_steps_down_by_gamma(data) -> None:
    train_s, _, _ = streams(data)
    result = train(linear(), train_s, lr=0.1, epochs=5, step_size=2, gamma=0.1, progress=False)
    assert [round(r["lr"], 12) for r in result.history] == [0.1, 0.01, 0.01, 0.001, 0.001]
    assert result.best_epoch == 5 and result.val_accuracy is None  # the last of 5, counted from 1


def test_same_seed_same_weights_and_different_seed_different(data) -> None:
    heads = []
    for init_seed, order_seed in [(0, 0), (0, 0), (0, 1)]:
        train_s, _, _ = streams(data, seed=order_seed)
        head = linear(init_seed)
        train(head, train_s, lr=0.05, epochs=2, progress=False)
        heads.append(head)
    assert states_equal(heads[0], heads[1])
    assert not states_equal(heads[0], heads[2])


def test_many_heads_in_one_pass_equal_separate_runs(data) -> None:
    features = {"f": lambda a: a, "g": lambda a: a[:, :32] * 2}
    keys = [("f", 0.01), ("f", 0.1), ("g", 0.05)]
    build = lambda: {k: linear(i, 64 if k[0] == "f" else 32) for i, k in enumerate(keys)}  # noqa: E731
    train_s, val_s, test_s = streams(data, features=features)
    together = build()
    sweep = train_many(
        together,
        {k: k[0] for k in keys},
        train_s,
        val_s,
        test_s,
        lrs={k: k[1] for k in keys},
        epochs=3,
        step_size=2,
        progress=False,
    )
    for k in keys:
        alone = build()[k]
        train_s, val_s, test_s = streams(data, features={k[0]: features[k[0]]})
        single = train(alone, train_s, val_s, test_s, input=k[0], lr=k[1], epochs=3, step_size=2, progress=False)
        # ("f", 0.01) and ("f", 0.1) train fused (one bank), ("g", 0.05) on its own: exact for the latter.
        assert (states_close if k[0] == "f" else states_equal)(alone, together[k]), k
        assert_same_history(single.history, sweep.heads[k].history)
        assert single.test_accuracy == sweep.heads[k].test_accuracy
    # selection: the best lr per feature and overall, by validation accuracy
    f_best = max([("f", 0.01), ("f", 0.1)], key=lambda k: sweep.heads[k].val_accuracy)
    assert sweep.best_per_input["f"] == f_best and sweep.best_per_input["g"] == ("g", 0.05)
    assert sweep.best == max(keys, key=lambda k: sweep.heads[k].val_accuracy)
    assert {row["input"] for row in sweep.rows()} == {"f", "g"}


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_fused_linear_heads_equal_separate_runs(data, momentum, weight_decay) -> None:
    # Three lrs on one feature fuse into one bank; each head must end as it does trained alone.
    lrs = {"a": 0.01, "b": 0.2, "c": 0.05}
    kwargs = dict(epochs=4, step_size=2, momentum=momentum, weight_decay=weight_decay, progress=False)
    fused = {k: linear(i) for i, k in enumerate(lrs)}
    sweep = train_many(fused, {k: "f" for k in lrs}, *streams(data), lrs=lrs, **kwargs)
    unfused = {k: linear(i) for i, k in enumerate(lrs)}
    plain = train_many(unfused, {k: "f" for k in lrs}, *streams(data), lrs=lrs, fuse=False, **kwargs)
    for i, (k, lr) in enumerate(lrs.items()):
        alone = linear(i)
        single = train(alone, *streams(data), lr=lr, **kwargs)
        assert states_close(alone, fused[k]), k
        assert states_equal(unfused[k], alone), k  # fuse=False is the per-head path, bit for bit
        assert_same_history(single.history, sweep.heads[k].history)
        assert (single.best_epoch, single.val_accuracy, single.test_accuracy) == (
            sweep.heads[k].best_epoch,
            sweep.heads[k].val_accuracy,
            sweep.heads[k].test_accuracy,
        )
        assert single.val_loss == pytest.approx(sweep.heads[k].val_loss, rel=1e-5)
        assert type(fused[k]) is LinearHead and fused[k].linear.weight.requires_grad
    assert sweep.best == plain.best and sweep.best_per_input == plain.best_per_input
    # Batched evaluation equals per-head evaluation.
    _, _, test_s = streams(data)
    together = evaluate(fused, {k: "f" for k in lrs}, test_s)
    apart = evaluate(fused, {k: "f" for k in lrs}, test_s, fuse=False)
    for k in lrs:
        assert together[k][1] == apart[k][1] and together[k][0] == pytest.approx(apart[k][0], rel=1e-5)


def test_fused_heads_resume_from_checkpoint(data, tmp_path) -> None:
    lrs = {"a": 0.01, "b": 0.1, "c": 0.05}
    kwargs = dict(lrs=lrs, momentum=0.9, weight_decay=1e-4, epochs=5, step_size=2, progress=False)
    reference = {k: linear(i) for i, k in enumerate(lrs)}
    ref = train_many(reference, {k: "f" for k in lrs}, *streams(data), **kwargs)

    with pytest.raises(Interrupt):
        train_many(
            {k: linear(i) for i, k in enumerate(lrs)},
            {k: "f" for k in lrs},
            *streams(data),
            checkpoint_dir=tmp_path,
            on_epoch_end=stop_after_two,
            **kwargs,
        )
    resumed = {k: linear(7) for k in lrs}  # other weights: the checkpoint must override them
    out = train_many(resumed, {k: "f" for k in lrs}, *streams(data), checkpoint_dir=tmp_path, resume=True, **kwargs)
    for k in lrs:
        got, want = resumed[k].state_dict(), reference[k].state_dict()
        assert got.keys() == want.keys() and not states_equal(resumed[k], linear(7)), k
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{k}.{name}")
        assert out.heads[k].best_epoch == ref.heads[k].best_epoch, k
        for a, b in zip(out.heads[k].history, ref.heads[k].history, strict=True):
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-6), k
            assert (a["epoch"], a["train_accuracy"], a["val_accuracy"]) == (b["epoch"], b["train_accuracy"], b["val_accuracy"])
    # A checkpoint of fused heads resumes on the per-head path too (same format): same result to rounding.
    with pytest.raises(Interrupt):
        train_many(
            {k: linear(i) for i, k in enumerate(lrs)},
            {k: "f" for k in lrs},
            *streams(data),
            checkpoint_dir=tmp_path / "x",
            on_epoch_end=stop_after_two,
            **kwargs,
        )
    mixed = {k: linear(7) for k in lrs}
    train_many(
        mixed, {k: "f" for k in lrs}, *streams(data), checkpoint_dir=tmp_path / "x", resume=True, fuse=False, **kwargs
    )
    assert all(states_close(mixed[k], reference[k]) for k in lrs)


def test_resume_from_checkpoint_equals_uninterrupted_run(data, tmp_path) -> None:
    kwargs = dict(lr=0.05, momentum=0.9, epochs=5, step_size=2, progress=False)  # momentum: optimizer state matters
    train_s, val_s, _ = streams(data)
    reference = linear()
    ref = train(reference, train_s, val_s, **kwargs)

    with pytest.raises(Interrupt):
        train(linear(), train_s, val_s, checkpoint_dir=tmp_path, on_epoch_end=stop_after_two, **kwargs)
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["epochs_done"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "state-0002.safetensors",
        "state.json",
    ]

    resumed_head = linear(seed=7)  # a different init: the checkpoint must override it
    resumed = train(resumed_head, train_s, val_s, checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert states_equal(resumed_head, reference)
    assert resumed.history == ref.history and resumed.best_epoch == ref.best_epoch

    with pytest.raises(FileExistsError, match="resume=True"):
        train(linear(), train_s, val_s, checkpoint_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="lrs differs"):
        train(linear(), train_s, val_s, checkpoint_dir=tmp_path, resume=True, **(kwargs | {"lr": 0.5}))


def test_diverging_head_is_stopped_without_stopping_the_sweep(data) -> None:
    train_s, val_s, _ = streams(data)
    x, *_ = data
    heads = {"ok": linear(), "wild": linear()}
    sweep = train_many(
        heads, {"ok": "f", "wild": "f"}, train_s, val_s, lrs={"ok": 0.05, "wild": 1e38}, epochs=3, progress=False
    )
    assert sweep.heads["wild"].diverged and not sweep.heads["ok"].diverged
    assert sweep.best == "ok"
    assert sweep.heads["ok"].val_accuracy > 0.8


def test_difformer_trains_on_dict_inputs(data) -> None:
    x, y, xv, yv, xt, yt = data

    # Two timesteps x one block; the class signal lives in t=150 only.
    def maps(a, t):
        signal = a[:, :16] if t == 150 else np.random.default_rng(t).normal(size=(len(a), 16))
        return signal.reshape(-1, 4, 2, 2)

    names = {(90, 24): "t090_b24", (150, 24): "t150_b24"}
    make = lambda a, yy, **kw: ArrayStream({n: maps(a, t) for (t, _), n in names.items()}, yy, **kw)  # noqa: E731
    with seeded_init(0):
        head = DifFormerHead({24: (4, 2, 2)}, [90, 150], 3, dim=16, heads=2, depth=1)
    result = train(
        head,
        make(x, y, batch_size=64),
        make(xv, yv, batch_size=256, shuffle=False),
        input=names,
        lr=0.05,
        momentum=0.9,
        epochs=4,
        progress=False,
    )
    assert result.val_accuracy > 0.6 and not result.diverged


def test_bad_parameters_are_named(data) -> None:
    train_s, _, _ = streams(data)
    for kwargs, match in [
        (dict(lr=0.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(epochs=0), "epochs must be"),
        (dict(epochs=2.5), "epochs must be"),
        (dict(step_size=0), "step_size must be"),
        (dict(gamma=-1.0), "gamma must be"),
        (dict(momentum=-0.1), "momentum must be"),
        (dict(weight_decay=-1), "weight_decay must be"),
        (dict(resume=True), "checkpoint_dir"),
    ]:
        with pytest.raises(ValueError, match=match):
            train(linear(), train_s, progress=False, **kwargs)
    with pytest.raises(ValueError, match="inputs_of"):
        train_many({"a": linear()}, {}, train_s, progress=False)
    with pytest.raises(ValueError, match="lrs has no"):
        train_many({"a": linear()}, {"a": "f"}, train_s, lrs={}, progress=False)
    two = ArrayStream({"f": data[0], "g": data[0]}, data[1])
    with pytest.raises(ValueError, match="input="):
        train(linear(), two, progress=False)


def test_a_misspelt_setting_is_a_type_error_naming_it(data) -> None:
    train_s, _, _ = streams(data)
    with pytest.raises(TypeError, match="epoch"):
        train(linear(), train_s, progress=False, epoch=1)
    with pytest.raises(TypeError, match="learning_rate"):
        train_many({"a": linear()}, {"a": "f"}, train_s, progress=False, learning_rate=0.1)


def test_progress_line_can_be_silenced(data, capsys, caplog) -> None:
    train_s, val_s, _ = streams(data)
    caplog.set_level("INFO", logger="probe.trainer")
    train(linear(), train_s, val_s, lr=0.05, epochs=1, progress=False)
    assert capsys.readouterr().err == "" and not caplog.records
    train(linear(), train_s, val_s, lr=0.05, epochs=1, progress=True)
    assert "epoch 1/1" in caplog.text  # status goes through logging (the CLI's -v/-q set its level)


def test_checkpoint_of_the_earlier_trainer_resumes(data, tmp_path) -> None:
    # tests/data/probe_checkpoint_v1: the per-head-optimizer trainer's format (diffbank.probe.train/1), written
    # by it for these heads and data, interrupted after 2 of 5 epochs. Its two stored epochs were computed on
    # another machine, whose matmul kernels round differently (1e-7 relative on an AVX-512 Xeon without
    # AVX512-BF16): weights and losses are compared within float32 tolerance, accuracies and choices exactly.
    import shutil
    from pathlib import Path

    lrs = {"a": 0.01, "b": 0.1, "c": 0.05}
    kwargs = dict(lrs=lrs, momentum=0.9, weight_decay=1e-4, epochs=5, step_size=2, progress=False)
    reference = {k: linear(i) for i, k in enumerate(lrs)}
    ref = train_many(reference, {k: "f" for k in lrs}, *streams(data)[:2], **kwargs)
    shutil.copytree(Path(__file__).parent / "data" / "probe_checkpoint_v1", tmp_path / "ckpt")
    resumed = {k: linear(7) for k in lrs}
    out = train_many(
        resumed, {k: "f" for k in lrs}, *streams(data)[:2], checkpoint_dir=tmp_path / "ckpt", resume=True, **kwargs
    )
    for k in lrs:
        got, want = resumed[k].state_dict(), reference[k].state_dict()
        assert got.keys() == want.keys() and not states_equal(resumed[k], linear(7)), k
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=f"{k}.{name}")
        assert out.heads[k].best_epoch == ref.heads[k].best_epoch, k
        for a, b in zip(out.heads[k].history, ref.heads[k].history, strict=True):
            assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-6), k
            assert (a["epoch"], a["train_accuracy"], a["val_accuracy"]) == (b["epoch"], b["train_accuracy"], b["val_accuracy"])


# -- noise draws as augmentation ------------------------------------------------------------------------------


class _DrawRecorder(torch.nn.Module):
    """A linear head that notes which noise draw every batch it sees came from, and in which mode."""

    def __init__(self, in_shape, classes: int) -> None:
        super().__init__()
        self.head = LinearHead(in_shape, classes)
        self.seen: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("train" if self.training else "eval", draw_of(x)))
        return self.head(x)


def test_k3_store_trains_on_each_draw_in_rotation_and_evaluates_on_draw_0(tmp_path) -> None:
    """An instrumented run of the real trainer on a 3-draw store: epoch e trains on draw e mod 3 (every batch),
    validation and the final test read draw 0."""
    data = ProbeData.from_store(write_draws_store(tmp_path), [FEAT], standardize="none")
    with seeded_init(0):
        head = _DrawRecorder(data.feature_shapes[FEAT], data.num_classes)
    per_epoch: list[list[tuple[str, int]]] = []

    def cut(epoch, rows) -> None:
        per_epoch.append(list(head.seen))
        head.seen.clear()

    train(
        head,
        FeatureStream(data, "train", 16, shuffle=True),
        FeatureStream(data, "val", 64, shuffle=False),
        FeatureStream(data, "test", 64, shuffle=False),
        input=FEAT,
        epochs=7,
        lr=1e-4,
        progress=False,
        on_epoch_end=cut,
    )
    assert len(per_epoch) == 7
    for epoch, seen in enumerate(per_epoch):
        assert {d for mode, d in seen if mode == "train"} == {epoch % 3}, epoch
        assert {d for mode, d in seen if mode == "eval"} == {0}, epoch  # validation
        assert sum(mode == "train" for mode, _ in seen) == -(-len(data.rows("train")) // 16)
    assert head.seen and set(head.seen) == {("eval", 0)}  # the test pass after training


def test_mean_evaluation_averages_the_logits_over_the_draws(tmp_path) -> None:
    path = write_draws_store(tmp_path)
    data = ProbeData.from_store(path, [FEAT], standardize="none", eval_draws="mean")
    with seeded_init(0):
        head = _DrawRecorder(data.feature_shapes[FEAT], data.num_classes)
    averaged = predict_logits(head, FeatureStream(data, "test", 8, shuffle=False), FEAT)
    assert {d for _, d in head.seen} == {0, 1, 2}
    per_draw = [predict_logits(head, _draw_stream(path, d), FEAT) for d in range(3)]
    torch.testing.assert_close(averaged, sum(per_draw) / 3)
    # written batch by batch to disk (what a probe run saves): the same logits, and the head back in train mode
    head.train()
    scores = predict_logits_to_file(head, FeatureStream(data, "test", 8, shuffle=False), FEAT, tmp_path / "t.npy")
    assert head.training and scores.shape == tuple(averaged.shape)
    assert np.array_equal(np.load(scores.path), averaged.numpy())
    loss, acc = evaluate({"h": head}, {"h": FEAT}, FeatureStream(data, "test", 8, shuffle=False))["h"]
    y = torch.from_numpy(data.labels("test"))
    assert acc == pytest.approx(float((averaged.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(averaged, y)), rel=1e-5)


def _draw_stream(path, draw: int):
    """The test split of draw `draw` alone: a rotating stream set to an epoch that reads it."""
    stream = FeatureStream(
        ProbeData.from_store(path, [FEAT], standardize="none"), "test", 8, shuffle=False, draws="rotate"
    )

    class _Fixed:
        num_samples = stream.num_samples

        def set_epoch(self, epoch: int) -> None:
            stream.set_epoch(draw)

        def __iter__(self):
            return iter(stream)

    return _Fixed()
