"""probe/recipe.py: one declaration of every training setting; `--recipe paper` trains with the paper's settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import probe.fitting
import probe.optimizer
import probe.trainer
from diffbank.cli import main
from probe.recipe import RECIPES, ProbeConfigError, Recipe


def test_named_recipes_and_overrides_are_recorded():
    paper = Recipe.named("paper", "linear")
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.step_size, paper.gamma) == (1e-2, 0.0, 0.0, 7, 0.1)
    assert (paper.epochs, paper.batch_size, paper.standardize, paper.keep, paper.overrides) == (
        28,
        128,
        "none",
        "last",
        (),
    )
    assert Recipe.named("paper", "attention").lr == Recipe.named("paper", "fusion").lr == 5e-2
    assert Recipe.named("paper", "sweep").lrs == (1e-2,)
    diffbank = Recipe.named("diffbank", "attention")
    assert (diffbank.standardize, diffbank.keep, diffbank.lr) == ("channel", "best", 5e-2)
    assert Recipe.named("diffbank", "linear") == Recipe()  # the dataclass defaults are the diffbank linear recipe
    tuned = Recipe.named("paper", "linear", momentum=0.9, lr=None)  # None: not given
    assert tuned.momentum == 0.9 and tuned.lr == 1e-2 and tuned.overrides == ("momentum",)
    assert Recipe.from_record(json.loads(json.dumps(tuned.to_record()))) == tuned
    assert tuned.replace(epochs=3).overrides == ("epochs", "momentum")


@pytest.mark.parametrize(
    "settings,name",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": True}, "momentum"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"step_size": 2.5}, "step_size"),
        ({"gamma": 0.0}, "gamma"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"lr": float("inf")}, "lr"),
        ({"lrs": []}, "lrs"),
        ({"standardize": "z"}, "standardize"),
        ({"keep": "first"}, "keep"),
        ({"learning_rate": 1}, "learning_rate"),
    ],
)
def test_bad_settings_name_the_setting(settings, name):
    with pytest.raises(ProbeConfigError, match=rf"^{name} "):
        Recipe.named("diffbank", "linear", **settings)
    with pytest.raises(ProbeConfigError, match="recipe must be one of"):
        Recipe.named("papers", "linear")


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().lr = 1.0  # type: ignore[misc]


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(n=150, k=3, dim=6, seed=0, n_train=120, class_names=["x", "y", "z"])


@pytest.fixture
def built(monkeypatch):
    """The optimizer, scheduler and train stream of every training run, as the trainer built them."""
    seen: dict[str, list] = {"optim": [], "train_stream": []}
    real_build, real_train_many = probe.optimizer.build_optimizer, probe.fitting.train_many

    def build(*args, **kwargs):
        pair = real_build(*args, **kwargs)
        seen["optim"].append(pair)
        return pair

    def train_many(heads, inputs, train_stream, *args, **kwargs):
        seen["train_stream"].append(train_stream)
        return real_train_many(heads, inputs, train_stream, *args, **kwargs)

    monkeypatch.setattr(probe.trainer, "build_optimizer", build)
    monkeypatch.setattr(probe.fitting, "train_many", train_many)
    return seen


@pytest.mark.parametrize(
    "command,args,lr",
    [
        ("linear", [], 1e-2),
        ("sweep", [], 1e-2),
        ("attention", ["--preset", "tiny"], 5e-2),
        ("fusion", ["--preset", "tiny"], 5e-2),
    ],
)
def test_recipe_paper_trains_with_the_papers_settings(store, tmp_path, built, command, args, lr):
    out = tmp_path / command
    result = CliRunner().invoke(
        main,
        ["probe", command, store, "--out", str(out), "--recipe", "paper", "--quiet", *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    ((optimizer, scheduler),) = built["optim"]
    assert type(optimizer) is torch.optim.SGD and type(scheduler) is torch.optim.lr_scheduler.StepLR
    for group in optimizer.param_groups:
        assert group["initial_lr"] == lr
        assert (group["momentum"], group["weight_decay"], group["dampening"], group["nesterov"]) == (0, 0, 0, False)
    assert (scheduler.step_size, scheduler.gamma, scheduler.last_epoch) == (7, 0.1, 28)  # 28 epochs ran
    assert all(g["lr"] == pytest.approx(lr * 0.1**4) for g in optimizer.param_groups)
    (stream,) = built["train_stream"]
    assert stream.batch_size == 128 and stream.shuffle
    doc = json.loads((out / "results.json").read_text())
    assert doc["recipe"] == Recipe.named("paper", command).to_record() and doc["recipe"]["overrides"] == []
    assert doc["config"]["standardize"] == "none" and doc["split_definition"]["standardize"] == "none"
    assert doc["selected"]["epoch"] == 28  # the last epoch (counted from 1) is kept, not the best validation one
    history = (doc["training"] if command != "sweep" else next(iter(doc["training"].values())))["history"]
    assert len(history) == 28


def test_cli_options_override_a_recipe_and_are_recorded(store, tmp_path, built):
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main,
        [
            "probe",
            "linear",
            store,
            "--out",
            str(out),
            "--recipe",
            "paper",
            "--quiet",
            "--epochs",
            "2",
            "--momentum",
            "0.5",
            "--lr",
            "0.1",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    ((optimizer, _),) = built["optim"]
    assert (optimizer.param_groups[0]["initial_lr"], optimizer.param_groups[0]["momentum"]) == (0.1, 0.5)
    doc = json.loads((out / "results.json").read_text())
    assert doc["recipe"]["name"] == "paper" and doc["recipe"]["overrides"] == ["epochs", "lr", "momentum"]
    assert Recipe.from_record(doc["recipe"]) == Recipe.named("paper", "linear", epochs=2, momentum=0.5, lr=0.1)


def test_diffbank_recipe_is_the_default(store, tmp_path, built):
    out = tmp_path / "d"
    result = CliRunner().invoke(
        main, ["probe", "linear", store, "--out", str(out), "--quiet", "--epochs", "2"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert (
        doc["recipe"]["name"] == "diffbank"
        and doc["config"]["standardize"] == RECIPES["diffbank"]["linear"]["standardize"] == "dim"
    )
    history = doc["training"]["history"]
    assert doc["selected"]["epoch"] == max((r["epoch"] for r in history), key=lambda e: (history[e - 1]["val_accuracy"], -e))
    assert doc["epochs_counted_from"] == 1 and [r["epoch"] for r in history] == [1, 2]
