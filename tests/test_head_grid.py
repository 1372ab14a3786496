"""A head grid in one pass: `probe attention` / `fusion` with several lrs x weight decays."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from diffbank.cli import main
from probe.options import AttentionOptions
from probe.recipe import ProbeConfigError
from probe.run import run_attention

FEATURE = "t090_b24_tok2"
COMMON = {"features": [FEATURE], "preset": "tiny", "epochs": 3, "batch_size": 32, "progress": False}
LRS, WDS = [0.01, 0.2], [0.0, 0.5]


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(n=120, k=3, dim=4, seed=2, n_train=96, class_names=["a", "b", "c"])


def test_every_lr_x_weight_decay_trains_in_one_pass_and_is_selected_on_validation(store, tmp_path):
    doc = run_attention(store, tmp_path / "grid", AttentionOptions(lrs=LRS, weight_decays=WDS, **COMMON))
    table = doc["lr_sweep"]
    assert sorted((r["lr"], r["weight_decay"]) for r in table) == sorted((lr, wd) for lr in LRS for wd in WDS)
    grid = doc["grid"]
    assert (grid["lrs"], grid["weight_decays"], grid["heads"]) == (LRS, WDS, 4) and doc["config"][
        "weight_decays"
    ] == WDS
    assert grid["state_bytes"] == 4 * grid["parameters_per_head"] * 4 * 3  # weights, gradients, kept copy
    for row in table:  # every head's per-epoch history
        assert [h["epoch"] for h in row["history"]] == [1, 2, 3]  # counted from 1
        assert all({"train_loss", "train_accuracy", "val_accuracy"} <= set(h) for h in row["history"])
    histories = {(r["lr"], r["weight_decay"]): r["history"] for r in table}
    # weight decay reaches its own head only: the two decays of one lr train apart
    assert histories[(0.2, 0.0)][-1]["train_loss"] != histories[(0.2, 0.5)][-1]["train_loss"]
    (selected,) = [r for r in table if r["selected"]]
    assert selected["val_accuracy"] == max(r["val_accuracy"] for r in table)
    assert (doc["selected"]["lr"], doc["selected"]["weight_decay"]) == (selected["lr"], selected["weight_decay"])
    assert (tmp_path / "grid" / doc["figures"]["grid_val"]).read_bytes()[:4] == b"\x89PNG"
    assert len({r["head"] for r in table}) == 4


def test_a_grid_head_equals_the_head_trained_alone(store, tmp_path):
    run_attention(store, tmp_path / "grid", AttentionOptions(lrs=LRS, weight_decays=WDS, **COMMON))
    run_attention(store, tmp_path / "one", AttentionOptions(lr=0.2, weight_decay=0.5, **COMMON))
    grid = load_file(str(tmp_path / "grid" / "heads.safetensors"))
    one = load_file(str(tmp_path / "one" / "head.safetensors"))
    prefix = "lr=0.2,wd=0.5."
    assert all(np.allclose(one[k].numpy(), grid[prefix + k].numpy(), atol=1e-6) for k in one)
    other = "lr=0.2,wd=0."
    assert not all(np.allclose(one[k].numpy(), grid[other + k].numpy(), atol=1e-6) for k in one)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"weight_decay": 0.1, "weight_decays": [0.0, 0.1]}, "not both"),
        ({"weight_decays": [0.0, -1.0]}, "weight_decays must hold numbers >= 0"),
        ({"weight_decays": []}, "non-empty"),
    ],
)
def test_bad_grids_are_refused_before_reading(tmp_path, settings, match):
    with pytest.raises(ProbeConfigError, match=match):
        run_attention(tmp_path / "no-store.zarr", tmp_path / "out", AttentionOptions(**settings))


def test_cli_repeats_lr_and_weight_decay(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["probe", "attention", store, "--out", str(out), "--feature", FEATURE, "--preset", "tiny", "--quiet"]
    args += ["--epochs", "1", "--batch-size", "32", "--lr", "0.01", "--lr", "0.2"]
    result = runner.invoke(main, [*args, "--weight-decay", "0", "--weight-decay", "0.5"])
    assert result.exit_code == 0, result.output
    assert "lr x weight decay on validation" in result.output
    assert len(json.loads((out / "results.json").read_text())["lr_sweep"]) == 4
    result = runner.invoke(
        main, ["probe", "linear", store, "--out", str(tmp_path / "lin"), "--weight-decay", "0", "--weight-decay", "1"]
    )
    assert result.exit_code == 2 and "weight-decay grid is for attention and fusion" in result.output
