"""One option grammar: every command that uses a common option lists it in its --help and takes it after
the subcommand; the groups that took one before still do, and the two placements give the same run."""

from __future__ import annotations

import logging

import click
import numpy as np
import pytest
from click.testing import CliRunner

from diffbank.cli import main
from diffbank.commands.options import COMMON_OPTIONS
from extract.store import save_features

FLAGS = {
    "storage_option": "--storage-option",
    "quiet": "-q, --quiet",
    "verbose": "-v, --verbose",
    "device": "--device",
    "memory_budget": "--memory-budget",
    "seed": "--seed",
    "workers": "--workers",
    "scheduler": "--scheduler",
}
PROBES = ("linear", "attention", "fusion", "logistic", "knn", "sweep")
TRAINED = ("linear", "attention", "fusion", "sweep")
# Commands that use a common option beyond -v/-q (which every command and group takes).
USES = {
    "storage_option": [
        ("extract",),
        ("store",),
        *[("store", c) for c in ("info", "verify", "export", "copy")],
        ("probe",),
        *[("probe", c) for c in PROBES],
        ("analyze", "cka"),
    ],
    "seed": [*[("probe", c) for c in PROBES], ("probe", "feedback"), ("analyze", "cka"), ("train",), ("sample",)],
    "device": [("extract",), *[("probe", c) for c in TRAINED], ("probe", "knn"), ("probe", "logistic"), ("probe", "feedback"), ("train",)],
    "memory_budget": [*[("probe", c) for c in PROBES], ("analyze", "cka")],
    "workers": [("extract",), ("probe", "sweep")],
    "scheduler": [("extract",), ("probe", "sweep")],
}
# Options that share a common option's flag with another meaning: `store copy --workers` is objects copied at once.
SAME_FLAG = {("store", "copy"): {"workers"}}


def _commands(command: click.Command = main, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))


ALL = dict(_commands())


