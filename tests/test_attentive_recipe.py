"""The `attentive` recipe: AdamW, a linear warm-up then a cosine schedule, stepped per epoch."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from diffbank.cli import main
from probe.optimizer import build_optimizer
from probe.options import AttentionOptions
from probe.recipe import ProbeConfigError, Recipe
from probe.run import run_attention

FEATURE = "t090_b24_tok2"


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(n=120, k=3, dim=4, seed=3, n_train=96, class_names=["a", "b", "c"])


def test_the_recipe_is_v_jepas_optimiser_with_a_warm_up():
    rec = Recipe.named("attentive", "attention")
    assert (rec.optimizer, rec.schedule, rec.lr, rec.weight_decay, rec.epochs, rec.warmup_epochs) == (
        "adamw",
        "cosine",
        1e-3,
        1e-3,
        20,
        1,
    )
    assert rec.optimizer_label() == "AdamW(weight_decay=0.001)"
    assert rec.schedule_label() == "cosine(warmup_epochs=1, epochs=20)"
    assert Recipe.named("attentive", "sweep").lrs == (1e-4, 1e-3, 1e-2)
    assert Recipe.from_record(rec.to_record()) == rec
    # the SGD recipes are unchanged
    assert Recipe.named("paper", "attention").optimizer_label() == "SGD(momentum=0, weight_decay=0)"


def test_warm_up_then_cosine_to_zero():
    rec = Recipe.named("attentive", "attention", epochs=10, warmup_epochs=2)
    factors = [rec.lr_factor(e) for e in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    head = torch.nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer([head], [0.1], rec)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 1e-3
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.1 * f for f in factors])


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"momentum": 0.9}, "momentum is SGD's"),
        ({"warmup_epochs": 20}, "warmup_epochs must be in"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ProbeConfigError, match=match):
        Recipe.named("attentive", "attention", **settings)
    with pytest.raises(ProbeConfigError, match="warmup_epochs needs schedule='cosine'"):
        Recipe.named("diffbank", "attention", warmup_epochs=1)


def test_attention_trains_with_the_recipe_and_records_it(store, tmp_path):
    opts = AttentionOptions(
        features=[FEATURE], preset="tiny", recipe="attentive", epochs=4, batch_size=32, progress=False
    )
    doc = run_attention(store, tmp_path / "a", opts)
    rec = Recipe.named("attentive", "attention", epochs=4)
    # the history records each epoch's lr after its schedule step (the next epoch's), as for StepLR
    assert [h["lr"] for h in doc["training"]["history"]] == pytest.approx(
        [1e-3 * rec.lr_factor(e + 1) for e in range(4)]
    )
    assert doc["recipe"]["name"] == "attentive" and doc["recipe"]["optimizer"] == "adamw"
    assert doc["config"]["optimizer"] == "AdamW(weight_decay=0.001)"
    assert doc["config"]["schedule"] == "cosine(warmup_epochs=1, epochs=4)"
    again = run_attention(store, tmp_path / "a", opts)  # the checkpoint holds every epoch: nothing left to train
    assert again["training"]["history"] == doc["training"]["history"]


def test_cli_takes_the_recipe(store, tmp_path):
    out = tmp_path / "cli"
    args = ["probe", "attention", store, "--out", str(out), "--feature", FEATURE, "--preset", "tiny", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--recipe", "attentive", "--epochs", "2", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["recipe"]["schedule"] == "cosine"
