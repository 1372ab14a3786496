"""Every usage error exits with status 2 (a command given wrongly), names its option, leaves nothing
behind and starts no work; a run that fails exits 1. Enumerated over the commands that take each option."""

from __future__ import annotations

import pytest

from .conftest import cli

PROBES = ("linear", "attention", "fusion", "logistic", "knn", "sweep")
BAD_PROBE_OPTIONS = [
    (["--memory-budget", "-5"], "--memory-budget"),
    (["--memory-budget", "abc"], "--memory-budget"),
    (["--memory-budget", "-5%"], "--memory-budget"),
    (["--memory-budget", "abc%"], "--memory-budget"),
    (["--subset", "0-shot"], "--subset"),
    (["--subset", "200%"], "--subset"),
    (["--subset", "half"], "--subset"),
    (["--feature", "nonsense"], "--feature"),
]


@pytest.fixture(scope="module")
def store(synthetic_store) -> str:
    return synthetic_store(n=48, k=3, dim=4, seed=0, n_train=36, class_names=["a", "b", "c"])


@pytest.mark.parametrize("command", PROBES)
@pytest.mark.parametrize("option, name", BAD_PROBE_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_probe_option_values_are_usage_errors(tmp_path, store, command, option, name):
    out = tmp_path / "out"
    result = cli("probe", command, store, "--out", str(out), *option)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{name}'" in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written under --out


def test_good_probe_option_values_still_run(tmp_path, store):
    out = tmp_path / "out"
    args = ["--memory-budget", "25%", "--subset", "2-shot", "--feature", "t090_b19_avg1", "--k", "3"]
    result = cli("probe", "knn", store, "--out", str(out), *args)
    assert result.exit_code == 0, result.output


def test_export_of_an_unknown_feature_is_a_usage_error(tmp_path, store):
    result = cli("store", "export", store, str(tmp_path / "x.h5"), "--feature", "nonsense")
    assert result.exit_code == 2 and "Invalid value for '--feature'" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "SPEC", "--store", "STORE"],
        ["probe", "feedback", "SPEC", "--out", "STORE"],
    ],
)
@pytest.mark.parametrize("device", ["nonsense", "cuda:x", "gpu"])
def test_an_unknown_device_is_a_usage_error(tmp_path, spec_file, no_compute, command, device):
    no_compute()
    args = [str(spec_file) if a == "SPEC" else str(tmp_path / "out") if a == "STORE" else a for a in command]
    result = cli(*args, "--device", device)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--device'" in result.output and "unknown device" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["probe", "linear", "STORE", "--out", "OUT"],
        ["probe", "knn", "STORE", "--out", "OUT"],
        ["train", "--out", "OUT"],
    ],
)
def test_an_unknown_torch_device_is_a_usage_error(tmp_path, store, command):
    args = [store if a == "STORE" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    result = cli(*args, "--device", "gpu")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--device': unknown device 'gpu'" in result.output
    assert not (tmp_path / "out").exists()
