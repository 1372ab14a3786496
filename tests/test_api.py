"""probe.run training settings: the SGD/StepLR recipe arguments, the attention/fusion lr sweep, typed options."""

import json
import math

import numpy as np
import pytest
from probe_data_fixtures import FEAT, write_draws_store
from safetensors.torch import load_file

from probe.errors import RunConflictError
from probe.logits import score_file_path
from probe.options import AttentionOptions, FusionOptions, LinearOptions, SweepOptions
from probe.recipe import ProbeConfigError
from probe.run import run_attention, run_fusion, run_linear, run_sweep

N, K = 120, 3
COMMANDS = {
    "run_linear": (run_linear, LinearOptions),
    "run_attention": (run_attention, AttentionOptions),
    "run_fusion": (run_fusion, FusionOptions),
    "run_sweep": (run_sweep, SweepOptions),
}


def _call(command, store, out, **settings):
    run, options = COMMANDS[command]
    return run(store, out, options(**settings))


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(n=N, k=K, dim=4, seed=1, n_train=96, class_names=["a", "b", "c"])


FAST = {"epochs": 2, "batch_size": 32, "progress": False}
LINEAR = {"features": ["t090_b24_avg1"], "lr": 0.1, **FAST}


def _weights(out, name="head.safetensors"):
    return load_file(str(out / name))


def test_default_recipe_is_the_papers_and_recorded(store, tmp_path):
    # score files a run killed while it evaluated left behind: the next run in the directory removes them
    (tmp_path / "a").mkdir()
    for split in ("val", "test"):
        score_file_path(tmp_path / "a", 0, split).write_bytes(b"partial")
    doc = run_linear(store, tmp_path / "a", LinearOptions(**LINEAR))
    assert not list((tmp_path / "a").glob(".*_logits.npy"))
    cfg = doc["config"]
    assert cfg["optimizer"] == "SGD(momentum=0, weight_decay=0)"  # the strings older runs recorded
    assert cfg["schedule"] == "StepLR(step_size=7, gamma=0.1)"
    assert (cfg["momentum"], cfg["weight_decay"], cfg["step_size"], cfg["gamma"]) == (0.0, 0.0, 7, 0.1)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"] == cfg


@pytest.mark.parametrize("setting", [{"momentum": 0.9}, {"weight_decay": 0.05}])
def test_optimizer_settings_are_recorded_and_used(store, tmp_path, setting):
    base = run_linear(store, tmp_path / "base", LinearOptions(**LINEAR))
    doc = run_linear(store, tmp_path / "other", LinearOptions(**LINEAR, **setting))
    ((key, value),) = setting.items()
    assert doc["config"][key] == value
    assert f"{key}={value}" in doc["config"]["optimizer"]
    saved = json.loads((tmp_path / "other" / "results.json").read_text())["config"]
    assert saved[key] == value
    a, b = _weights(tmp_path / "base"), _weights(tmp_path / "other")
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # same seed, other weights
    # the same settings again reproduce the weights exactly: the difference is the setting, not noise
    run_linear(store, tmp_path / "again", LinearOptions(**LINEAR, **setting))
    c = _weights(tmp_path / "again")
    assert all(np.array_equal(b[k].numpy(), c[k].numpy()) for k in b)
    assert base["config"][key] == 0.0


def test_schedule_settings_are_recorded_and_used(store, tmp_path):
    doc = run_linear(store, tmp_path / "s", LinearOptions(**LINEAR, step_size=1, gamma=0.5))
    assert doc["config"]["schedule"] == "StepLR(step_size=1, gamma=0.5)"
    assert (doc["config"]["step_size"], doc["config"]["gamma"]) == (1, 0.5)
    # the lr after each epoch's scheduler step: halved every epoch
    assert [row["lr"] for row in doc["training"]["history"]] == pytest.approx([0.05, 0.025])


def test_sweep_takes_the_recipe(store, tmp_path):
    doc = run_sweep(
        store,
        tmp_path / "sw",
        SweepOptions(features=["t090_b24_avg1"], lrs=[0.01, 0.1], momentum=0.5, step_size=1, gamma=0.5, **FAST),
    )
    assert doc["config"]["optimizer"] == "SGD(momentum=0.5, weight_decay=0)"
    assert doc["config"]["schedule"] == "StepLR(step_size=1, gamma=0.5)"
    for record in doc["training"].values():
        assert record["history"][-1]["lr"] == pytest.approx(record["lr"] * 0.25)


def test_changed_recipe_in_the_same_out_dir_is_a_conflict(store, tmp_path):
    run_linear(store, tmp_path / "r", LinearOptions(**LINEAR))
    again = run_linear(store, tmp_path / "r", LinearOptions(**LINEAR))  # the same settings resume
    assert len(again["training"]["history"]) == 2
    with pytest.raises(RunConflictError, match="optimizer"):
        run_linear(store, tmp_path / "r", LinearOptions(**LINEAR, momentum=0.9))


BAD = [
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": math.nan}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"step_size": 0}, "step_size"),
    ({"step_size": 2.5}, "step_size"),
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"momentum": True}, "momentum"),
]


@pytest.mark.parametrize("command", ["run_linear", "run_attention", "run_fusion", "run_sweep"])
@pytest.mark.parametrize("kwargs,name", BAD)
def test_bad_settings_name_the_parameter_before_reading_data(tmp_path, command, kwargs, name):
    out = tmp_path / "out"
    # the store does not exist: reaching the data would raise something else
    with pytest.raises(ValueError, match=rf"^{name} must") as info:
        _call(command, str(tmp_path / "missing.zarr"), out, **kwargs)
    assert isinstance(info.value, ProbeConfigError)
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("typo", ["epoch", "learning_rate", "batchsize"])
def test_a_misspelt_option_is_a_type_error_naming_it(command, typo):
    with pytest.raises(TypeError, match=typo):
        _call(command, "unused.zarr", "unused", **{typo: 1})


