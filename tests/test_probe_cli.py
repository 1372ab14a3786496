"""`diffbank probe ...` end to end on a small synthetic store written with save_features."""

import json

import pytest
from click.testing import CliRunner

from diffbank.cli import main

N, K = 150, 3


@pytest.fixture(scope="module")
def store(synthetic_store):
    # one cell (t 90, block 24) is clearly the best
    return synthetic_store(
        n=N,
        k=K,
        dim=6,
        seed=0,
        n_train=120,
        class_names=["x", "y", "z"],
        noise=lambda t, block: 0.5 if (t, block) == (90, 24) else 3.0,
    )


def _invoke(*args):
    result = CliRunner().invoke(main, ["probe", *args], catch_exceptions=False)
    return result


def _results(out):
    doc = json.loads((out / "results.json").read_text())
    test = doc["metrics"]["test"]
    assert {"top1", "top5", "per_class_accuracy", "confusion_matrix"} <= set(test)
    assert doc["store"]["fingerprint"] and doc["seeds"]["seed"] == 0
    assert doc["split_definition"]["splits"]["test"]["n"] == 30
    assert doc["environment"]["versions"]["torch"]
    return doc


@pytest.mark.parametrize(
    "command,args",
    [
        ("linear", ["--epochs", "2", "--lr", "0.1", "--quiet"]),
        ("attention", ["--epochs", "1", "--preset", "tiny", "--batch-size", "64", "--quiet"]),
        ("fusion", ["--epochs", "1", "--preset", "tiny", "--batch-size", "64", "--quiet"]),
        ("logistic", ["--c", "0.01", "--c", "1"]),
        ("knn", ["--k", "5", "--k", "10"]),
    ],
)
def test_command_writes_results_and_prints_a_table(store, tmp_path, command, args):
    out = tmp_path / command
    result = _invoke(command, store, "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    assert "split" in result.output and "top1" in result.output and "test" in result.output
    doc = _results(out)
    assert doc["command"] == command
    if command in ("linear", "attention", "fusion"):
        assert (out / "head.safetensors").exists()
    if command == "linear":
        assert doc["features"] == ["t090_b24_avg1"]  # nearest to the paper's t090_b24_avg2
    if command in ("attention", "fusion"):
        assert doc["config"]["lr"] == 0.05 and doc["selected"]["lr"] == 0.05  # the paper's lr by default
    if command == "fusion":
        assert doc["config"]["grid"] == {"timesteps": [90, 150], "blocks": [19, 24]}
    if command in ("logistic", "knn"):
        assert doc["metrics"]["test"]["top1"] > 0.8  # chance is 1/3


def test_sweep_draws_the_heatmap_and_resumes(store, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", store, "--out", str(out), "--lr", "0.1", "--lr", "0.01", "--batch-size", "32", "--quiet"]
    result = _invoke(*args, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "block" in result.output and "selected on val" in result.output
    doc = _results(out)
    assert len(doc["sweep"]) == 8 * 2 and len(doc["grid"]) == 4
    assert doc["selected"]["feature"].startswith("t090_b24")
    for png in ("heatmap.png", "accuracy_vs_t.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a rerun with more epochs continues from the checkpoint instead of starting over
    result = _invoke(*args, "--epochs", "3")
    assert result.exit_code == 0, result.output
    doc = _results(out)
    histories = [h["history"] for h in doc["training"].values()]
    assert all(len(h) == 3 for h in histories) and all([r["epoch"] for r in h] == [1, 2, 3] for h in histories)
    # another setting in the same directory is refused rather than mixed into the checkpoint
    result = _invoke(*args[:-1], "--seed", "1", "--quiet")
    assert result.exit_code != 0 and "other settings" in result.output


def test_bad_feature_is_a_clean_error(store, tmp_path):
    result = _invoke("linear", store, "--out", str(tmp_path / "x"), "--feature", "t001_b01_avg9")
    assert not (tmp_path / "x").exists()  # a failed run leaves no half-made --out behind
    assert result.exit_code != 0 and "features that exist" in result.output and "t090_b24_avg1" in result.output


def test_recipe_options_are_recorded(store, tmp_path):
    out = tmp_path / "recipe"
    result = _invoke(
        "linear",
        store,
        "--out",
        str(out),
        "--epochs",
        "2",
        "--quiet",
        "--momentum",
        "0.9",
        "--weight-decay",
        "1e-4",
        "--step-size",
        "1",
        "--gamma",
        "0.5",
    )
    assert result.exit_code == 0, result.output
    cfg = _results(out)["config"]
    assert (cfg["momentum"], cfg["weight_decay"], cfg["step_size"], cfg["gamma"]) == (0.9, 1e-4, 1, 0.5)
    assert cfg["optimizer"] == "SGD(momentum=0.9, weight_decay=0.0001)"
    assert cfg["schedule"] == "StepLR(step_size=1, gamma=0.5)"


@pytest.mark.parametrize(
    "option,value", [("--momentum", "1"), ("--weight-decay", "-1"), ("--step-size", "0"), ("--gamma", "0")]
)
def test_bad_recipe_option_is_a_clean_error(store, tmp_path, option, value):
    for command in ("linear", "attention", "fusion", "sweep"):
        result = _invoke(command, store, "--out", str(tmp_path / command), option, value)
        assert result.exit_code == 2 and option in result.output, result.output


def test_repeated_lr_trains_one_head_per_lr(store, tmp_path):
    out = tmp_path / "fusion_lrs"
    result = _invoke(
        "fusion",
        store,
        "--out",
        str(out),
        "--epochs",
        "1",
        "--preset",
        "tiny",
        "--batch-size",
        "64",
        "--quiet",
        "--lr",
        "0.1",
        "--lr",
        "0.01",
        "--momentum",
        "0.5",
    )
    assert result.exit_code == 0, result.output
    assert "lr on validation" in result.output
    doc = _results(out)
    assert doc["config"]["lrs"] == [0.01, 0.1] and doc["config"]["momentum"] == 0.5
    assert [r["lr"] for r in doc["lr_sweep"]] == [0.01, 0.1]
    assert doc["selected"]["lr"] in (0.01, 0.1) and "val_accuracy" in doc["selected"]
    assert (out / "head.safetensors").exists() and (out / "heads.safetensors").exists()
    # one --lr is the single-head path
    out1 = tmp_path / "attention_one"
    result = _invoke(
        "attention", store, "--out", str(out1), "--epochs", "1", "--preset", "tiny", "--quiet", "--lr", "0.02"
    )
    assert result.exit_code == 0, result.output
    doc = _results(out1)
    assert doc["config"]["lr"] == 0.02 and "lr_sweep" not in doc


def test_draw_options_reach_the_run_and_bad_ones_are_clean_errors(tmp_path):
    from probe_data_fixtures import FEAT, write_draws_store

    store = str(write_draws_store(tmp_path, draws=3))
    out = tmp_path / "att"
    args = ("attention", store, "--out", str(out), "--feature", FEAT, "--preset", "tiny", "--epochs", "2", "--quiet")
    result = _invoke(*args, "--draws", "2", "--eval-draws", "mean")
    assert result.exit_code == 0, result.output
    assert "noise draws: trained on draw (e - 1) mod 2 in epoch e (epochs counted from 1); evaluated on logits averaged over draws 0..1" in (
        result.output
    )
    doc = json.loads((out / "results.json").read_text())
    assert doc["noise_draws"]["rotation"] == [0, 1] and doc["noise_draws"]["eval_draws"] == "mean"
    result = _invoke(*args[:3], str(tmp_path / "x"), *args[4:], "--draws", "4")
    assert result.exit_code != 0 and "the store keeps 3 noise draws" in result.output
    assert not (tmp_path / "x").exists()
