"""Every CLI failure is one clean line (or a list) with exit status 1 (run-time) or 2 (usage); --debug
shows the traceback. Results are created with the user's umask. Units are sized for resume."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import cli, tiny_spec


def test_unexpected_error_is_one_line_unless_debug(tmp_path, spec_file, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something deep broke\nsecond line of detail")

    monkeypatch.setattr("extract.pipeline.extract", broken)
    args = ["extract", str(spec_file), "--store", str(tmp_path / "s.zarr"), "--no-progress"]
    result = cli(*args)
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == "error: RuntimeError: something deep broke"
    assert "rerun with --debug for the traceback" in result.output and "Traceback" not in result.output
    debug = cli("--debug", *args)
    assert isinstance(debug.exception, RuntimeError)  # raised, so Python prints the traceback


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["extract", "SPEC", "--workers", "2", "--scheduler", "tcp://x:1"], 2, "give --workers or --scheduler"),
        (["extract", "SPEC", "--batch-size", "0"], 2, "Invalid value"),
        (["store", "info", "NOWHERE"], 1, "Error:"),
        (["store", "verify", "NOWHERE"], 1, "Error:"),
        (["nonsense"], 2, "No such command"),
    ],
)
def test_usage_and_runtime_exit_statuses(tmp_path, spec_file, args, status, message):
    args = [str(spec_file) if a == "SPEC" else str(tmp_path / "nowhere.zarr") if a == "NOWHERE" else a for a in args]
    result = cli(*args)
    assert result.exit_code == status, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o002, 0o664, 0o775), (0o022, 0o644, 0o755)])
def test_store_is_created_with_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    from extract.pipeline import extract

    old = os.umask(umask)
    try:
        extract(tiny_spec(dataset={"limit": {"train": 4, "test": 4}}), tmp_path / "s.zarr", progress=False)
    finally:
        os.umask(old)
    for path in [tmp_path / "s.zarr", *(tmp_path / "s.zarr").rglob("*")]:
        want = dir_mode if path.is_dir() else file_mode
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_units_are_sized_for_resume_and_the_same_on_every_device():
    from extract.prepare import store_features, unit_rows_for
    from extract.spec import load_spec
    from extract.store import plan_layout

    for name, n, at_least in (("cpu_small", 384, 6), ("fmnist_demo", 12000, 6)):
        spec = load_spec(Path(__file__).resolve().parents[2] / "cache_specs" / f"{name}.yaml", check_files=False)
        cap = unit_rows_for(spec)
        layout = plan_layout(n, store_features(spec), chunk_rows=spec.storage.chunk_rows, max_shard_rows=cap)
        assert layout.num_units >= at_least, (name, layout)
        assert layout.shard_rows % spec.storage.chunk_rows == 0
        # the cap is a function of the spec alone: the compute device plays no part
        gpu = load_spec({**spec.to_dict(), "compute": {**spec.to_dict()["compute"], "device": "cuda"}}, check_files=False)
        assert unit_rows_for(gpu) == cap
