"""Refuse before working: a read-only or newer-format store is refused before the model is built, and a
complete store makes a rerun a no-op that writes nothing (so it also succeeds on read-only media)."""

from __future__ import annotations

import shutil

import yaml
import zarr

from extract.pipeline import extract

from .conftest import cli, files, tiny_spec


def _copy(reference_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(reference_store, store)
    return store


def test_complete_store_rerun_writes_nothing_even_read_only(
    tmp_path, spec_file, reference_store, read_only, no_compute
):
    store = _copy(reference_store, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    no_compute()
    read_only(store)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "already complete for this spec; nothing to do" in result.output
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_read_only_store_refused_before_compute(tmp_path, reference_store, read_only, no_compute):
    store = _copy(reference_store, tmp_path)
    before = files(store)
    grown = tmp_path / "grown.yaml"  # extending needs writes
    grown.write_text(yaml.safe_dump(tiny_spec(features={"timesteps": [10, 50]})))
    no_compute()
    read_only(store)
    result = cli("extract", str(grown), "--store", str(store), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "the store is read-only here" in result.output and "Read-only file system" in result.output
    assert "resume with" not in result.output and "Traceback" not in result.output
    assert files(store) == before


def test_incomplete_read_only_store_refused_before_compute(tmp_path, spec_file, read_only, no_compute):
    store = tmp_path / "s.zarr"
    extract(tiny_spec(), store, progress=False, units=[0, 1], finalize=False)
    before = files(store)
    no_compute()
    read_only(store)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert result.exit_code == 1 and "read-only" in result.output, result.output
    assert files(store) == before


def test_newer_format_store_refused_before_compute(tmp_path, spec_file, reference_store, no_compute):
    store = _copy(reference_store, tmp_path)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs.update({"format_version": 99, "complete": False})
    before = files(store)
    no_compute()
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "is a format 99 store, written by a newer diffbank" in result.output
    assert "Upgrade diffbank" in result.output and "Traceback" not in result.output
    assert files(store) == before


def test_not_a_store_is_refused_and_left_alone(tmp_path, spec_file, no_compute):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"mine")
    no_compute()
    result = cli("extract", str(spec_file), "--store", str(target), "--no-progress")
    assert result.exit_code == 1 and "exists and is not a Zarr store" in result.output, result.output
    assert sorted(p.name for p in target.iterdir()) == ["holiday.jpg"]


def test_complete_store_with_workers_is_a_no_op_too(tmp_path, spec_file, reference_store, read_only, no_compute):
    store = _copy(reference_store, tmp_path)
    before = files(store)
    no_compute()
    read_only(store)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--workers", "2")
    assert result.exit_code == 0 and "nothing to do" in result.output, result.output
    assert files(store) == before
