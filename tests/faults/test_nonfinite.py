"""Checkpoints with NaN, inf or huge weights never give a "complete" store of NaN: `spec check` and the start
of `extract` run one image through the model and refuse it, naming the first block that goes non-finite; a
unit with non-finite features stops the run before it is written; `--allow-nonfinite` stores them, and
`store info` then shows the counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from extract.finite import unit_problem
from extract.models.adm import ADMUNet
from extract.models.checkpoints import save_safetensors
from extract.models.config import TINY_FLAGS

from .conftest import cli, tiny_spec

# (tensor, element or None for all of it, value) -> the first block whose output is not finite
CORRUPTIONS = {
    "all NaN": ("input_blocks.0.0.weight", None, float("nan"), "block 1 (input_blocks.0)"),
    "one NaN": ("input_blocks.1.0.in_layers.2.weight", 0, float("nan"), "block 2 (input_blocks.1)"),
    "one inf": ("time_embed.0.weight", 0, float("inf"), "block 2 (input_blocks.1)"),
    "one 1e30": ("input_blocks.0.0.weight", 0, 1e30, "block 2 (input_blocks.1)"),
}


def checkpoint(tmp_path, case: str | None):
    torch.manual_seed(0)
    model = ADMUNet.from_flags(**TINY_FLAGS)
    if case is not None:
        key, index, value, _ = CORRUPTIONS[case]
        with torch.no_grad():
            tensor = model.state_dict()[key]
            if index is None:
                tensor.fill_(value)
            else:
                tensor.view(-1)[index] = value
    path = tmp_path / f"{case or 'good'}.safetensors".replace(" ", "_")
    save_safetensors(model, path)
    return path


def spec_file(tmp_path, case: str | None, **over) -> str:
    path = tmp_path / "spec.yaml"
    spec = tiny_spec(model={"checkpoint": str(checkpoint(tmp_path, case))}, **over)
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_good_checkpoint_passes(tmp_path):
    result = cli("spec", "check", spec_file(tmp_path, None))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_spec_check_refuses_a_nonfinite_model_naming_the_block(tmp_path, case):
    result = cli("spec", "check", spec_file(tmp_path, case))
    assert result.exit_code == 2, result.output
    assert "model.checkpoint: the model's features are not finite" in result.output
    assert f"the first block whose output is not finite is {CORRUPTIONS[case][3]}" in result.output
    assert "--no-files" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_extract_refuses_a_nonfinite_model_before_the_store(tmp_path, case):
    store = tmp_path / "s.zarr"
    result = cli("extract", spec_file(tmp_path, case), "--store", str(store), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "not finite" in result.output and CORRUPTIONS[case][3] in result.output
    assert "complete" not in result.output.replace("incomplete", "")
    assert not (store / "zarr.json").exists()  # no store was created


def test_huge_but_finite_features_that_overflow_float16_are_refused(tmp_path):
    # with block 1 alone, 1e30 in the first convolution gives finite float32 features beyond float16's range
    spec = spec_file(tmp_path, "one 1e30", features={"blocks": [1]})
    result = cli("spec", "check", spec)
    assert result.exit_code == 2, result.output
    assert "every block's output is finite, but values reach" in result.output and "beyond float16" in result.output
    spec32 = spec_file(tmp_path, "one 1e30", features={"blocks": [1]}, storage={"dtype": "float32"})
    assert cli("spec", "check", spec32).exit_code == 0


def test_a_nonfinite_unit_stops_the_run_before_it_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr("extract.prepare.refuse_nonfinite_model", lambda *a: None)  # past the start check
    store = tmp_path / "s.zarr"
    result = cli("extract", spec_file(tmp_path, "one NaN"), "--store", str(store), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "unit 0 (rows 0-3): feature t010_b02_avg1 holds 128 NaN and 0 inf value(s) as float16" in result.output
    assert "--allow-nonfinite" in result.output
    info = json.loads(cli("store", "info", str(store), "--json").output)
    assert not info["complete"] and all(f["units_done"] == 0 for f in info["features"])


def test_allow_nonfinite_stores_them_and_store_info_counts_them(tmp_path):
    store = tmp_path / "s.zarr"
    args = ["extract", spec_file(tmp_path, "all NaN"), "--store", str(store), "--no-progress", "--allow-nonfinite"]
    result = cli(*args)
    assert result.exit_code == 0 and "complete" in result.output, result.output
    info = json.loads(cli("store", "info", str(store), "--json").output)
    for feature in info["features"]:
        assert feature["stats"]["n_nan"] == int(np.prod(feature["shape"])), feature
    lines = cli("store", "info", str(store)).output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("feature"))
    assert lines[at].split()[-3:] == ["max|x|", "inf", "nan"]
    shown = {row.split()[0]: row.split()[-3:] for row in lines[at + 2 :]}
    assert shown == {f["name"]: ["0", "0", str(f["stats"]["n_nan"])] for f in info["features"]}, lines


def test_unit_problem_counts_values_as_stored_among_valid_rows():
    finite = {"f": np.ones((4, 2), np.float32)}
    valid = np.ones(4, bool)
    assert unit_problem(3, (12, 16), finite, valid, "float16") == ""
    big = {"f": np.full((4, 2), 1e5, np.float32)}  # finite in float32, inf in float16
    assert "feature f holds 0 NaN and 8 inf value(s) as float16 among 8" in unit_problem(
        3, (12, 16), big, valid, "float16"
    )
    assert unit_problem(3, (12, 16), big, valid, "float32") == ""
    nan_in_failed_row = {"f": np.ones((4, 2), np.float32)}
    nan_in_failed_row["f"][1] = np.nan
    assert unit_problem(3, (12, 16), nan_in_failed_row, np.array([True, False, True, True]), "float16") == ""
    assert "unit 3 (rows 12-15)" in unit_problem(3, (12, 16), nan_in_failed_row, valid, "float16")
