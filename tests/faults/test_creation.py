"""Crash-safe creation and full disks: a store interrupted while being created is recreated on rerun;
a full disk stops a run with one clean line, and a rerun (with space again) finishes it byte-identically."""

from __future__ import annotations

import errno
import signal

import pytest
from zarr.storage import LocalStore

from extract.store.lease import CREATING_KEY, LEASE_KEY

from .conftest import assert_identical_to, cli, cli_process, done_units, files, unit_files

# Kill the writer at a point of creation: after the root group (before any array), mid-way, and after
# the root attributes but before the creation marker is removed.
KILL_POINTS = {
    "before the arrays": "import extract.store.create as w; w.create_feature_array = _die",
    "mid-way": "import extract.store.create as w; w.create_progress = _die",
    "after the attributes": (
        "import extract.store.root_objects as l; from extract.store.lease import CREATING_KEY\n"
        "_real = l.RootObjects.delete\n"
        "l.RootObjects.delete = lambda self, key: _die() if key == CREATING_KEY else _real(self, key)"
    ),
}
DIE = "import os, signal\ndef _die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_during_creation_is_recreated_on_rerun(tmp_path, spec_file, reference_store, point):
    store = tmp_path / "s.zarr"
    proc = cli_process(
        ["extract", str(spec_file), "--store", str(store), "--no-progress"], code=DIE + KILL_POINTS[point]
    )
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (store / CREATING_KEY).exists() and (store / LEASE_KEY).exists()  # as a crash leaves it
    rerun = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert rerun.exit_code == 0, rerun.output
    assert "creation was interrupted before any data was written; creating it again" in rerun.output
    assert "taking over the lease of a writer that is gone" in rerun.output
    assert_identical_to(reference_store, store)


def _disk_full_after(monkeypatch, allowed) -> list[str]:
    """Zarr's local writes fail with ENOSPC once `allowed(key)` says no; returns the keys written."""
    real = LocalStore.set
    written: list[str] = []

    async def set_(self, key, value, *a, **k):
        if not allowed(key, written):
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(key)
        return await real(self, key, value, *a, **k)

    monkeypatch.setattr(LocalStore, "set", set_)
    return written


def test_disk_full_during_creation(tmp_path, spec_file, reference_store, monkeypatch):
    store = tmp_path / "s.zarr"
    _disk_full_after(monkeypatch, lambda key, written: len(written) < 5)
    full = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert full.exit_code == 1, full.output
    assert full.output.strip().splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert "resume" not in full.output and "Traceback" not in full.output
    assert (store / CREATING_KEY).exists() and not (store / LEASE_KEY).exists()
    monkeypatch.undo()  # space again
    rerun = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert rerun.exit_code == 0, rerun.output
    assert_identical_to(reference_store, store)


def test_disk_full_while_writing_units(tmp_path, spec_file, reference_store, monkeypatch):
    store = tmp_path / "s.zarr"
    # creation and the first three units fit; unit 3's data does not
    _disk_full_after(monkeypatch, lambda key, written: not key.startswith("features/") or "/c/3/" not in key)
    full = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert full.exit_code == 1, full.output
    assert "error: writing to the store failed: [Errno 28] No space left on device" in full.output
    assert f"resume with:\n  diffbank extract {spec_file} --store {store}" in full.output
    assert "Traceback" not in full.output
    done = done_units(store)
    assert done[:3].all() and not done[3:].any()
    kept = {u: unit_files(store, u) for u in range(3)}
    monkeypatch.undo()
    rerun = cli("extract", str(spec_file), "--store", str(store), "--no-progress")
    assert rerun.exit_code == 0, rerun.output
    assert {u: unit_files(store, u) for u in range(3)} == kept  # finished units untouched
    assert_identical_to(reference_store, store)
    assert files(store)  # sanity: the store is still there