def test_the_walk_finds_every_command():
    assert {("store", "verify"), ("probe", "knn"), ("probe", "feedback"), ("analyze", "cka"), ("demo",)} <= set(ALL)
    for uses in USES.values():
        assert set(uses) <= set(ALL), set(uses) - set(ALL)


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: " ".join(p) or "diffbank")
def test_help_lists_the_common_options_the_command_uses(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    wanted = {"quiet", "verbose"} | {name for name, paths in USES.items() if path in paths}
    for name in wanted:
        assert FLAGS[name] in result.output, f"{' '.join(path)} --help lacks {FLAGS[name]}"
    # and a command lists no common option it does not use
    for name in set(USES) - wanted - SAME_FLAG.get(path, set()):
        assert f"  {FLAGS[name]} " not in result.output, f"{' '.join(path)} lists {FLAGS[name]}"
    assert not {p.name for p in ALL[path].params} & (set(USES) - wanted), path


def test_every_command_that_reads_a_store_takes_storage_options():
    """Derived from the arguments, so a new command that reads a store is held to it without being listed."""
    readers = [
        path
        for path, command in ALL.items()
        if any(isinstance(p, click.Argument) and p.name in ("store", "stores", "src", "dst") for p in command.params)
    ]
    assert ("store", "verify") in readers and ("probe", "knn") in readers and ("analyze", "cka") in readers
    for path in readers:
        assert "storage_option" in {p.name for p in ALL[path].params}, " ".join(path)


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: " ".join(p) or "diffbank")
def test_common_options_come_from_one_definition(path):
    """Each common option is made by its factory in diffbank.commands.options: same flags, same callback."""
    for param in ALL[path].params:
        if param.name in COMMON_OPTIONS:
            assert isinstance(param, click.Option) and param.callback is not None, (path, param.name)
            assert param.callback.__module__ == "diffbank.commands.options", (path, param.name)
            assert ", ".join(sorted(param.opts, key=len)) == FLAGS[param.name], (path, param.opts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 3
    centres = rng.normal(size=(3, 4)) * 3
    x = (centres[y] + rng.normal(size=(n, 4))).astype(np.float32)[:, :, None, None]
    path = tmp_path_factory.mktemp("grammar") / "s.zarr"
    save_features(path, {"t090_b24_avg1": x}, y, {"train": np.arange(45), "test": np.arange(45, n)}, shard_rows=32)
    return str(path)


HARMLESS = "anon=true"  # an option a local store does not need: accepted and left unused


@pytest.mark.parametrize(
    "args",
    [
        ["store", "verify", "{store}", "--storage-option", HARMLESS],
        ["store", "--storage-option", HARMLESS, "verify", "{store}"],
        ["store", "info", "{store}", "--storage-option", HARMLESS],
        ["store", "verify", "{store}", "-q"],
        ["-q", "store", "verify", "{store}"],
    ],
)
def test_store_options_after_the_subcommand_and_on_the_group(store, args):
    result = CliRunner().invoke(main, [a.format(store=store) for a in args])
    assert result.exit_code == 0, result.output
    assert store in result.output


def test_a_malformed_storage_option_is_refused_in_either_place(store):
    for args in (
        ["store", "verify", store, "--storage-option", "nokey"],
        ["store", "--storage-option", "nokey", "verify", store],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "key=value" in result.output


@pytest.mark.parametrize("command", ["knn", "logistic", "linear"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_probe_quiet_in_either_place(store, tmp_path, command, where):
    extra = {"knn": ["--k", "5"], "logistic": ["--c", "1"], "linear": ["--epochs", "1"]}[command]
    run = ["probe", command, store, "--out", str(tmp_path / command), *extra]
    args = [*run, "--quiet"] if where == "after" else ["-q", *run]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "top1" in result.output  # the table is the command's output
    assert "feature:" not in result.output and "epoch 1/" not in result.output  # status lines are not
    loud = CliRunner().invoke(main, [*run[:4], str(tmp_path / f"{command}-loud"), *extra])
    assert loud.exit_code == 0 and "feature: t090_b24_avg2 not in store" in loud.output


def test_probe_storage_option_on_the_command_and_on_the_group(store, tmp_path):
    after = CliRunner().invoke(
        main, ["probe", "knn", store, "--out", str(tmp_path / "a"), "--k", "5", "--storage-option", HARMLESS]
    )
    before = CliRunner().invoke(
        main, ["probe", "--storage-option", HARMLESS, "knn", store, "--out", str(tmp_path / "b"), "--k", "5"]
    )
    assert after.exit_code == 0 and before.exit_code == 0, after.output + before.output
    assert after.output.replace("/a/", "/b/") == before.output


@pytest.mark.parametrize(
    "args, level",
    [
        (["spec", "schema", "-v"], logging.DEBUG),
        (["-v", "spec", "schema"], logging.DEBUG),
        (["spec", "schema", "-q"], logging.WARNING),
        (["-q", "spec", "-q", "schema"], logging.WARNING),
        (["-q", "spec", "schema", "-v"], logging.INFO),  # counted over the whole line
    ],
)
def test_verbosity_anywhere_on_the_line(args, level):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert logging.getLogger("probe").level == level


def test_seed_and_device_keep_their_check_after_the_subcommand(store, tmp_path):
    bad_device = CliRunner().invoke(main, ["probe", "knn", store, "--out", str(tmp_path / "d"), "--device", "gpu0"])
    assert bad_device.exit_code == 2 and "--device" in bad_device.output
    bad_budget = CliRunner().invoke(
        main, ["probe", "knn", store, "--out", str(tmp_path / "m"), "--memory-budget", "lots"]
    )
    assert bad_budget.exit_code == 2 and "--memory-budget" in bad_budget.output
    bad_seed = CliRunner().invoke(main, ["analyze", "cka", store, "--out", str(tmp_path / "c"), "--seed", "x"])
    assert bad_seed.exit_code == 2 and "--seed" in bad_seed.output
