"""One writer at a time: a second writer is refused, a stale lease is broken only on request, and
finalize merges into the root it reads fresh instead of overwriting it from a stale copy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import zarr

from extract.pipeline import extract
from extract.store.lease import LEASE_KEY
from extract.store.state import feature_list_problems

from .conftest import assert_identical_to, cli, files, tiny_spec


def _partial_store(path, units=(0, 1, 2)):
    extract(tiny_spec(), path, progress=False, units=list(units), finalize=False)
    return files(path)


def test_second_writer_is_refused_naming_the_holder(tmp_path, spec_file, no_compute):
    store = tmp_path / "s.zarr"
    before = _partial_store(store)
    no_compute()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from extract.store.lease import acquire; acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
        assert result.exit_code == 1, result.output
        assert "being written by another writer" in result.output
        assert f"pid {holder.pid}" in result.output and socket.gethostname() in result.output
        assert "Traceback" not in result.output and "resume with" not in result.output
        # --break-lease does not take over a live writer's fresh lease
        again = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
        assert again.exit_code == 1 and "only takes over a lease whose heartbeat is stale" in again.output
        after = files(store)
        assert LEASE_KEY in after
        after.pop(LEASE_KEY)
        assert after == before  # the refused writer wrote nothing
    finally:
        holder.kill()
        holder.wait()


def _plant_lease(store, age_s: float, host: str = "elsewhere") -> dict:
    now = time.time() - age_s
    record = {
        "token": "abc",
        "owner": "someone",
        "host": host,
        "pid": 4242,
        "started": "2026-01-01T00:00:00Z",
        "heartbeat": "2026-01-01T00:00:00Z",
        "heartbeat_epoch": now,
    }
    # Atomically, as a breaking writer does: a running heartbeat must never read it half-written.
    tmp = store / (LEASE_KEY + ".planting")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, store / LEASE_KEY)
    return record


def test_stale_lease_needs_break_lease_and_says_so(tmp_path, spec_file, reference_store):
    store = tmp_path / "s.zarr"
    before = _partial_store(store)
    _plant_lease(store, age_s=3600)
    refused = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert refused.exit_code == 1, refused.output
    assert "someone@elsewhere pid 4242" in refused.output and "stale" in refused.output
    assert "--break-lease" in refused.output and "Traceback" not in refused.output
    now = files(store)
    now.pop(LEASE_KEY)
    assert now == before
    taken = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert taken.exit_code == 1  # still refused without the flag
    broken = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
    assert broken.exit_code == 0, broken.output
    assert "breaking the stale writer lease of someone@elsewhere pid 4242" in broken.output
    assert_identical_to(reference_store, store)  # the finished units were kept, the rest completed


def test_fresh_lease_of_another_host_is_never_broken(tmp_path, spec_file, no_compute):
    store = tmp_path / "s.zarr"
    _partial_store(store)
    no_compute()
    _plant_lease(store, age_s=5)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress", "--break-lease")
    assert result.exit_code == 1 and "someone@elsewhere" in result.output


def test_finalize_merges_into_a_root_changed_since_it_opened(tmp_path):
    """The bug: an older run's finalize rewrote the root from the copy it read at start, hiding an
    extension's features. Here the extension runs while the older writer is still open."""
    from extract.pipeline import prepare

    store = tmp_path / "s.zarr"
    old = prepare(tiny_spec(), store)  # the older run, still open
    grown = tiny_spec(features={"timesteps": [10, 50]})
    extract(grown, store, progress=False)  # extends and finalizes (the lease is reentrant in-process)
    old.writer.finalize()  # must not bring back the old feature list and fingerprint
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    from extract.spec import load_spec

    assert root.attrs["fingerprint"] == load_spec(grown).fingerprint
    assert len(root.attrs["features"]) == 4 and root.attrs["complete"] is True
    assert feature_list_problems(root) == []


def test_feature_list_check_finds_hidden_arrays(tmp_path, reference_store):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(reference_store, store)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    assert feature_list_problems(root) == []
    root.attrs.update({"features": root.attrs["features"][:1]})  # what a stale overwrite left behind
    problems = feature_list_problems(root)
    assert any("not in the root's feature list" in p for p in problems)