@pytest.mark.parametrize(
    "options,option", [(AttentionOptions, "batchnorm"), (SweepOptions, "lr"), (SweepOptions, "preset")]
)
def test_an_option_of_another_command_is_a_type_error_naming_it(options, option):
    with pytest.raises(TypeError, match=option):
        options(**{option: 1})


@pytest.mark.parametrize("command", ["run_attention", "run_fusion"])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.1, "lrs": [0.1, 0.2]}, "lr or lrs"),
        ({"lrs": []}, "lrs"),
        ({"lrs": [0.1, -1.0]}, "lrs"),
        ({"lrs": 0.1}, "lrs"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_lrs(tmp_path, command, kwargs, match):
    with pytest.raises(ProbeConfigError, match=match):
        _call(command, str(tmp_path / "missing.zarr"), tmp_path / "out", **kwargs)


def test_attention_lrs_selects_the_val_best_head(store, tmp_path):
    common = {"features": ["t090_b24_tok2"], "preset": "tiny", **FAST}
    lrs = [1e-5, 0.05, 0.5]
    doc = run_attention(store, tmp_path / "many", AttentionOptions(lrs=lrs[::-1], **common))
    table = doc["lr_sweep"]
    assert [row["lr"] for row in table] == lrs and doc["config"]["lrs"] == lrs and "lr" not in doc["config"]
    vals = [row["val_accuracy"] for row in table]
    best = vals.index(max(vals))  # ties: the smaller lr (listed first)
    assert doc["selected"]["lr"] == lrs[best]
    assert doc["selected"]["val_accuracy"] == vals[best]
    assert doc["selected"]["epoch"] == table[best]["best_epoch"]
    assert [row["selected"] for row in table] == [i == best for i in range(len(lrs))]
    # the reported metrics are the selected head's, as in a single-lr run
    assert doc["metrics"]["val"]["top1"] == pytest.approx(vals[best])
    assert doc["metrics"]["test"]["top1"] == pytest.approx(table[best]["test_accuracy"])
    assert doc["training"]["lr"] == lrs[best]
    # every head is saved; head.safetensors is the selected one
    all_heads, chosen = _weights(tmp_path / "many", "heads.safetensors"), _weights(tmp_path / "many")
    assert [row["head"] for row in table] == ["lr=1e-05", "lr=0.05", "lr=0.5"]
    prefix = f"{table[best]['head']}."
    assert all(np.array_equal(chosen[k].numpy(), all_heads[prefix + k].numpy()) for k in chosen)
    assert len(all_heads) == len(lrs) * len(chosen)
    # every lr started from the same weights: a single-lr run with the selected lr ends identically
    single = run_attention(store, tmp_path / "one", AttentionOptions(lr=lrs[best], **common))
    one = _weights(tmp_path / "one")
    assert all(np.array_equal(one[k].numpy(), chosen[k].numpy()) for k in one)
    assert single["metrics"]["test"] == doc["metrics"]["test"]
    assert set(single) | {"lr_sweep", "all_weights"} == set(doc)


# -- noise draws kept apart ------------------------------------------------------------------------------------


def test_attention_on_rotated_draws_records_the_rotation_and_the_evaluation(tmp_path):
    store = str(write_draws_store(tmp_path, draws=3))
    opts = {"features": [FEAT], "preset": "tiny", "epochs": 4, "batch_size": 32, "progress": False}
    one = run_attention(store, tmp_path / "k1", AttentionOptions(draws=1, **opts))
    rot = run_attention(store, tmp_path / "k3", AttentionOptions(**opts))  # default: every draw the store keeps
    mean = run_attention(store, tmp_path / "k3m", AttentionOptions(eval_draws="mean", **opts))
    assert one["noise_draws"]["rotation"] == [0, 0, 0, 0] and one["noise_draws"]["train"] == "draw 0 only"
    assert rot["noise_draws"]["rotation"] == [0, 1, 2, 0] and rot["noise_draws"]["eval"] == "draw 0"
    assert mean["noise_draws"]["eval"] == "logits averaged over draws 0..2"
    assert rot["noise_draws"]["statistics_from"] == "draw 0" and rot["noise_draws"]["store_draws"] == 3
    assert (rot["config"]["draws"], mean["config"]["eval_draws"]) == (None, "mean")
    logits = {k: np.load(tmp_path / k / "logits.npz") for k in ("k1", "k3", "k3m")}
    assert np.array_equal(logits["k1"]["test_rows"], np.arange(90, 120))
    assert logits["k1"]["val_logits"].shape[0] == len(logits["k1"]["val_rows"])
    assert not list((tmp_path / "k1").glob(".*_logits.npy"))  # the logits written batch by batch are removed
    # Epoch 0 reads draw 0 in both runs; from epoch 1 on the rotated run sees other inputs.
    assert one["training"]["history"][0] == rot["training"]["history"][0]
    assert one["training"]["history"][1]["train_loss"] != rot["training"]["history"][1]["train_loss"]
    assert not np.array_equal(logits["k1"]["test_logits"], logits["k3"]["test_logits"])
    # The same training (draw 0 selection is on val, which "mean" also averages), another evaluation.
    assert not np.allclose(logits["k3"]["test_logits"], logits["k3m"]["test_logits"])
    with pytest.raises(RunConflictError, match="draws"):
        run_attention(store, tmp_path / "k1", AttentionOptions(draws=2, **opts))
