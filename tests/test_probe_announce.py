"""A probe announces, before it works, every default that changes its result: the feature and why, the
recipe, the validation split carved from train; reusing `--out` for another run names the option."""

import pytest
from click.testing import CliRunner

from diffbank.cli import main
from probe.defaults import why_default
from probe.inputs import as_store

N, K = 90, 3


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store(n=N, k=K, dim=4, seed=0, n_train=60, class_names=["x", "y", "z"])


def _probe(*args):
    return CliRunner().invoke(main, ["probe", *args], catch_exceptions=False)


def _before_training(output: str, line: str) -> bool:
    """`line` is in the output and comes before the first epoch line (the announcement precedes the work)."""
    first_epoch = output.find("epoch 1/")
    return line in output and (first_epoch < 0 or output.index(line) < first_epoch)


def test_linear_announces_feature_recipe_and_carve_without_verbose(store, tmp_path):
    result = _probe("linear", store, "--out", str(tmp_path / "lin"), "--epochs", "2", "--val-fraction", "0.2")
    assert result.exit_code == 0, result.output
    out = result.output
    # the store has no t090_b24_avg2: its nearest avg feature stands in, and the log says so before training
    assert _before_training(out, "feature: t090_b24_avg2 not in store; nearest: t090_b24_avg1")
    assert _before_training(out, "recipe: diffbank: lr 1.0e-02, 2 epochs, batch 128")
    assert "keeps the best validation epoch; given: epochs" in out
    assert _before_training(out, "val split: carved from train (stratified, 0.2, seed 0), 12 rows")


def test_a_named_feature_is_not_announced_as_a_default(store, tmp_path):
    result = _probe("knn", store, "--out", str(tmp_path / "knn"), "--feature", "t150_b19_avg1", "--k", "5")
    assert result.exit_code == 0, result.output
    assert "feature:" not in result.output and "val split: carved from train" in result.output


@pytest.mark.parametrize(
    "command,expected",
    [
        ("linear", "t090_b24_avg2 not in store; nearest: t090_b24_avg1"),
        ("attention", "t090_b24_tok16 not in store; nearest: t090_b24_tok2"),
        ("sweep", "every centre-view feature with a timestep and a block (8)"),
        ("fusion", "the paper's blocks 19, 24, 30 x t 90, 150, 300 is not all in the store; nearest complete grid"),
    ],
)
def test_why_default_names_the_paper_choice_and_its_stand_in(store, command, expected):
    from probe.defaults import default_features

    fs = as_store(store)
    assert why_default(fs, command, default_features(fs, command)).startswith(expected)


def test_reusing_out_for_another_feature_names_the_option(store, tmp_path):
    out = str(tmp_path / "lin")
    first = _probe("linear", store, "--out", out, "--epochs", "1", "--quiet", "--feature", "t090_b24_avg1")
    assert first.exit_code == 0, first.output
    again = _probe("linear", store, "--out", out, "--epochs", "1", "--quiet", "--feature", "t150_b19_avg1")
    assert again.exit_code == 2, again.output
    assert "'--out'" in again.output and "other settings (features)" in again.output
    assert "out_dir" not in again.output