def test_two_extractions_at_once_the_second_is_refused(tmp_path, spec_file, reference_store):
    """The issue's case: a run is still writing when someone extends the same store."""
    from .conftest import cli_process

    store = tmp_path / "s.zarr"
    first = cli_process(
        ["extract", str(spec_file), "--store", str(store), "--no-progress"], env={"DIFFBANK_DEBUG_UNIT_DELAY": "0.4"}
    )
    deadline = time.time() + 120  # start-up on a loaded machine; the loop ends at the marker
    while not (store / "_progress" / "done" / "c" / "0" / "0").exists() and time.time() < deadline:
        time.sleep(0.02)
    grown = tmp_path / "grown.yaml"
    import yaml

    grown.write_text(yaml.safe_dump(tiny_spec(features={"timesteps": [10, 50]})))
    second = cli("extract", str(grown), "--store", str(store), "--no-progress")
    assert second.exit_code == 1, second.output
    assert "being written by another writer" in second.output and f"pid {first.pid}" in second.output
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert_identical_to(reference_store, store)  # the first run finished untouched by the second


def test_heartbeat_refreshes_and_a_lost_lease_stops_writing(tmp_path):
    from extract.store.lease import LeaseLost, acquire

    store = tmp_path / "s.zarr"
    lease = acquire(str(store), heartbeat_s=0.05)
    try:
        first = json.loads((store / LEASE_KEY).read_text())["heartbeat_epoch"]
        time.sleep(0.3)
        assert json.loads((store / LEASE_KEY).read_text())["heartbeat_epoch"] > first
        _plant_lease(store, age_s=0)  # someone broke it and took over
        try:
            lease.check()
            raise AssertionError("check() should have raised")
        except LeaseLost as exc:
            assert "taken over by someone@elsewhere" in str(exc)
    finally:
        lease.release()
    assert json.loads((store / LEASE_KEY).read_text())["owner"] == "someone"  # release leaves the new holder's


def test_exclusive_create_on_an_fsspec_store(tmp_path):
    from extract.store.lease import LeaseHeld, acquire
    from extract.store.root_objects import RootObjects

    objects = RootObjects("memory://faults-lease/s.zarr")
    assert objects.create("probe.json", b"1") and not objects.create("probe.json", b"2")
    assert objects.read("probe.json") == b"1"
    extract(tiny_spec(dataset={"limit": {"train": 4, "test": 4}}), "memory://faults-lease/x.zarr", progress=False)
    assert not RootObjects("memory://faults-lease/x.zarr").exists(LEASE_KEY)  # released at the end
    other = RootObjects("memory://faults-lease/y.zarr")
    other.create(
        LEASE_KEY,
        json.dumps(
            {"token": "t", "owner": "o", "host": "elsewhere", "pid": 1, "heartbeat_epoch": time.time()}
        ).encode(),
    )
    try:
        acquire("memory://faults-lease/y.zarr")
        raise AssertionError("a held lease was acquired")
    except LeaseHeld as exc:
        assert "o@elsewhere pid 1" in str(exc)


def test_best_effort_lease_where_there_is_no_exclusive_create(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    from extract.store.root_objects import RootObjects

    real_open = MemoryFileSystem._open

    def no_x(self, path, mode="rb", *a, **k):
        if "x" in mode:
            raise ValueError(f"unsupported file mode: {mode!r}")  # as on filesystems without one
        return real_open(self, path, mode, *a, **k)

    monkeypatch.setattr(MemoryFileSystem, "_open", no_x)
    objects = RootObjects("memory://faults-noexcl/s.zarr")
    assert objects.create(LEASE_KEY, b"first") and not objects.create(LEASE_KEY, b"second")
    assert objects.read(LEASE_KEY) == b"first"


def test_a_run_whose_lease_was_taken_over_stops_without_resume_advice(tmp_path, spec_file, monkeypatch):
    from extract.store import StoreWriter

    store = tmp_path / "s.zarr"
    real = StoreWriter.write_unit
    calls = []

    def write_then_lose(self, unit, *a, **k):
        calls.append(unit)
        if len(calls) == 2:
            _plant_lease(store, age_s=0)  # another writer broke our lease in between
        return real(self, unit, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_unit", write_then_lose)
    result = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert result.exit_code == 1, result.output
    assert "this run's writer lease was taken over by someone@elsewhere" in result.output
    assert "resume with" not in result.output and "Traceback" not in result.output
    assert json.loads((store / LEASE_KEY).read_text())["owner"] == "someone"  # theirs, left alone
